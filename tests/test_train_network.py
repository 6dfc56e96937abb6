"""train_network.py end to end on a tiny SD v1 model: learning, the LoRA file, flags, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
import train_network
from library import model_hash, train_core
from library.cli import run_main
from library.errors import UserError

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_network")
    return {"model": th.make_tiny_model(root), "img": th.make_image_folder(root), "root": root}


def test_loss_falls_over_a_short_run(workspace, tmp_path):
    img = th.make_image_folder(tmp_path, count=2, repeats=1)
    argv = th.base_argv(
        workspace["model"], img, tmp_path / "out", "--max_train_steps", "30", "--learning_rate", "1e-2",
        "--network_dim", "8", "--network_alpha", "8", "--cache_latents", "--network_train_unet_only",
    )
    losses = th.run_train(argv).step_losses
    assert len(losses) == 30 and all(np.isfinite(losses))
    first, last = float(np.mean(losses[:8])), float(np.mean(losses[-8:]))
    assert last < 0.8 * first, (first, last)


def test_lora_file_keys_shapes_alpha_and_metadata(workspace, tmp_path):
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    argv = th.base_argv(
        workspace["model"], workspace["img"], out, "--max_train_steps", "2", "--training_comment", "hello",
        "--logging_dir", str(logs), "--save_every_n_steps", "1", "--save_last_n_steps", "0",
    )
    result = th.run_train(argv)
    path = out / "lora.safetensors"
    assert result.final_model_path == path and path.is_file()
    assert (out / "lora-step00000001.safetensors").is_file()
    tensors = load_file(str(path))
    names = {key.split(".")[0] for key in tensors}
    te_names = [n for n in names if n.startswith("lora_te_")]
    unet_names = [n for n in names if n.startswith("lora_unet_")]
    assert len(te_names) == 3 * 6 and len(unet_names) > 0 and len(names) == len(te_names) + len(unet_names)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tensors[f"{q}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{q}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{q}.alpha"].dim() == 0 and float(tensors[f"{q}.alpha"]) == 2.0
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # the LoRA changed: some up weights are no longer zero
    assert any(tensors[f"{n}.lora_up.weight"].abs().sum() > 0 for n in unet_names)

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_num_train_images"] == "20" and meta["ss_num_reg_images"] == "0"
    assert meta["ss_num_batches_per_epoch"] == "10" and meta["ss_max_train_steps"] == "2"
    assert meta["ss_steps"] == "2" and meta["ss_epoch"] == "1"
    assert meta["ss_training_comment"] == "hello" and meta["ss_seed"] == "42"
    assert meta["ss_output_name"] == "lora" and meta["ss_v2"] == "False" and meta["ss_full_fp16"] == "False"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_total_batch_size"] == "2"
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_sks dog": {"n_repeats": 5, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"])["5_sks dog"]["sks dog"] == 4
    assert meta["ss_sd_model_name"] == workspace["model"].name
    assert meta["ss_sd_model_hash"] == model_hash.model_hash(workspace["model"])
    assert meta["ss_new_sd_model_hash"] == model_hash.calculate_sha256(workspace["model"])
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    # sshs_model_hash is the hash of the file's data section
    with path.open("rb") as stream:
        assert meta["sshs_model_hash"] == model_hash.addnet_hash_safetensors(stream)
    assert len(meta["sshs_legacy_hash"]) == 8
    # tensorboard logs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(logs.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/textencoder", "lr/unet"} <= tags, tags
    assert [e.step for e in accumulator.Scalars("loss/current")] == [1, 2]
    assert accumulator.Scalars("lr/unet")[0].value == pytest.approx(1e-3)


def test_no_metadata_and_pt_format(workspace, tmp_path):
    out = tmp_path / "out"
    argv = th.base_argv(
        workspace["model"], workspace["img"], out, "--max_train_steps", "1", "--no_metadata",
        "--network_args", "conv_dim=2", "conv_alpha=1", "--network_train_unet_only",
    )
    th.run_train(argv)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert set(meta) == {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                         "sshs_model_hash", "sshs_legacy_hash"}
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert not any(k.startswith("lora_te_") for k in keys)
    assert any(k.endswith("conv1.lora_down.weight") for k in keys)  # C3Lier modules exist

    out_pt = tmp_path / "out_pt"
    th.run_train(th.base_argv(workspace["model"], workspace["img"], out_pt, "--max_train_steps", "1", "--save_model_as", "pt"))
    state = torch.load(out_pt / "lora.pt", weights_only=True)
    assert any(k.startswith("lora_te_") for k in state) and all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("caching", [[], ["--cache_latents", "--flip_aug"], ["--cache_latents_to_disk"]])
def test_a_moved_dataset_trains_the_same(workspace, tmp_path, caching):
    """The same images and model in another folder (another path length) give the same LoRA,
    whether latents are encoded per step, cached in memory or cached on disk."""
    weights = []
    for place in ("a", "a_much_longer_place/with/more/levels"):
        root = tmp_path / place
        img = th.make_image_folder(root, count=2, repeats=2)
        out = root / "out"
        th.run_train(th.base_argv(workspace["model"], img, out, "--max_train_steps", "3", *caching))
        weights.append(load_file(str(out / "lora.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_network_weights_continue_exactly(workspace, tmp_path):
    first = tmp_path / "first"
    th.run_train(th.base_argv(workspace["model"], workspace["img"], first, "--max_train_steps", "2"))
    saved = load_file(str(first / "lora.safetensors"))
    seen = {}

    def capture(ctx):
        seen.update(th.network_state(ctx))

    for extra in ([], ["--dim_from_weights", "--network_dim", "8"]):
        seen.clear()
        argv = th.base_argv(
            workspace["model"], workspace["img"], tmp_path / "second", "--max_train_steps", "1",
            "--network_weights", str(first / "lora.safetensors"), *extra,
        )
        th.run_train(argv, train_core.TrainHooks(on_train_start=capture))
        assert seen.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(seen[key], value), key


def test_dim_from_weights_keeps_network_dropout(workspace, tmp_path):
    first = tmp_path / "first"
    th.run_train(th.base_argv(workspace["model"], workspace["img"], first, "--max_train_steps", "1"))
    dropouts = {}

    def capture(ctx):
        network = ctx.accelerator.unwrap_model(ctx.step_module).trainable["network"]
        dropouts.update({name: m.dropout for name, m in network.named_modules() if hasattr(m, "lora_down")})

    argv = th.base_argv(
        workspace["model"], workspace["img"], tmp_path / "second", "--max_train_steps", "1",
        "--network_weights", str(first / "lora.safetensors"), "--dim_from_weights", "--network_dropout", "0.3",
    )
    th.run_train(argv, train_core.TrainHooks(on_train_start=capture))
    assert len(dropouts) > 0 and set(dropouts.values()) == {0.3}


def test_loader_workers_flags_reach_the_loader_and_keep_batches(workspace, tmp_path, monkeypatch):
    from library import datasets

    img = th.make_image_folder(tmp_path, count=4, repeats=1)  # 2 batches per epoch
    loaders = []
    real_make_dataloader = datasets.make_dataloader

    def spy(*args, **kwargs):
        loaders.append(real_make_dataloader(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(datasets, "make_dataloader", spy)
    base = ["--max_train_steps", "100", "--max_train_epochs", "2", "--network_train_unet_only"]
    serial = th.run_train(th.base_argv(workspace["model"], img, tmp_path / "a", *base)).step_losses
    parallel = th.run_train(th.base_argv(
        workspace["model"], img, tmp_path / "b", *base, "--max_data_loader_n_workers", "2",
        "--persistent_data_loader_workers",
    )).step_losses
    assert [(loader.num_workers, loader.persistent_workers) for loader in loaders] == [(0, False), (2, True)]
    assert loaders[1]._iterator is not None  # persistent workers outlived the epochs
    assert len(serial) == 4 and parallel == serial  # same batches, epoch by epoch


def test_config_file_toml_and_cli_override(workspace, tmp_path):
    config = tmp_path / "settings.toml"
    config.write_text(
        f"""
