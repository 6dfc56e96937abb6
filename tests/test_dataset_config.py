"""Dataset config (TOML/JSON) validation, lookup order, and equivalence with the flags."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dataset_fixtures import make_dreambooth_folder, write_text
from library import config_util
from library.config_util import BlueprintGenerator, ConfigSanitizer, generate_dataset_group_by_blueprint, load_user_config
from library.errors import UserError


def _tree(tmp_path: Path) -> Path:
    train = tmp_path / "train"
    make_dreambooth_folder(train, "10_sks dog", [(64, 64), (96, 64), (64, 128)], ["dog, grass", None, "dog, park"], seed=0)
    make_dreambooth_folder(train, "3_cat", [(64, 64), (64, 64)], ["a cat", "another cat"], seed=10)
    make_dreambooth_folder(tmp_path / "reg", "1_dog", [(64, 64)] * 4, None, seed=20)
    return train


def _args(**overrides: object) -> argparse.Namespace:
    values = dict(resolution="64", enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                  train_batch_size=2, caption_extension=".txt", seed=5, prior_loss_weight=0.5)
    values.update(overrides)
    return argparse.Namespace(**values)


def _summary(group: config_util.DatasetGroup) -> dict:
    dataset = group.datasets[0]
    return {
        "images": {Path(k).relative_to(Path(k).parents[1]).as_posix(): (i.caption, i.num_repeats, i.is_reg, i.bucket_reso)
                   for k, i in dataset.image_data.items()},
        "counts": (group.num_train_images, group.num_reg_images, len(group)),
        "buckets": dataset.bucket_manager.resos,
        "batch_size": dataset.batch_size,
    }


def test_toml_and_flags_build_the_same_dataset(tmp_path: Path) -> None:
    train = _tree(tmp_path)
    from_flags = config_util.build_dataset_group(_args(train_data_dir=str(train), reg_data_dir=str(tmp_path / "reg")))
    config = write_text(tmp_path / "ds.toml", f"""
[general]
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{train / "10_sks dog"}'
  num_repeats = 10
  class_tokens = "sks dog"

  [[datasets.subsets]]
  image_dir = '{train / "3_cat"}'
  num_repeats = 3
  class_tokens = "cat"

  [[datasets.subsets]]
  image_dir = '{tmp_path / "reg" / "1_dog"}'
  is_reg = true
  class_tokens = "dog"
