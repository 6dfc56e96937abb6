"""NaN / inf guard: a non-finite loss stops the run on its step (last good save kept), or with
`--skip_nonfinite_steps N` that step is skipped (weights unchanged), at most N times."""
from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

import train_helpers as th
from library import custom_train_functions as ctf
from library import nonfinite, train_core
from library.errors import UserError


@pytest.fixture
def nan_on_calls(monkeypatch):
    """`nan_on_calls({2, 3})`: compute_loss returns NaN (keeping the graph) on those 1-based calls."""
    real = ctf.compute_loss

    def install(calls: set[int]) -> None:
        count = {"n": 0}

        def compute_loss(*args, **kwargs):
            loss = real(*args, **kwargs)
            count["n"] += 1
            return loss * float("nan") if count["n"] in calls else loss

        monkeypatch.setattr(ctf, "compute_loss", compute_loss)

    return install


@pytest.fixture
def tiny_run(tmp_path):
    model = th.make_tiny_model(tmp_path)
    img = th.make_image_folder(tmp_path, count=2, repeats=1)
    return lambda out, *extra: th.base_argv(model, img, tmp_path / out, "--train_batch_size", "1", *extra)


def test_nan_stops_on_its_step_and_keeps_the_last_good_save(tmp_path, tiny_run, nan_on_calls):
    nan_on_calls({3})
    with pytest.raises(UserError) as info:
        th.run_train(tiny_run("out", "--save_every_n_steps", "1", "--max_train_steps", "4"))
    message = str(info.value)
    assert "loss became nan at step 3" in message
    assert "learning rate 0.001" in message and "--mixed_precision no" in message
    out = tmp_path / "out"
    good = load_file(str(out / "lora-step00000002.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (out / "lora-step00000003.safetensors").exists()
    assert not (out / "lora.safetensors").exists()


def test_skip_nonfinite_steps_skips_and_logs(tmp_path, tiny_run, nan_on_calls, caplog):
    nan_on_calls({2})
    seen = {}

    def keep_network(ctx):
        seen["network"] = th.network_state(ctx)

    with caplog.at_level(logging.WARNING, logger="library.nonfinite"):
        result = th.run_train(tiny_run("out", "--skip_nonfinite_steps", "1", "--max_train_steps", "3"),
                              train_core.TrainHooks(on_train_end=keep_network))
    assert result.global_step == 3 and len(result.step_losses) == 2  # step 2 trained nothing
    assert all(math.isfinite(v) for v in result.step_losses)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith("step 2: loss is nan: step skipped")
    # an applied NaN step would have turned the AdamW-updated weights into NaN
    assert all(torch.isfinite(v).all() for v in seen["network"].values())
    saved = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_skip_limit_reached_stops(tiny_run, nan_on_calls):
    nan_on_calls({1, 2})
    with pytest.raises(UserError, match=r"loss became nan at step 2 after 1 skipped step\(s\) \(--skip_nonfinite_steps 1\)"):
        th.run_train(tiny_run("out", "--skip_nonfinite_steps", "1", "--max_train_steps", "3"))


def test_negative_skip_limit_is_refused(tiny_run):
    with pytest.raises(UserError, match="--skip_nonfinite_steps"):
        th.run_train(tiny_run("out", "--skip_nonfinite_steps", "-1"))


@pytest.mark.parametrize(
    "settings, hints, not_hints",
    [
        ({"mixed_precision": "fp16"}, ["--mixed_precision fp16", "try --mixed_precision bf16", "--no_half_vae"], []),
        ({"mixed_precision": "fp16", "no_half_vae": True}, ["--mixed_precision fp16 --no_half_vae", "bf16"], ["or --no_half_vae"]),
        ({"mixed_precision": "bf16", "full_bf16": True}, ["--mixed_precision bf16 --full_bf16", "lower the learning rate"], ["no_half_vae"]),
        ({"mixed_precision": "no"}, ["--mixed_precision no"], ["bf16"]),
    ],
)
def test_stop_message_names_precision_and_advice(settings, hints, not_hints):
    guard = nonfinite.NonFiniteGuard(argparse.Namespace(skip_nonfinite_steps=0, **settings))
    message = guard.stop_message(7, float("inf"), [2e-4, 1e-5])
    assert message.startswith("loss became inf at step 7")
    assert "learning rate 0.0002, 1e-05" in message
    for hint in hints:
        assert hint in message
    for hint in not_hints:
        assert hint not in message


@pytest.mark.parametrize("extra, vae_dtype", [([], torch.bfloat16), (["--no_half_vae"], torch.float32)])
def test_no_half_vae_keeps_the_vae_in_float32(tiny_run, extra, vae_dtype):
    seen = {}

    def capture(ctx):
        seen["vae"] = ctx.models.vae.dtype
        seen["unet"] = ctx.models.unet.dtype

    result = th.run_train(tiny_run("out", "--mixed_precision", "bf16", "--max_train_steps", "1", *extra),
                          train_core.TrainHooks(on_train_start=capture))
    assert seen == {"vae": vae_dtype, "unet": torch.bfloat16}
    assert math.isfinite(result.step_losses[0])


def test_skipped_count_is_kept_across_resume(tmp_path, tiny_run, nan_on_calls):
    import json

    nan_on_calls({2})
    th.run_train(tiny_run("first", "--skip_nonfinite_steps", "1", "--max_train_steps", "2", "--save_state"))
    state = tmp_path / "first" / "lora-state"
    assert json.loads((state / "train_state.json").read_text(encoding="utf-8"))["skipped_nonfinite_steps"] == 1
    nan_on_calls({1})  # the resumed run's first step (step 3): the one allowed skip is used up
    with pytest.raises(UserError, match=r"loss became nan at step 3 after 1 skipped step\(s\)"):
        th.run_train(tiny_run("second", "--skip_nonfinite_steps", "1", "--max_train_steps", "4", "--resume", str(state)))
