"""Crash-safe outputs: a save killed part way, or hitting a full disk, leaves the previous file
intact, no corrupt file under the final name, and state folders complete or absent."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_helpers as th
from library import io_util, latent_cache, resume_util, train_saving
from library.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FAULT_HOOKS = Path(__file__).resolve().parent / "fault_hooks"
PREVIOUS = b"the previous run's good file"


def _start_slow_save(tmp_path: Path, match: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    """train_network.py whose safetensors save to a path containing `match` stalls half-written."""
    model = th.make_tiny_model(tmp_path)
    img = th.make_image_folder(tmp_path, count=2, repeats=1)
    marker = tmp_path / "save_started"
    env = dict(os.environ, PYTHONPATH=str(FAULT_HOOKS), REL_SLOW_SAVE_MATCH=match,
               REL_SLOW_SAVE_MARKER=str(marker), OMP_NUM_THREADS="1")
    argv = th.base_argv(model, img, tmp_path / "out", "--train_batch_size", "1", *extra)
    process = subprocess.Popen([sys.executable, str(REPO / "train_network.py"), *argv], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return process, marker


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")
def test_sigkill_during_model_save_keeps_previous_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(PREVIOUS)
    process, marker = _start_slow_save(tmp_path, ".lora.", "--max_train_steps", "1")
    th.sigkill_when_started(process, marker)
    assert (out / "lora.safetensors").read_bytes() == PREVIOUS
    # the half-written data sits in a hidden temp file, never under a name a user or tool loads
    temps = [p.name for p in out.iterdir() if p.name != "lora.safetensors"]
    assert temps and all(name.startswith(".lora.") and ".tmp" in name for name in temps)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")
def test_sigkill_during_state_save_leaves_only_complete_states(tmp_path):
    process, marker = _start_slow_save(
        tmp_path, "lora-step00000002-state.partial",
        "--save_state", "--save_every_n_steps", "1", "--max_train_steps", "3",
    )
    th.sigkill_when_started(process, marker)
    out = tmp_path / "out"
    complete = out / "lora-step00000001-state"
    assert json.loads((complete / "train_state.json").read_text(encoding="utf-8"))["global_step"] == 1
    assert (complete / "optimizer.bin").is_file() and (complete / "model.safetensors").is_file()
    assert not (out / "lora-step00000002-state").exists()
    assert (out / ".lora-step00000002-state.partial").is_dir()  # hidden: never picked by --resume
    assert resume_util.resolve_resume_path(out) == complete


# --- a full disk (patched writes that fail part way) ------------------------------------------
def _half_then_enospc(real_write, target_index: int):
    """Wrap a writer whose argument `target_index` is the path or open handle written: half of the
    real bytes reach the file, then ENOSPC."""

    def write(*args, **kwargs):
        real_write(*args, **kwargs)
        target = args[target_index]
        if hasattr(target, "write"):  # an open handle (np.savez)
            target.flush()
            target.truncate(max(1, target.tell() // 2))
        else:
            data = Path(target).read_bytes()
            Path(target).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def _lora_writer(monkeypatch, tmp_path):
    from library.tiny_sd import build_tiny_models
    from networks import lora

    unet, vae, text_encoder = build_tiny_models(seed=0)
    network = lora.create_network(1.0, 4, 4, vae, text_encoder, unet)
    network.apply_to(text_encoder, unet, True, True)
    monkeypatch.setattr(lora, "save_file", _half_then_enospc(lora.save_file, 1))
    return tmp_path / "lora.safetensors", lambda path: network.save_weights(path, None, {"ss_x": "1"})


def _model_writer(monkeypatch, tmp_path):
    from library import model_util
    from library.tiny_sd import build_tiny_models

    unet, vae, text_encoder = build_tiny_models(seed=0)
    monkeypatch.setattr(model_util, "save_file", _half_then_enospc(model_util.save_file, 1))
    return tmp_path / "model.safetensors", lambda path: model_util.save_stable_diffusion_checkpoint(
        False, path, text_encoder, unet, vae)


def _npz_writer(monkeypatch, tmp_path):
    monkeypatch.setattr(np, "savez", _half_then_enospc(np.savez, 0))
    return tmp_path / "img0.npz", lambda path: latent_cache.save_latents_npz(path, torch.ones(4, 8, 8))


def _json_writer(monkeypatch, tmp_path):
    real_write_text = Path.write_text

    def write_text(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", write_text)
    return tmp_path / "meta.json", lambda path: io_util.write_text_atomic(path, json.dumps({"a": "b" * 100}))


@pytest.mark.parametrize("make_writer", [_lora_writer, _model_writer, _npz_writer, _json_writer],
                         ids=["lora", "model", "latent_npz", "metadata_json"])
def test_disk_full_keeps_previous_file(tmp_path, monkeypatch, make_writer):
    target, write = make_writer(monkeypatch, tmp_path)
    target.write_bytes(PREVIOUS)
    with pytest.raises(UserError, match=rf"cannot write .*{target.name}: the disk is full"):
        write(target)
    assert target.read_bytes() == PREVIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # the partial temp file is gone


class _FakeAccelerator:
    """Single-process stand-in whose save_state writes one file, then the disk is full."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        (Path(folder) / "optimizer.bin").write_bytes(b"x" * 100)
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")


def test_disk_full_during_state_save_keeps_previous_state(tmp_path):
    state = tmp_path / "lora-state"
    state.mkdir()
    (state / "train_state.json").write_text('{"global_step": 5}', encoding="utf-8")
    with pytest.raises(UserError, match=r"cannot write .*lora-state: the disk is full"):
        train_saving.save_train_state(_FakeAccelerator(), state, {"global_step": 9})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-state"]  # no half state left behind
    assert json.loads((state / "train_state.json").read_text(encoding="utf-8")) == {"global_step": 5}
