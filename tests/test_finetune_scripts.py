"""finetune/ scripts: folder of images + captions + tags -> metadata JSON -> FineTuningDataset."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_fixtures import write_image, write_json, write_text
from finetune import clean_captions_and_tags, merge_captions_to_metadata, merge_dd_tags_to_metadata, prepare_buckets_latents
from library import config_util
from library.captions import clean_caption, clean_tags
from library.cli import run_main


def _folder(tmp_path: Path) -> Path:
    data = tmp_path / "imgs"
    write_image(data / "a.png", 64, 64, 1)
    write_image(data / "b.png", 96, 64, 2)
    write_image(data / "c.jpg", 64, 128, 3)
    write_text(data / "a.caption", "a photo of an anime woman\n")
    write_text(data / "b.caption", "a cartoon drawing of a dog")
    write_text(data / "a.txt", "1girl, long_hair, white_shirt, shirt, ^_^")
    write_text(data / "c.txt", "cat, rating:safe")
    return data


def test_merge_scripts_build_metadata(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    meta = tmp_path / "meta.json"
    merge_captions_to_metadata.main([str(data), str(meta)])
    assert json.loads(meta.read_text(encoding="utf-8")) == {
        "a": {"caption": "a photo of an anime woman"},
        "b": {"caption": "a cartoon drawing of a dog"},
    }
    # out_json exists: it is read as in_json by default, tags merge into the same entries
    merge_dd_tags_to_metadata.main([str(data), str(meta)])
    merged = json.loads(meta.read_text(encoding="utf-8"))
    assert merged["a"] == {"caption": "a photo of an anime woman", "tags": "1girl, long_hair, white_shirt, shirt, ^_^"}
    assert merged["b"] == {"caption": "a cartoon drawing of a dog"}
    assert merged["c"] == {"tags": "cat, rating:safe"}
    clean = tmp_path / "clean.json"
    clean_captions_and_tags.main([str(meta), str(clean)])
    cleaned = json.loads(clean.read_text(encoding="utf-8"))
    assert cleaned["a"] == {"caption": "a photo of an girl", "tags": "1girl, long hair, white shirt, ^_^"}
    assert cleaned["b"]["caption"] == "a drawing of a dog"
    assert cleaned["c"] == {"tags": "cat"}


def test_full_path_keys_and_recursive_needs_full_path(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    meta = tmp_path / "m.json"
    merge_captions_to_metadata.main([str(data), str(meta), "--full_path"])
    keys = set(json.loads(meta.read_text(encoding="utf-8")))
    assert keys == {str(data / "a.png"), str(data / "b.png")}
    assert run_main(merge_captions_to_metadata.main, [str(data), str(meta), "--recursive"]) == 1


def test_clean_tags_rules() -> None:
    # several people: per-person attributes given more than once are dropped, a shared hair length stays
    assert clean_tags("k", "2girls, long_hair, blonde_hair, black_hair, blue_eyes, red_eyes, smile") == "2girls, long hair, smile"
    # single person: nothing is dropped except the redundant plain word
    assert clean_tags("k", "1girl, blonde_hair, blue_eyes, skirt, pleated_skirt") == "1girl, blonde hair, blue eyes, pleated skirt"
    assert clean_tags("k", "smile, rating:safe, rating:general") == "smile"
    assert clean_caption("anime anime anime girl with a young lady") == "girl with a girl"


def test_unreadable_metadata_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = write_text(tmp_path / "bad.json", "{not json")
    assert run_main(clean_captions_and_tags.main, [str(bad), str(tmp_path / "out.json")]) == 1
    assert "bad.json" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_prepare_buckets_latents_and_finetuning_dataset(tmp_path: Path, tiny_models_v1: tuple) -> None:
    from library.tiny_sd import write_tiny_model

    model_paths = write_tiny_model(tmp_path / "model", v2=False, formats=["safetensors"])
    data = _folder(tmp_path)
    meta = tmp_path / "meta.json"
    merge_captions_to_metadata.main([str(data), str(meta)])
    merge_dd_tags_to_metadata.main([str(data), str(meta)])
    out = tmp_path / "meta_lat.json"
    prepare_buckets_latents.main([
        str(data), str(meta), str(out), str(model_paths["safetensors"]), "--max_resolution", "64,64",
        "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--batch_size", "2", "--flip_aug",
    ])
    final = json.loads(out.read_text(encoding="utf-8"))
    # buckets for 64x64 / 32 / 128 / 32: 32x128 32x96 64x64 96x32 128x32;
    # 96x64 (AR 1.5) -> 64x64 (error 0.5 < 1.5), 64x128 (AR 0.5) -> 32x96 (error 0.17 < 0.25)
    assert final["a"]["train_resolution"] == [64, 64]
    assert final["b"]["train_resolution"] == [64, 64]
    assert final["c"]["train_resolution"] == [32, 96]
    for stem, hw in (("a", (8, 8)), ("b", (8, 8)), ("c", (12, 4))):
        for suffix in ("", "_flip"):
            with np.load(data / f"{stem}{suffix}.npz") as npz:
                assert list(npz.keys()) == ["arr_0"]
                assert npz["arr_0"].shape == (4, *hw) and npz["arr_0"].dtype == np.float32
    args = argparse.Namespace(in_json=str(out), train_data_dir=str(data), resolution="64", train_batch_size=1, flip_aug=True)
    group = config_util.build_dataset_group(args, support_dreambooth=False, seed=3)
    dataset = group.datasets[0]
    assert not dataset.is_dreambooth and dataset.enable_bucket
    assert {k: i.caption for k, i in dataset.image_data.items()} == {
        "a": "a photo of an anime woman, 1girl, long_hair, white_shirt, shirt, ^_^",
        "b": "a cartoon drawing of a dog",
        "c": "cat, rating:safe",
    }
    assert dataset.tag_frequency["meta_lat.json"]["cat"] == 1
    assert all(i.npz_prepared for i in dataset.image_data.values())
    batches = [group[(0, i)] for i in range(len(group))]
    assert len(batches) == 3 and all(b["images"] is None for b in batches)
    shapes = sorted(tuple(b["latents"].shape) for b in batches)
    assert shapes == [(1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 12, 4)]
    # the batch latents are the stored ones (plain or flipped)
    for batch in batches:
        stem = Path(batch["absolute_paths"][0]).stem
        plain = torch.from_numpy(np.load(data / f"{stem}.npz")["arr_0"])
        flipped = torch.from_numpy(np.load(data / f"{stem}_flip.npz")["arr_0"])
        assert torch.equal(batch["latents"][0], plain) or torch.equal(batch["latents"][0], flipped)
    # --skip_existing keeps npz files whose shape fits the bucket
    stamps = {p.name: p.stat().st_mtime_ns for p in data.glob("*.npz")}
    prepare_buckets_latents.main([
        str(data), str(meta), str(out), str(model_paths["safetensors"]), "--max_resolution", "64,64",
        "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--flip_aug", "--skip_existing",
    ])
    assert {p.name: p.stat().st_mtime_ns for p in data.glob("*.npz")} == stamps
    # without --flip_aug the stale _flip.npz files are removed
    prepare_buckets_latents.main([
        str(data), str(meta), str(out), str(model_paths["safetensors"]), "--max_resolution", "64,64",
        "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
    ])
    assert not list(data.glob("*_flip.npz"))


def test_prepare_buckets_missing_metadata(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _folder(tmp_path)
    code = run_main(prepare_buckets_latents.main, [str(data), str(tmp_path / "nope.json"), str(tmp_path / "o.json"), "model"])
    assert code == 1 and "nope.json" in capsys.readouterr().err


def test_metadata_without_train_resolution_uses_images(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    meta = write_json(tmp_path / "m.json", {"a": {"caption": "x"}, "b": {"tags": "y, z"}, "missing": {"caption": "gone"}})
    args = argparse.Namespace(in_json=str(meta), train_data_dir=str(data), resolution="64,64", enable_bucket=True,
                              min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    group = config_util.build_dataset_group(args, support_dreambooth=False, seed=0)
    dataset = group.datasets[0]
    assert set(dataset.image_data) == {"a", "b"}  # "missing" is skipped with a warning
    assert dataset.image_data["b"].caption == "y, z"
    assert group.num_train_images == 2
