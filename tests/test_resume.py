"""--save_state / --resume: a run stopped after a saved state and resumed ends bit-identical."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import train_helpers as th
from library import train_core

def _tensors_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "scenario",
    [
        # mid-epoch step state; caption shuffle + flip augmentation, images through the VAE each step
        {
            "extra": ["--shuffle_caption", "--flip_aug", "--save_every_n_steps", "3", "--max_train_steps", "5"],
            "stop": 3, "state": "lora-step00000003-state", "position": (1, 1),
        },
        # epoch-end state with gradient accumulation, cached latents and cached text-encoder outputs
        {
            "extra": ["--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--cache_latents",
                      "--flip_aug", "--network_train_unet_only", "--save_every_n_epochs", "1", "--max_train_steps", "4"],
            "stop": 2, "state": "lora-000001-state", "position": (1, 0),
        },
        # --save_every_n_epochs state with two loader workers, caption shuffle / dropout / tag dropout
        # and gradient accumulation (captions change per epoch: no text-encoder cache)
        {
            "extra": ["--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--max_data_loader_n_workers", "2",
                      "--shuffle_caption", "--caption_dropout_rate", "0.3", "--caption_tag_dropout_rate", "0.3",
                      "--save_every_n_epochs", "1", "--max_train_steps", "4"],
            "stop": 2, "state": "lora-000001-state", "position": (1, 0),
        },
    ],
    ids=["mid_epoch_step_state", "epoch_state_accumulation", "epoch_state_workers_caption_dropout"],
)
def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path, scenario):
    model = th.make_tiny_model(tmp_path)
    img = th.make_image_folder(tmp_path, count=4, repeats=1)
    extra = [*scenario["extra"], "--save_state"]

    full = th.run_train(th.base_argv(model, img, tmp_path / "full", *extra))

    stopped_dir = tmp_path / "stopped"
    stopped = th.run_train(
        th.base_argv(model, img, stopped_dir, *extra), train_core.TrainHooks(stop_after_step=scenario["stop"])
    )
    assert stopped.stopped_early and stopped.global_step == scenario["stop"]
    assert not (stopped_dir / "lora.safetensors").exists()
    state_dir = stopped_dir / scenario["state"]
    train_state = json.loads((state_dir / "train_state.json").read_text(encoding="utf-8"))
    assert train_state["global_step"] == scenario["stop"]
    assert (train_state["epoch"], train_state["batch_index"]) == scenario["position"]

    seen = {}

    def capture(ctx):
        seen["step"] = ctx.global_step
        seen["optimizer"] = copy.deepcopy(ctx.optimizer.state_dict())  # training updates it in place

    resumed = th.run_train(
        th.base_argv(model, img, stopped_dir, *extra, "--resume", str(state_dir)),
        train_core.TrainHooks(on_train_start=capture),
    )
    # continued at the saved step with the saved optimizer moments
    assert seen["step"] == scenario["stop"]
    saved_optimizer = torch.load(state_dir / "optimizer.bin", weights_only=False)
    restored = seen["optimizer"]["state"]
    assert restored and restored.keys() == saved_optimizer["state"].keys()
    for index, moments in saved_optimizer["state"].items():
        assert torch.equal(restored[index]["exp_avg"], moments["exp_avg"])
        assert torch.equal(restored[index]["step"], moments["step"])

    assert resumed.global_step == full.global_step
    assert resumed.step_losses == full.step_losses[scenario["stop"]:]
    _tensors_equal(load_file(str(tmp_path / "full" / "lora.safetensors")), load_file(str(stopped_dir / "lora.safetensors")))
    assert (stopped_dir / "lora-state").is_dir()  # --save_state also saves the final state


def test_resume_missing_state_folder_is_user_error(tmp_path):
    from library.errors import UserError

    model = th.make_tiny_model(tmp_path)
    img = th.make_image_folder(tmp_path, count=2, repeats=1)
    with pytest.raises(UserError, match="--resume"):
        th.run_train(th.base_argv(model, img, tmp_path / "out", "--resume", str(tmp_path / "nope")))
