"""`--resume <output folder>` picks the latest complete state (and says which);
`--save_state_on_train_end` writes the final state without `--save_state`."""
from __future__ import annotations

import json
import logging
import os

import pytest

import train_helpers as th
from library import resume_util
from library.errors import UserError


def _state(folder, step=None, mtime=None):
    folder.mkdir(parents=True)
    if step is None:
        (folder / "optimizer.bin").write_bytes(b"x")  # an sd-scripts state: no JSON
    else:
        (folder / "train_state.json").write_text(json.dumps({"global_step": step}), encoding="utf-8")
    if mtime is not None:
        os.utime(folder, (mtime, mtime))
    return folder


def test_latest_state_by_step_then_time(tmp_path, caplog):
    _state(tmp_path / "lora-step00000004-state", 4, mtime=3_000)
    best = _state(tmp_path / "lora-000002-state", 6, mtime=1_000)
    _state(tmp_path / ".lora-step00000008-state.partial", 8)  # half-written: never used
    _state(tmp_path / "old-sd-scripts-state", None, mtime=5_000)
    (tmp_path / "lora.safetensors").write_bytes(b"model")
    with caplog.at_level(logging.INFO, logger="library.resume_util"):
        assert resume_util.resolve_resume_path(tmp_path) == best
    assert any("using the latest state found: lora-000002-state (step 6)" in r.getMessage() for r in caplog.records)
    # a state folder itself is used as given
    assert resume_util.resolve_resume_path(best) == best


def test_same_step_prefers_newest(tmp_path):
    _state(tmp_path / "a-state", 3, mtime=1_000)
    newest = _state(tmp_path / "b-state", 3, mtime=2_000)
    assert resume_util.find_latest_state(tmp_path) == newest


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nothing", "state folder not found"),
    (lambda p: (p / "f.txt").write_text("x", encoding="utf-8") and p / "f.txt", "is a file"),
    (lambda p: p, "no training state in this folder"),
])
def test_resume_path_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        resume_util.resolve_resume_path(make(tmp_path))


def test_save_state_on_train_end_then_resume_output_folder_is_exact(tmp_path, caplog):
    model = th.make_tiny_model(tmp_path)
    img = th.make_image_folder(tmp_path, count=4, repeats=1)
    out = tmp_path / "out"
    first = th.run_train(th.base_argv(model, img, out, "--max_train_steps", "2", "--save_state_on_train_end"))
    assert first.global_step == 2
    assert sorted(p.name for p in out.iterdir()) == ["lora-state", "lora.safetensors"]
    with caplog.at_level(logging.INFO, logger="library.resume_util"):
        resumed = th.run_train(th.base_argv(model, img, out, "--max_train_steps", "4", "--resume", str(out)))
    assert any("using the latest state found: lora-state (step 2)" in r.getMessage() for r in caplog.records)
    full = th.run_train(th.base_argv(model, img, tmp_path / "full", "--max_train_steps", "4"))
    assert resumed.global_step == 4
    assert resumed.step_losses == full.step_losses[2:]


def test_state_load_errors_are_one_line(tmp_path):
    size = RuntimeError("Error(s) in loading state_dict for ModuleDict:\n\tsize mismatch for net.w: copying a param "
                        "with shape [8, 4] from checkpoint, the shape in current model is [4, 4].\n\tsize mismatch for net.v")
    message = resume_util.mismatch_message(tmp_path, size)
    assert "\n" not in message and "does not fit this run" in message and "net.w" in message and "[8, 4]" in message
    missing = resume_util.mismatch_message(tmp_path, FileNotFoundError("optimizer.bin"))
    assert missing == f"--resume: the state in {tmp_path} is incomplete: optimizer.bin"


# --- run fingerprint: a state of this run, or another run's ----------------------------------
def _network_fingerprint(model, *flags):
    import train_network

    args = th.parse(th.base_argv(model, model.parent, model.parent / "out", *flags))
    return resume_util.run_fingerprint(args, train_network.NetworkTrainingMethod(args))