""")
    bare = argparse.Namespace(dataset_config=str(config), prior_loss_weight=0.5, seed=5)
    from_config = config_util.build_dataset_group(bare)
    assert _summary(from_config) == _summary(from_flags)
    summary = _summary(from_flags)
    # 36 train (3x10 + 2x3) and 4 reg images; 64x64 bucket: 10+10+3+3+36 = 62 -> 31 batches,
    # 32x96 bucket (the 64x128 image): 10 -> 5 batches
    assert summary["counts"] == (36, 4, 36)
    assert summary["images"]["10_sks dog/img1.png"][0] == "sks dog"  # class tokens when no caption file
    # 4 reg images x repeats balanced up to 36 train images: 9 each
    assert {v[1] for k, v in summary["images"].items() if v[2]} == {9}
    # the same seed gives the same batches
    for index in range(len(from_flags)):
        a, b = from_flags[(1, index)], from_config[(1, index)]
        assert a["captions"] == b["captions"] and a["absolute_paths"] == b["absolute_paths"]
        assert a["loss_weights"].tolist() == b["loss_weights"].tolist()
    weights = {w for i in range(len(from_flags)) for w in from_flags[(0, i)]["loss_weights"].tolist()}
    assert weights == {0.5, 1.0}


def test_lookup_order_subset_dataset_general_args_default(tmp_path: Path) -> None:
    train = _tree(tmp_path)
    user_config = {
        "general": {"keep_tokens": 1, "shuffle_caption": True, "flip_aug": True},
        "datasets": [{"keep_tokens": 2, "resolution": [64, 96], "subsets": [
            {"image_dir": str(train / "3_cat"), "keep_tokens": 3},
            {"image_dir": str(train / "10_sks dog")},
        ]}],
    }
    args = argparse.Namespace(keep_tokens=9, color_aug=True, train_batch_size=4, caption_extension=".txt", flip_aug=False)
    blueprint = BlueprintGenerator(ConfigSanitizer(True, True, True)).generate(user_config, args)
    dataset = blueprint.dataset_group.datasets[0]
    first, second = (s.params for s in dataset.subsets)
    assert (first.keep_tokens, second.keep_tokens) == (3, 2)  # subset > dataset
    assert first.shuffle_caption is True  # general
    assert first.flip_aug is True  # general beats args
    assert first.color_aug is True  # args beat default
    assert first.random_crop is False and first.caption_extension == ".txt"  # default / args
    assert dataset.params.batch_size == 4  # --train_batch_size maps to batch_size
    assert dataset.params.resolution == (64, 96)
    assert first.num_repeats == 1


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"datasets": [{"subsets": [{"image_dir": "x", "colour_aug": True}]}]}, "colour_aug"),
        ({"datasets": [{"subsets": [{"image_dir": "x", "num_repeats": "ten"}]}]}, "num_repeats"),
        ({"general": {"resolution": "512"}}, "resolution"),
        ({"general": {"image_dir": "x"}}, "image_dir"),  # subset-only key at the general level
        ({"datasets": [{"subsets": [{"num_repeats": 2}]}]}, "image_dir"),  # required
        ({"datasets": [{"subsets": [{"image_dir": "x"}, {"metadata_file": "m.json"}]}]}, "mixed"),
        ({"datasets": [{"subsets": [{"image_dir": "x", "face_crop_aug_range": [1.0]}]}]}, "face_crop_aug_range"),
    ],
)
def test_bad_keys_name_key_and_file(config: dict, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UserError) as info:
        BlueprintGenerator(ConfigSanitizer(True, True, True)).generate(load_user_config(path), argparse.Namespace())
    message = str(info.value)
    assert needle in message and "bad.json" in message


def test_script_support_flags_restrict_keys(tmp_path: Path) -> None:
    dropout = {"datasets": [{"subsets": [{"image_dir": "x", "caption_dropout_rate": 0.1}]}]}
    with pytest.raises(UserError, match="caption_dropout_rate"):
        BlueprintGenerator(ConfigSanitizer(True, True, False)).generate(dropout, None)
    BlueprintGenerator(ConfigSanitizer(True, True, True)).generate(dropout, None)
    fine_tune = {"datasets": [{"subsets": [{"metadata_file": "m.json"}]}]}
    with pytest.raises(UserError, match="not supported"):
        BlueprintGenerator(ConfigSanitizer(True, False, True)).generate(fine_tune, None)
    with pytest.raises(UserError, match="class_tokens"):
        BlueprintGenerator(ConfigSanitizer(False, True, True)).generate({"general": {"class_tokens": "x"}}, None)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing.toml"):
        load_user_config(tmp_path / "missing.toml")
    broken = write_text(tmp_path / "broken.toml", "[general\nx = 1")
    with pytest.raises(UserError, match="broken.toml"):
        load_user_config(broken)
    other = write_text(tmp_path / "conf.yaml", "a: 1")
    with pytest.raises(UserError, match="conf.yaml"):
        load_user_config(other)
    missing_dir = write_text(tmp_path / "ds.toml", "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'nowhere/10_x'\n")
    with pytest.raises(UserError) as info:
        config_util.build_dataset_group(argparse.Namespace(dataset_config=str(missing_dir)))
    assert "nowhere" in str(info.value) and "ds.toml" in str(info.value)


def test_flag_errors(tmp_path: Path) -> None:
    train = _tree(tmp_path)
    with pytest.raises(UserError, match="--train_data_dir"):
        config_util.build_dataset_group(_args())
    with pytest.raises(UserError, match="--train_data_dir"):
        config_util.build_dataset_group(_args(train_data_dir=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="--train_batch_size"):
        config_util.build_dataset_group(_args(train_data_dir=str(train), train_batch_size="2"))
    with pytest.raises(UserError, match="--resolution"):
        config_util.build_dataset_group(_args(train_data_dir=str(train), resolution=None))
    with pytest.raises(UserError, match="min_bucket_reso"):
        config_util.build_dataset_group(_args(train_data_dir=str(train), min_bucket_reso=128, max_bucket_reso=256))


def test_legacy_caption_extention_and_folder_without_repeats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train = _tree(tmp_path)
    make_dreambooth_folder(train, "no_repeats", [(64, 64)], ["x"])
    group = config_util.build_dataset_group(_args(train_data_dir=str(train), caption_extension=".caption", caption_extention=".txt"))
    captions = {Path(k).name: i.caption for k, i in group.datasets[0].image_data.items() if "3_cat" in k}
    assert captions == {"img0.png": "a cat", "img1.png": "another cat"}
    assert "no_repeats" in caplog.text and "ignoring folder" in caplog.text
    assert all("no_repeats" not in k for k in group.datasets[0].image_data)


def test_metadata_with_dataset_config(tmp_path: Path) -> None:
    train = _tree(tmp_path)
    config = {"datasets": [
        {"resolution": 64, "subsets": [{"image_dir": str(train / "3_cat"), "num_repeats": 2, "caption_extension": ".txt"}]},
        {"resolution": 64, "batch_size": 3, "subsets": [
            {"image_dir": str(train / "3_cat"), "caption_extension": ".txt"},
            {"image_dir": str(tmp_path / "reg" / "1_dog"), "is_reg": True}]},
    ]}
    blueprint = BlueprintGenerator(ConfigSanitizer(True, True, True)).generate(config, None)
    group = generate_dataset_group_by_blueprint(blueprint, seed=1)
    meta = group.metadata_for_training(uses_dataset_config=True, total_batch_size=3)
    datasets = json.loads(meta["ss_datasets"])
    assert [d["num_train_images"] for d in datasets] == [4, 2]
    assert datasets[1]["batch_size_per_device"] == 3 and datasets[1]["num_reg_images"] == 4
    assert datasets[1]["subsets"][1] == {"img_count": 4, "num_repeats": 1, "color_aug": False, "flip_aug": False,
                                         "random_crop": False, "shuffle_caption": False, "keep_tokens": 0,
                                         "image_dir": "1_dog", "class_tokens": None, "is_reg": True}
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_cat": {"n_repeats": 2, "img_count": 2},
                                                   "3_cat (2)": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"])["3_cat"] == {"a cat": 1, "another cat": 1}
    assert meta["ss_total_batch_size"] == "3" and meta["ss_num_reg_images"] == "4"


def test_fine_tuning_paths_checked(tmp_path: Path) -> None:
    meta = write_text(tmp_path / "meta.json", "{}")
    config = write_text(tmp_path / "ft.toml", f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{meta}'\nimage_dir = '{tmp_path / 'none'}'\n")
    with pytest.raises(UserError) as info:
        config_util.build_dataset_group(argparse.Namespace(dataset_config=str(config)), support_dreambooth=False)
    assert "none" in str(info.value) and "ft.toml" in str(info.value)
    with pytest.raises(UserError, match="--in_json"):
        config_util.build_dataset_group(argparse.Namespace(resolution="64"), support_dreambooth=False)
