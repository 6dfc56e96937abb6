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
