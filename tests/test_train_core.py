"""Unit tests of the training core's parts: seeds, batch keys, save cadence, states, caches, errors."""
from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

import train_helpers as th  # noqa: F401 - puts the repository root on sys.path
from library import train_core, train_metadata, train_saving
from library.datasets import EpochBatchSampler
from library.errors import UserError

def test_step_seed_is_stateless_and_distinct():
    seeds = {train_core.step_seed(42, e, b) for e in range(5) for b in range(50)}
    assert len(seeds) == 250
    assert train_core.step_seed(42, 3, 7) == train_core.step_seed(42, 3, 7)
    assert train_core.step_seed(42, 3, 7) != train_core.step_seed(43, 3, 7)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_keys_resume_skips_exactly_the_done_batches(world_size):
    num_batches = 7
    for rank in range(world_size):
        for epoch in range(2):
            full = list(EpochBatchSampler(num_batches, epoch, 0, rank, world_size))
            assert len(full) == train_core._batches_per_rank(num_batches, world_size)
            for skip in range(len(full)):
                resumed = list(EpochBatchSampler(num_batches, epoch, skip * world_size, rank, world_size))
                assert resumed == full[skip:]
    # all ranks together cover every batch of an epoch
    covered = {k for r in range(world_size) for k in EpochBatchSampler(num_batches, 0, 0, r, world_size)}
    assert covered == {(0, i) for i in range(num_batches)}


def _plan(tmp_path, **kwargs) -> train_saving.SavePlan:
    values = {"output_dir": str(tmp_path), "output_name": "net", "save_every_n_epochs": None, "save_n_epoch_ratio": None}
    values.update(kwargs)
    return train_saving.SavePlan.from_args(argparse.Namespace(**values), num_train_epochs=10)


def test_save_plan_cadence_names_and_removal(tmp_path):
    plan = _plan(tmp_path, save_every_n_epochs=2, save_last_n_epochs=2, save_every_n_steps=5, save_last_n_steps=10,
                 save_last_n_epochs_state=1)
    assert [e for e in range(1, 11) if plan.saves_at_epoch_end(e)] == [2, 4, 6, 8]  # 10 is the final save
    assert [s for s in range(1, 21) if plan.saves_at_step(s)] == [5, 10, 15, 20]
    assert plan.epoch_model_path(4, "safetensors").name == "net-000004.safetensors"
    assert plan.step_model_path(15, ".pt").name == "net-step00000015.pt"
    assert plan.last_model_path(".safetensors").name == "net.safetensors"
    assert plan.epoch_state_dir(4).name == "net-000004-state"
    assert plan.step_state_dir(15).name == "net-step00000015-state"
    assert plan.last_state_dir().name == "net-state"
    # keep the last 2 epoch saves: saving epoch 6 removes epoch 2
    assert plan.outdated_epoch_model(6, ".safetensors").name == "net-000002.safetensors"
    assert plan.outdated_epoch_model(4, ".safetensors") is None
    assert plan.outdated_epoch_state(6).name == "net-000004-state"  # save_last_n_epochs_state=1
    # keep saves of the last 10 steps: at step 20 the step-5 save goes
    assert plan.outdated_step_model(20, ".safetensors").name == "net-step00000005.safetensors"
    assert plan.outdated_step_model(15, ".safetensors") is None
    default_names = _plan(tmp_path, output_name=None)
    assert default_names.epoch_model_path(1, "ckpt").name == "epoch-000001.ckpt"
    assert default_names.step_model_path(3, "ckpt").name == "at-step00000003.ckpt"
    assert default_names.last_model_path("ckpt").name == "last.ckpt"
    assert _plan(tmp_path, save_n_epoch_ratio=3).save_every_n_epochs == 3  # floor(10 / 3)


def test_save_plan_needs_output_dir(tmp_path):
    with pytest.raises(UserError, match="--output_dir"):
        _plan(tmp_path, output_dir=None)


def test_train_state_round_trip_restores_optimizer_and_position(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    state = train_saving.train_state_dict(7, 2, 3, 1, 42, 100)
    state_dir = tmp_path / "net-step00000007-state"
    train_saving.save_train_state(accelerator, state_dir, state)
    assert json.loads((state_dir / "train_state.json").read_text(encoding="utf-8"))["batch_index"] == 3
    assert not list(tmp_path.glob(".*partial"))
    saved_weight = model.weight.detach().clone()
    saved_moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    optimizer.step()
    loaded = train_saving.load_train_state(accelerator, state_dir)
    assert torch.equal(model.weight, saved_weight)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_moment)
    assert train_saving.resume_position(loaded, 1, 10) == (7, 2, 3)
    assert train_saving.resume_position(loaded, 1, 3) == (7, 3, 0)  # the epoch was complete
    assert train_saving.resume_position(loaded, 2, 10) == (7, 2, 0)  # other process count: epoch start
    with pytest.raises(UserError, match="--resume"):
        train_saving.load_train_state(accelerator, tmp_path / "missing")


