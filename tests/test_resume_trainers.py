"""Exact resume of train_db.py, fine_tune.py, train_textual_inversion.py and the XTI trainer.

Every trainer runs once uninterrupted and once interrupted then resumed, with the settings that
stress resuming combined in one run: gradient accumulation 2 over an odd number of batches (the
last step of each epoch has one micro-batch), two persistent data-loader workers, caption
shuffle / dropout / tag dropout (where the trainer has them), `--save_every_n_epochs` and
`--save_every_n_steps` states. The interruption is a SIGKILL of a child process (train_db.py, under bf16
and resumed past its text-encoder stop, with `--resume <output folder>`) or a stop right after
a state save (the others), at a mid-epoch state or an epoch-end state.
The resumed run's final weights, and its epoch saves, must equal the uninterrupted run's bit
for bit, with the same losses step for step.

Tiny model, 48 px images (at 32 px some of the tiny U-Net's 32-channel maps are 1x1, which
GroupNorm refuses to train on with batch size 1), 3 images, 5 optimizer steps (3 epochs) per run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ti_helpers as tih
import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
from library import train_core, train_util
from library.model_util import load_target_model

REPO = Path(__file__).resolve().parents[1]
FAULT_HOOKS = Path(__file__).resolve().parent / "fault_hooks"

# 3 batches of one image per epoch, 2 micro-batches per step: steps 1-2 in epoch 1, 3-4 in epoch 2, 5 in epoch 3
STRESS = [
    "--resolution", "48", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
    "--max_data_loader_n_workers", "2", "--persistent_data_loader_workers",
    "--shuffle_caption", "--save_every_n_epochs", "1", "--save_every_n_steps", "3", "--save_state",
    "--max_train_steps", "5", "--seed", "42", "--optimizer_type", "AdamW", "--mixed_precision", "no",
]
DROPOUT = ["--caption_dropout_rate", "0.3", "--caption_tag_dropout_rate", "0.3"]
MID_EPOCH = (3, (1, 2))  # step 3: epoch 2 (0-based 1), after its batch 2
EPOCH_END = (2, (1, 0))  # step 2: the state of epoch 1 (continues at epoch 2, batch 0)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_trainers")
    model = th.make_tiny_model(root)
    img = th.make_image_folder(root / "db", count=3, size=48, repeats=1)
    ti_img = tih.make_ti_images(root / "ti", count=3, repeats=1)
    # fine_tune.py: the same images in one folder, captions in a metadata JSON (stem keys)
    ft_img = root / "ft"
    ft_img.mkdir()
    metadata = {}
    for image in sorted((img / "1_sks dog").glob("*.png")):
        (ft_img / image.name).write_bytes(image.read_bytes())
        metadata[image.stem] = {"caption": image.with_suffix(".txt").read_text(encoding="utf-8")}
    meta = root / "meta.json"
    meta.write_text(json.dumps(metadata), encoding="utf-8")
    return {"model": model, "img": img, "ti_img": ti_img, "ft_img": ft_img, "meta": meta}


def _db_argv(ws, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(ws["model"]), "--train_data_dir", str(ws["img"]),
        "--caption_extension", ".txt", "--output_dir", str(out), "--output_name", "db", "--learning_rate", "1e-3",
        *STRESS, *DROPOUT, *extra,
    ]


def _ft_argv(ws, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(ws["model"]), "--in_json", str(ws["meta"]),
        "--train_data_dir", str(ws["ft_img"]), "--output_dir", str(out), "--output_name", "ft",
        "--learning_rate", "1e-3", *STRESS, *DROPOUT, *extra,
    ]


def _ti_argv(ws, out: Path, *extra: str) -> list[str]:
    # train_textual_inversion.py has no caption dropout flags (as sd-scripts)
    return tih.ti_argv(ws["model"], ws["ti_img"], out, *STRESS, "--save_model_as", "safetensors",
                       "--num_vectors_per_token", "2", "--keep_tokens", "1", *extra)


def _run(script: str, argv: list[str], hooks=None) -> train_core.TrainResult:
    """Parse `argv` as `script` does and train in this process."""
    module = __import__(script)
    return module.train(train_util.parse_args_with_config(module.setup_parser(), argv), hooks)


def _equal_models(a: Path, b: Path) -> None:
    """Every U-Net and text-encoder tensor of two saved whole models is bit-identical."""
    first, second = load_target_model(a), load_target_model(b)
    for part in ("unet", "text_encoder"):
        sa, sb = getattr(first, part).state_dict(), getattr(second, part).state_dict()
        assert sa.keys() == sb.keys()
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, (part, different[:5])


def _equal_files(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), a.name


def _position(state: Path) -> tuple[int, tuple[int, int]]:
    saved = json.loads((state / "train_state.json").read_text(encoding="utf-8"))
    return saved["global_step"], (saved["epoch"], saved["batch_index"])


def _kill_during_save(argv: list[str], script: str, match: str, tmp: Path) -> None:
    """Run `script` in a child process and SIGKILL it once its save to a path containing `match`
    has started (that save stalls half-written: tests/fault_hooks)."""
    marker = tmp / "save_started"
    env = dict(os.environ, PYTHONPATH=str(FAULT_HOOKS), REL_SLOW_SAVE_MATCH=match,
               REL_SLOW_SAVE_MARKER=str(marker), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(REPO / script), *argv], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    th.sigkill_when_started(process, marker, timeout=300)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")
def test_train_db_sigkilled_then_resumed_from_output_folder(ws, tmp_path):
    # the text encoder stops at step 3, so the resumed run starts after the stop; under bf16 the
    # encoder must keep the float32 weights it trained in, not take the bf16 of frozen models
    # (it did, and every later loss differed)
    extra = ["--stop_text_encoder_training", "3", "--mixed_precision", "bf16"]
    full = _run("train_db", _db_argv(ws, tmp_path / "full", *extra))
    out = tmp_path / "run"
    # killed while writing the epoch-2 model, after the step-3 state was complete
    _kill_during_save(_db_argv(ws, out, *extra), "train_db.py", ".db-000002.", tmp_path)
    assert not (out / "db-000002.safetensors").exists()
    assert _position(out / "db-step00000003-state") == MID_EPOCH
    seen = {}
    resumed = _run("train_db", _db_argv(ws, out, *extra, "--resume", str(out)),  # the latest state is picked
                   train_core.TrainHooks(on_train_end=lambda ctx: seen.update(dtype=ctx.models.text_encoder.dtype)))
    assert seen["dtype"] == torch.float32
    assert resumed.step_losses == full.step_losses[3:]
    _equal_models(tmp_path / "full" / "db.safetensors", out / "db.safetensors")
    _equal_models(tmp_path / "full" / "db-000002.safetensors", out / "db-000002.safetensors")


@pytest.mark.parametrize("script, argv, resume_at, final, epoch_save", [
    ("fine_tune", _ft_argv, EPOCH_END, "ft.safetensors", "ft-000002.safetensors"),
    ("train_textual_inversion", _ti_argv, MID_EPOCH, "emb.safetensors", "emb-000002.safetensors"),
    ("train_textual_inversion_XTI", _ti_argv, EPOCH_END, "emb.safetensors", "emb-000002.safetensors"),
], ids=["fine_tune_epoch_state", "textual_inversion_mid_epoch_state", "xti_epoch_state"])
def test_stopped_at_a_state_then_resumed(ws, tmp_path, script, argv, resume_at, final, epoch_save):
    # fine_tune: its text encoder trains; latents cached (train_db.py covers VAE encoding per step)
    extra = ["--train_text_encoder", "--cache_latents"] if script == "fine_tune" else []
    full = _run(script, argv(ws, tmp_path / "full", *extra))
    out = tmp_path / "run"
    step, position = resume_at
    stopped = _run(script, argv(ws, out, *extra), train_core.TrainHooks(stop_after_step=step))
    assert stopped.stopped_early and not (out / final).exists()
    states = sorted(p for p in out.iterdir() if p.name.endswith("-state"))
    state = next(p for p in states if _position(p)[0] == step)
    assert _position(state) == (step, position)
    resumed = _run(script, argv(ws, out, *extra, "--resume", str(state)))
    assert resumed.global_step == 5 and resumed.step_losses == full.step_losses[step:]
    compare = _equal_models if script == "fine_tune" else _equal_files
    compare(tmp_path / "full" / final, out / final)
    compare(tmp_path / "full" / epoch_save, out / epoch_save)