[model]
pretrained_model_name_or_path = "{workspace['model'].as_posix()}"
[dataset]
train_data_dir = "{workspace['img'].as_posix()}"
caption_extension = ".txt"
resolution = "64"
[network]
network_module = "networks.lora"
network_dim = 2
[training]
output_dir = "{(tmp_path / 'out').as_posix()}"
output_name = "from_toml"
max_train_steps = 1
learning_rate = 1e-3
seed = 1
max_data_loader_n_workers = 0
""",
        encoding="utf-8",
    )
    assert run_main(train_network.main, ["--config_file", str(config.with_suffix("")), "--network_dim", "3"]) == 0
    tensors = load_file(str(tmp_path / "out" / "from_toml.safetensors"))
    downs = [v for k, v in tensors.items() if k.endswith("lora_down.weight")]
    assert downs and all(v.shape[0] == 3 for v in downs)  # the command line won over the TOML
    # --output_config writes the command line as TOML and stops without training (exit status 0)
    written = tmp_path / "written"
    with pytest.raises(SystemExit) as stop:
        train_network.main([*th.base_argv(workspace["model"], workspace["img"], tmp_path / "never"),
                            "--config_file", str(written), "--output_config"])
    assert stop.value.code == 0 and not (tmp_path / "never").exists()
    assert 'network_module = "networks.lora"' in written.with_suffix(".toml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--network_train_unet_only", "--network_train_text_encoder_only"], "--network_train_unet_only"),
        (["--full_fp16"], "--full_fp16"),
        (["--network_weights", "missing.safetensors"], "missing.safetensors"),
        (["--output_dir", ""], "--output_dir"),
    ],
)
def test_bad_flag_combination_is_one_line_error(workspace, tmp_path, capsys, extra, needle):
    argv = th.base_argv(workspace["model"], workspace["img"], tmp_path / "out", *extra)
    assert run_main(train_network.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_missing_network_module_is_an_error(workspace, tmp_path):
    argv = th.base_argv(workspace["model"], workspace["img"], tmp_path / "out")
    index = argv.index("--network_module")
    del argv[index:index + 2]
    with pytest.raises(UserError, match="--network_module"):
        th.run_train(argv)


def test_nan_loss_stops_with_clear_error(workspace, tmp_path):
    argv = th.base_argv(
        workspace["model"], workspace["img"], tmp_path / "out", "--max_train_steps", "6",
        "--learning_rate", "1e30", "--max_grad_norm", "0", "--optimizer_type", "SGDNesterov",
    )
    with pytest.raises(UserError, match=r"loss became (nan|inf|-inf) at step \d+"):
        th.run_train(argv)
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_sample_images_size_seed_and_reproducible(workspace, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "sks dog --w 64 --h 64 --d 7 --s 2\nsks dog --w 64 --h 64 --d 7 --s 2\nsks dog --w 96 --h 64 --d 8 --s 2\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    argv = th.base_argv(
        workspace["model"], workspace["img"], out, "--max_train_steps", "2", "--sample_prompts", str(prompts),
        "--sample_every_n_steps", "2", "--sample_at_first", "--sample_sampler", "euler_a",
    )
    with_samples = th.run_train(argv)
    files = sorted((out / "sample").glob("*.png"))
    assert len(files) == 6  # 3 prompts before training and 3 at step 2
    first = [f for f in files if "_e000000_" in f.name]
    at_step = [f for f in files if "_000002_" in f.name]
    assert len(first) == 3 and len(at_step) == 3
    assert all(f.name.startswith("lora_") for f in files)
    by_index = {f.name.split("_")[-2]: f for f in first}
    assert by_index["00"].name.endswith("_7.png") and by_index["02"].name.endswith("_8.png")
    image0, image1, image2 = (np.asarray(Image.open(by_index[i])) for i in ("00", "01", "02"))
    assert image0.shape == (64, 64, 3) and image2.shape == (64, 96, 3)
    assert np.array_equal(image0, image1)  # same prompt and seed => same picture
    # sampling leaves the training stream untouched
    plain = th.run_train(th.base_argv(workspace["model"], workspace["img"], tmp_path / "plain", "--max_train_steps", "2"))
    assert plain.step_losses == with_samples.step_losses
    a, b = load_file(str(out / "lora.safetensors")), load_file(str(tmp_path / "plain" / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_saves_keep_the_last_n(workspace, tmp_path):
    img = th.make_image_folder(tmp_path, count=2, repeats=1)  # one batch per epoch
    out = tmp_path / "out"
    argv = th.base_argv(
        workspace["model"], img, out, "--max_train_epochs", "4", "--save_every_n_epochs", "1",
        "--save_last_n_epochs", "2", "--save_state", "--save_last_n_epochs_state", "1", "--output_name", "net",
    )
    result = th.run_train(argv)
    assert result.global_step == 4
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["net-000002.safetensors", "net-000003.safetensors", "net-000003-state", "net-state",
                            "net.safetensors"])
    with safe_open(str(out / "net-000002.safetensors"), "pt") as f:
        assert f.metadata()["ss_epoch"] == "2" and f.metadata()["ss_steps"] == "2"
    with safe_open(str(out / "net.safetensors"), "pt") as f:
        assert f.metadata()["ss_epoch"] == "4" and f.metadata()["ss_num_epochs"] == "4"
    state = json.loads((out / "net-000003-state" / "train_state.json").read_text(encoding="utf-8"))
    assert (state["global_step"], state["epoch"], state["batch_index"]) == (3, 3, 0)


def test_debug_dataset_shows_batches_without_training(workspace, tmp_path, caplog):
    argv = th.base_argv(workspace["model"], workspace["img"], tmp_path / "out", "--debug_dataset")
    with caplog.at_level("INFO"):
        result = th.run_train(argv)
    assert result.global_step == 0 and not (tmp_path / "out").exists()
    assert "caption: 'sks dog" in caplog.text


def test_debug_dataset_loads_no_model(workspace, tmp_path, caplog, monkeypatch):
    from library import model_util

    def no_model_load(*args, **kwargs):
        raise AssertionError("--debug_dataset must not load the model")

    monkeypatch.setattr(model_util, "load_target_model", no_model_load)
    missing = tmp_path / "no_such_model.safetensors"
    argv = th.base_argv(missing, workspace["img"], tmp_path / "out", "--debug_dataset", "--cache_latents")
    with caplog.at_level("INFO"):
        result = th.run_train(argv)
    assert result.global_step == 0 and result.final_model_path is None and not (tmp_path / "out").exists()
    shown = [line for line in caplog.text.splitlines() if "caption: 'sks dog" in line]
    assert len(shown) == 8 * 2  # 8 batches of 2 images
    assert all("size 64x64" in line and "img" in line for line in shown)