def test_model_identity_follows_content_not_name(tmp_path):
    import numpy as np

    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "a.safetensors").write_bytes(data)
    (tmp_path / "renamed.safetensors").write_bytes(data)
    other = bytearray(data)
    other[(1 << 20) + 5] ^= 1  # one byte inside the 64 KiB the legacy hash reads
    (tmp_path / "other.safetensors").write_bytes(bytes(other))
    (tmp_path / "small.bin").write_bytes(b"x" * 1000)  # too short for the legacy hash: SHA-256 of it all
    (tmp_path / "small2.bin").write_bytes(b"y" * 1000)
    ident = {name: resume_util.model_identity(tmp_path / name)
             for name in ("a.safetensors", "renamed.safetensors", "other.safetensors", "small.bin", "small2.bin")}
    assert ident["a.safetensors"]["size"] == 3 << 20
    assert not resume_util.fingerprint_differences({"model": ident["a.safetensors"]}, {"model": ident["renamed.safetensors"]})
    (diff,) = resume_util.fingerprint_differences({"model": ident["a.safetensors"]}, {"model": ident["other.safetensors"]})
    assert diff.startswith("base model a.safetensors (3145728 bytes, hash ") and "other.safetensors" in diff
    assert ident["small.bin"]["hash"] != ident["small2.bin"]["hash"]
    assert resume_util.model_identity(tmp_path / "gone.ckpt") == {"name": "gone.ckpt"}


def test_fingerprint_of_a_network_run(tmp_path):
    model = th.make_tiny_model(tmp_path)
    default = _network_fingerprint(model)  # base_argv: --network_dim 4 --network_alpha 2
    assert default["trainer"] == "train_network.py" and default["network_dim"] == 4 and default["network_alpha"] == 2.0
    assert default["model"]["name"] == model.name
    # the module's defaults (dim 4, alpha 1) are what an unset flag means
    import train_network

    args = th.parse(th.base_argv(model, tmp_path, tmp_path / "out", "--network_alpha", "1"))
    args.network_dim = None  # as when --network_dim is not given
    assert resume_util.run_fingerprint(args, train_network.NetworkTrainingMethod(args)) == _network_fingerprint(
        model, "--network_dim", "4", "--network_alpha", "1")
    # learning rate, steps and dropout-like network_args may change on resume; shape-changing ones may not
    same = _network_fingerprint(model, "--learning_rate", "1e-5", "--max_train_steps", "9",
                                "--network_args", "module_dropout=0.1")
    assert not resume_util.fingerprint_differences(default, same)
    changed = _network_fingerprint(model, "--network_args", "conv_dim=2", "--network_train_unet_only")
    assert resume_util.fingerprint_differences(default, changed) == [
        'network_args {} in the state, {"conv_dim": "2"} in this run',
        'trains "U-Net and text encoder" in the state, "U-Net" in this run',
    ]


def test_check_run_fingerprint(tmp_path, caplog):
    current = {"trainer": "train_network.py", "network_dim": 4, "new_key": 1}
    resume_util.check_run_fingerprint(tmp_path, {"run": {"trainer": "train_network.py", "network_dim": 4}}, current)
    with pytest.raises(UserError) as err:
        resume_util.check_run_fingerprint(tmp_path, {"run": {"trainer": "train_db.py", "network_dim": 8}}, current)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--resume: the state in {tmp_path} is from another run: ")
    assert 'trainer "train_db.py" in the state, "train_network.py" in this run; network_dim 8 in the state, 4 in this run' in message
    with caplog.at_level(logging.WARNING, logger="library.resume_util"):
        resume_util.check_run_fingerprint(tmp_path, {"global_step": 3}, current)  # an older state
    assert any("records no run settings" in r.getMessage() for r in caplog.records)
