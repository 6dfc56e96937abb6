"""fine_tune.py end to end on the tiny SD v1 model: metadata JSON (stem / full-path keys, prepared
.npz latents or plain images), --train_text_encoder, the documented example, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
import fine_tune
from finetune import merge_captions_to_metadata, prepare_buckets_latents
from library import train_core, train_util
from library.cli import run_main
from library.model_util import load_target_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Images with .caption files -> meta.json (stem keys) -> meta_lat.json with buckets and .npz."""
    root = tmp_path_factory.mktemp("fine_tune")
    model = th.make_tiny_model(root)
    folder = th.make_image_folder(root, count=2, repeats=1) / "1_sks dog"
    data = root / "data"
    shutil.copytree(folder, data)
    for txt in data.glob("*.txt"):
        txt.rename(txt.with_suffix(".caption"))
    meta = root / "meta.json"
    merge_captions_to_metadata.main([str(data), str(meta)])
    lat_data = root / "lat_data"
    shutil.copytree(data, lat_data)
    meta_lat = root / "meta_lat.json"
    prepare_buckets_latents.main([
        str(lat_data), str(meta), str(meta_lat), str(model), "--max_resolution", "64,64",
        "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
    ])
    return {"model": model, "data": data, "meta": meta, "lat_data": lat_data, "meta_lat": meta_lat, "root": root}


def ft_argv(ws: dict, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(ws["model"]),
        "--output_dir", str(out), "--output_name", "ft",
        "--resolution", "64",
        "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
        "--train_batch_size", "2", "--max_train_steps", "3", "--seed", "42",
        "--max_data_loader_n_workers", "0",
        *extra,
    ]


def run(argv, hooks=None) -> train_core.TrainResult:
    return fine_tune.train(train_util.parse_args_with_config(fine_tune.setup_parser(), argv), hooks)


def test_prepared_latents_loss_falls_and_text_encoder_stays(workspace, tmp_path):
    used = {}

    def record(ctx):
        used["npz"] = all(info.npz_prepared for ds in ctx.dataset_group.datasets for info in ds.image_data.values())

    argv = ft_argv(workspace, tmp_path / "out", "--in_json", str(workspace["meta_lat"]), "--train_data_dir",
                   str(workspace["lat_data"]), "--max_train_steps", "16", "--dataset_repeats", "2")
    result = run(argv, train_core.TrainHooks(on_train_start=record))
    assert used["npz"]  # the .npz latents of prepare_buckets_latents.py, no VAE encoding
    losses = result.step_losses
    assert len(losses) == 16 and float(np.mean(losses[-5:])) < 0.8 * float(np.mean(losses[:5])), losses
    saved = load_target_model(tmp_path / "out" / "ft.safetensors")
    base = load_target_model(workspace["model"])
    assert not torch.equal(saved.unet.conv_in.weight, base.unet.conv_in.weight)
    for key, value in base.text_encoder.state_dict().items():  # no --train_text_encoder
        assert torch.equal(saved.text_encoder.state_dict()[key], value), key


def test_full_path_keys_images_only_train_text_encoder_ckpt(workspace, tmp_path):
    meta = json.loads(workspace["meta"].read_text(encoding="utf-8"))
    full = {str(workspace["data"] / f"{key}.png"): value for key, value in meta.items()}
    in_json = tmp_path / "meta_full.json"
    in_json.write_text(json.dumps(full), encoding="utf-8")
    argv = ft_argv(workspace, tmp_path / "out", "--in_json", str(in_json), "--train_text_encoder",
                   "--learning_rate_te", "1e-3", "--save_model_as", "ckpt", "--save_precision", "fp16")
    result = run(argv)
    assert result.global_step == 3
    saved = torch.load(tmp_path / "out" / "ft.ckpt", weights_only=True)
    assert all(t.dtype == torch.float16 for t in saved["state_dict"].values() if t.is_floating_point())
    again = load_target_model(tmp_path / "out" / "ft.ckpt")
    base = load_target_model(workspace["model"])
    key = next(k for k in base.text_encoder.state_dict() if k.endswith("final_layer_norm.weight"))
    assert not torch.equal(again.text_encoder.state_dict()[key], base.text_encoder.state_dict()[key].half().float())


def test_documented_dataset_config_example_runs(workspace, tmp_path, monkeypatch):
    """docs/fine_tune.md's worked example: --config_file TOML + --dataset_config with metadata_file."""
    doc = (REPO / "docs" / "fine_tune.md").read_text(encoding="utf-8")
    assert "--config_file examples/fine_tune_demo/fine_tune_demo.toml" in doc
    monkeypatch.chdir(REPO)
    result = run([
        "--config_file", "examples/fine_tune_demo/fine_tune_demo.toml",
        "--pretrained_model_name_or_path", str(workspace["model"]),
        "--output_dir", str(tmp_path / "demo"), "--max_train_epochs", "1", "--logging_dir", str(tmp_path / "logs"),
    ])
    assert result.global_step > 0 and all(np.isfinite(result.step_losses))
    assert (tmp_path / "demo" / "demo_ft").is_dir()  # save_model_as = "diffusers" in the demo


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no_json", "--in_json is required"),
        ("missing_json", "not found"),
        ("missing_image", "image 'ghost' not found"),
    ],
)
def test_bad_metadata_is_one_line(workspace, tmp_path, capsys, case, needle):
    extra: list[str] = []
    if case == "missing_json":
        extra = ["--in_json", str(tmp_path / "nope.json")]
    elif case == "missing_image":
        meta = json.loads(workspace["meta"].read_text(encoding="utf-8"))
        meta["ghost"] = {"caption": "nothing"}
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(meta), encoding="utf-8")
        extra = ["--in_json", str(bad), "--train_data_dir", str(workspace["data"])]
    assert run_main(fine_tune.main, ft_argv(workspace, tmp_path / "out", *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err[-1]
    assert not (tmp_path / "out").exists()


def test_every_flag_is_documented():
    import re

    names = ("fine_tune.md", "train_db.md", "training.md")  # fine_tune.md points to train_db.md for saving
    text = "".join((REPO / "docs" / name).read_text(encoding="utf-8") for name in names)
    documented = set(re.findall(r"--[a-z0-9_]+", text))
    flags = {o for a in fine_tune.setup_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert not flags - documented, sorted(flags - documented)