def test_text_embedding_cache_encodes_each_caption_once():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return torch.stack([torch.full((2, 3), float(len(c))) for c in captions])

    cache = train_core.TextEmbeddingCache(encode, torch.device("cpu"), max_entries=2)
    out = cache(["a", "bb", "a"])
    assert out.shape == (3, 2, 3) and out[1, 0, 0] == 2.0 and torch.equal(out[0], out[2])
    assert calls == [["a"], ["bb"]]  # one caption per call: states never depend on batch mates
    cache(["ccc", "ccc"])
    assert calls[-2:] == [["ccc"], ["ccc"]] and len(cache) == 2  # past max_entries: encoded, not stored


def _text_encoder_kind(argv) -> type:
    seen = []

    def capture(ctx):
        seen.append(type(ctx.accelerator.unwrap_model(ctx.step_module)._encode_text))

    th.run_train(argv, train_core.TrainHooks(on_train_start=capture, stop_after_step=1))
    return seen[0]


def test_text_encoder_outputs_cached_only_for_fixed_captions(tmp_path):
    model = th.make_tiny_model(tmp_path)
    img = th.make_image_folder(tmp_path, count=2, repeats=1)
    cat = img / "1_cat"
    cat.mkdir()
    for name in ("img0.png", "img0.txt"):
        (cat / name).write_bytes((img / "1_sks dog" / name).read_bytes())

    def argv(*extra):
        return th.base_argv(model, img, tmp_path / "out", "--max_train_steps", "1", "--network_train_unet_only", *extra)

    assert _text_encoder_kind(argv()) is train_core.TextEmbeddingCache
    assert _text_encoder_kind(argv("--caption_dropout_rate", "0.5")) is not train_core.TextEmbeddingCache
    assert _text_encoder_kind(argv("--caption_dropout_every_n_epochs", "2")) is not train_core.TextEmbeddingCache
    # one of two subsets shuffles its tags
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[general]\nresolution = 64\ncaption_extension = '.txt'\nbatch_size = 2\n[[datasets]]\n"
        f"[[datasets.subsets]]\nimage_dir = '{(img / '1_sks dog').as_posix()}'\nnum_repeats = 1\n"
        f"[[datasets.subsets]]\nimage_dir = '{cat.as_posix()}'\nnum_repeats = 1\nshuffle_caption = true\n",
        encoding="utf-8",
    )
    with_config = [a for a in argv("--dataset_config", str(config))]
    index = with_config.index("--train_data_dir")
    del with_config[index:index + 2]
    assert _text_encoder_kind(with_config) is not train_core.TextEmbeddingCache


def test_metadata_for_save_and_no_metadata():
    base = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1.0", "ss_seed": "1"}
    full = train_metadata.metadata_for_save(base, 12, 3)
    assert full["ss_steps"] == "12" and full["ss_epoch"] == "3" and full["ss_seed"] == "1"
    assert float(full["ss_training_finished_at"]) > 0
    minimal = train_metadata.metadata_for_save(base, 12, 3, no_metadata=True)
    assert minimal == {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1.0"}
    assert train_metadata.base_model_version(True, True) == "sd_v2_v"
    assert train_metadata.model_name_and_hashes("org/repo-id", "sd_model") == {"ss_sd_model_name": "org/repo-id"}


def test_user_errors_for_missing_backends():
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(UserError, match="--xformers"):
            train_core._set_attention(argparse.Namespace(xformers=True), None, None)
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UserError, match="wandb"):
            train_core._build_accelerator(argparse.Namespace(log_with="wandb", logging_dir=None, mixed_precision="no"))
    with pytest.raises(UserError, match="--logging_dir"):
        train_core._build_accelerator(argparse.Namespace(log_with="tensorboard", logging_dir=None, mixed_precision="no"))
    with pytest.raises(UserError, match="huggingface"):
        train_core._check_core_args(argparse.Namespace(pretrained_model_name_or_path="m", output_dir="o", huggingface_repo_id="a/b"))
