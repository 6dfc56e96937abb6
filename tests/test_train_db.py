"""train_db.py end to end on the tiny SD v1 model: learning, the text-encoder stop, prior loss,
saved models, exact resume, the documented example and bad input."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
import train_db
from library import train_core, train_util
from library.cli import run_main
from library.model_util import load_target_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_db")
    img = th.make_image_folder(root, count=2, repeats=1)
    reg = root / "reg" / "1_dog"
    reg.mkdir(parents=True)
    for index in range(2):  # regularisation images: other pictures of the class
        shutil.copy(next((img / "1_sks dog").glob(f"img{index}.png")), reg / f"reg{index}.png")
        (reg / f"reg{index}.txt").write_text("dog", encoding="utf-8")
    return {"model": th.make_tiny_model(root), "img": img, "reg": root / "reg", "root": root}


def db_argv(ws: dict, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(ws["model"]),
        "--train_data_dir", str(ws["img"]),
        "--caption_extension", ".txt",
        "--resolution", "64",
        "--output_dir", str(out),
        "--output_name", "db",
        "--learning_rate", "1e-3",
        "--optimizer_type", "AdamW",
        "--train_batch_size", "2",
        "--max_train_steps", "4",
        "--seed", "42",
        "--max_data_loader_n_workers", "0",
        *extra,
    ]


def run(argv, hooks=None, method_wrapper=None) -> train_core.TrainResult:
    args = train_util.parse_args_with_config(train_db.setup_parser(), argv)
    method = train_db.make_method(args)
    if method_wrapper is not None:
        method_wrapper(method)
    return train_core.run_training(args, method, hooks)


def _param(module: torch.nn.Module, suffix: str) -> torch.Tensor:
    return next(p for n, p in module.named_parameters() if n.endswith(suffix))


def test_loss_falls_and_the_saved_model_is_the_trained_one(workspace, tmp_path):
    seen = {}
    argv = db_argv(workspace, tmp_path / "out", "--max_train_steps", "16", "--cache_latents", "--stop_text_encoder_training", "-1")
    result = run(argv, train_core.TrainHooks(on_train_end=lambda ctx: seen.update(unet=copy.deepcopy(ctx.models.unet))))
    losses = result.step_losses
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert float(np.mean(losses[-5:])) < 0.8 * float(np.mean(losses[:5])), losses
    # input .safetensors => output .safetensors; it holds the trained U-Net, the text encoder unchanged
    saved = load_target_model(tmp_path / "out" / "db.safetensors")
    base = load_target_model(workspace["model"])
    for key, value in seen["unet"].state_dict().items():
        assert torch.equal(saved.unet.state_dict()[key], value), key
    assert not torch.equal(saved.unet.conv_in.weight, base.unet.conv_in.weight)
    for key, value in base.text_encoder.state_dict().items():
        assert torch.equal(saved.text_encoder.state_dict()[key], value), key


def test_stop_text_encoder_training_freezes_it_at_that_step(workspace, tmp_path):
    snapshots, optimizer_sizes = [], []

    def wrap(method):
        original = method.on_step_end

        def on_step_end(ctx):
            original(ctx)
            te, unet = ctx.models.text_encoder, ctx.models.unet
            snapshots.append((_param(te, "final_layer_norm.weight").detach().clone(), unet.conv_in.weight.detach().clone()))
            te_ids = {id(p) for p in te.parameters()}
            inner = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
            optimizer_sizes.append((
                sum(1 for p in inner.state if id(p) in te_ids),
                sum(1 for g in inner.param_groups for p in g["params"] if id(p) in te_ids),
                sum(1 for p in te.parameters() if p.grad is not None or p.requires_grad),
            ))
        method.on_step_end = on_step_end

    out = tmp_path / "out"
    run(db_argv(workspace, out, "--stop_text_encoder_training", "2", "--learning_rate_te", "5e-3"), method_wrapper=wrap)
    base_te = load_target_model(workspace["model"]).text_encoder
    te_values = [s[0] for s in snapshots]
    unet_values = [s[1] for s in snapshots]
    assert not torch.equal(te_values[0], _param(base_te, "final_layer_norm.weight"))  # trained at step 1
    assert not torch.equal(te_values[0], te_values[1])  # ... and step 2
    assert torch.equal(te_values[1], te_values[2]) and torch.equal(te_values[2], te_values[3])  # frozen after step 2
    assert not torch.equal(unet_values[2], unet_values[3])  # the U-Net keeps training
    te_count = len(list(base_te.parameters()))
    assert optimizer_sizes[0] == (te_count, te_count, te_count)
    assert all(size == (0, 0, 0) for size in optimizer_sizes[1:])  # no optimizer memory after the stop
    saved = load_target_model(out / "db.safetensors")
    assert torch.equal(_param(saved.text_encoder, "final_layer_norm.weight"), te_values[1])


def test_prior_loss_weight_scales_the_regularisation_loss(workspace, tmp_path):
    """One batch = one train + one reg image: loss(w) = (l_train + w * l_reg) / 2, linear in w."""
    first = {}
    for weight in ("0", "1", "3"):
        argv = db_argv(workspace, tmp_path / f"w{weight}", "--reg_data_dir", str(workspace["reg"]),
                       "--prior_loss_weight", weight, "--max_train_steps", "1", "--learning_rate", "0",
                       "--save_model_as", "diffusers")
        first[weight] = run(argv).step_losses[0]
    slope = first["1"] - first["0"]
    assert slope > 1e-4
    assert first["3"] == pytest.approx(first["0"] + 3 * slope, rel=1e-4)
    # the Diffusers output of a run loads in diffusers and here
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "w1" / "db"
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    ours = load_target_model(folder)
    assert torch.equal(pipe.unet.conv_in.weight, ours.unet.conv_in.weight)


@pytest.mark.parametrize("stop_te", ["3", "1"], ids=["te_stops_after_the_resume", "state_saved_after_te_stopped"])
def test_kill_and_resume_is_bit_identical(workspace, tmp_path, stop_te):
    extra = ["--save_state", "--save_every_n_steps", "2", "--stop_text_encoder_training", stop_te, "--max_train_steps", "4",
             "--train_batch_size", "1", "--flip_aug"]
    full = run(db_argv(workspace, tmp_path / "full", *extra))
    stopped_dir = tmp_path / "stopped"
    stopped = run(db_argv(workspace, stopped_dir, *extra), train_core.TrainHooks(stop_after_step=2))
    assert stopped.stopped_early and not (stopped_dir / "db.safetensors").exists()
    resumed = run(db_argv(workspace, stopped_dir, *extra, "--resume", str(stopped_dir / "db-step00000002-state")))
    assert resumed.step_losses == full.step_losses[2:]
    a = load_target_model(tmp_path / "full" / "db.safetensors")
    b = load_target_model(stopped_dir / "db.safetensors")
    for part in ("unet", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert (tmp_path / "full" / "db-step00000002.safetensors").is_file()


def test_documented_demo_config_runs(tmp_path, monkeypatch):
    """docs/train_db.md's worked example: the demo TOML (DreamBooth folders + reg images)."""
    doc = (REPO / "docs" / "train_db.md").read_text(encoding="utf-8")
    assert "--config_file examples/db_demo/db_demo.toml" in doc
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    from library.tiny_sd import write_tiny_model

    model = write_tiny_model(tmp_path, formats=("safetensors",))["safetensors"]
    result = run([
        "--config_file", "examples/db_demo/db_demo.toml", "--pretrained_model_name_or_path", str(model),
        "--output_dir", str(out), "--max_train_epochs", "1", "--stop_text_encoder_training", "2", "--logging_dir", str(tmp_path / "logs"),
    ])
    assert result.global_step > 0 and all(np.isfinite(result.step_losses))
    assert (out / "demo_db.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--stop_text_encoder_training", "10"], "--stop_text_encoder_training 10 is greater than the number of training steps (4)"),
        (["--save_model_as", "diffusers"], "is an existing file; a Diffusers model is a folder"),
    ],
)
def test_bad_input_is_one_line_and_keeps_outputs(workspace, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "db").write_text("keep me", encoding="utf-8")
    assert run_main(train_db.main, db_argv(workspace, out, *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
    assert (out / "db").read_text(encoding="utf-8") == "keep me"


def test_every_flag_is_documented():
    import re

    text = "".join((REPO / "docs" / name).read_text(encoding="utf-8") for name in ("train_db.md", "training.md"))
    documented = set(re.findall(r"--[a-z0-9_]+", text))
    flags = {o for a in train_db.setup_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert not flags - documented, sorted(flags - documented)


def test_sd_scripts_names_import_from_train_util():
    from library import buckets, datasets, model_util, tokenizer_util
    from library.train_util import (  # noqa: F401 - the import itself is what scripts written for sd-scripts do
        BucketManager, DatasetGroup, DreamBoothDataset, FineTuningDataset, add_sd_models_arguments, load_tokenizer,
    )

    assert DreamBoothDataset is datasets.DreamBoothDataset and FineTuningDataset is datasets.FineTuningDataset
    assert DatasetGroup is datasets.DatasetGroup and BucketManager is buckets.BucketManager
    assert load_tokenizer is tokenizer_util.load_tokenizer and train_util.load_target_model is model_util.load_target_model
    with pytest.raises(AttributeError):
        train_util.NoSuchThing  # noqa: B018


def test_no_token_padding_encodes_unpadded_captions(workspace, tmp_path):
    lengths = {}

    def probe(ctx):
        encode = ctx.accelerator.unwrap_model(ctx.step_module)._encode_text
        with torch.no_grad():
            lengths["short"] = encode(["sks dog"]).shape[1]
            lengths["pair"] = encode(["sks dog", "sks dog, red, sitting"]).shape[1]
        lengths["ids"] = len(ctx.models.tokenizer("sks dog").input_ids)  # BOS sks dog EOS

    # the text encoder is frozen (-1): unpadded states are then not cached per caption either
    argv = db_argv(workspace, tmp_path / "out", "--no_token_padding", "--stop_text_encoder_training", "-1", "--max_train_steps", "2")
    result = run(argv, train_core.TrainHooks(on_train_start=probe))
    assert result.global_step == 2 and all(np.isfinite(result.step_losses))
    assert lengths["short"] == lengths["ids"] < 77  # not padded to 77
    assert lengths["pair"] > lengths["short"]  # padded to the batch's longest caption
