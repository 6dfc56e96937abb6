"""DreamBooth / fine-tuning datasets: batches, augmentation, bad input, DataLoader keys."""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_fixtures import image_array, make_dreambooth_folder, write_image, write_json, write_text
from library import config_util
from library.datasets import EpochBatchSampler, debug_dataset, make_dataloader
from library.errors import UserError
from library.image_util import to_model_tensor


def _args(train: Path, **overrides: object) -> argparse.Namespace:
    values = dict(train_data_dir=str(train), resolution="64", enable_bucket=True, min_bucket_reso=32,
                  max_bucket_reso=128, bucket_reso_steps=32, train_batch_size=2, caption_extension=".txt", seed=11)
    values.update(overrides)
    return argparse.Namespace(**values)


def _group(train: Path, **overrides: object) -> config_util.DatasetGroup:
    return config_util.build_dataset_group(_args(train, **overrides))


@pytest.fixture()
def train_dir(tmp_path: Path) -> Path:
    train = tmp_path / "train"
    make_dreambooth_folder(train, "3_sks dog", [(64, 64), (96, 64), (64, 128), (64, 64)],
                           ["dog, grass, sun", "dog, park", "dog, tall", "dog, night"], seed=0)
    make_dreambooth_folder(train, "2_cat", [(64, 64), (144, 48)], ["cat, sofa", "cat, wide"], seed=10)
    return train


def test_batches_one_bucket_each_and_cover_every_repeat(train_dir: Path) -> None:
    group = _group(train_dir)
    dataset = group.datasets[0]
    # buckets (64 px, 32-px steps): 32x96 32x128 64x64 96x32 128x32
    # 64x64 <- 3 squares + 96x64 (AR 1.5); 32x96 <- 64x128 (AR 0.5); 96x32 <- 144x48 (AR 3, exact)
    assert dataset.bucket_manager.resos == [(32, 96), (64, 64), (96, 32)]
    # 32x96: 3 repeats -> 2 batches; 64x64: 3x3 + 2 = 11 -> 6 batches; 96x32: 2 -> 1 batch
    assert len(group) == 9 and group.num_train_images == 16
    seen: Counter = Counter()
    for index in range(len(group)):
        batch = group[(0, index)]
        assert batch["latents"] is None
        images = batch["images"]
        assert images.dtype == torch.float32 and images.shape[1] == 3
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert len(batch["captions"]) == len(batch["absolute_paths"]) == images.shape[0] <= 2
        assert batch["loss_weights"].tolist() == [1.0] * images.shape[0]
        seen.update(Path(p).parent.name + "/" + Path(p).name for p in batch["absolute_paths"])
    assert seen == Counter({f"3_sks dog/img{i}.png": 3 for i in range(4)} | {f"2_cat/img{i}.png": 2 for i in range(2)})


def test_order_deterministic_per_seed_and_differs_across_epochs(train_dir: Path) -> None:
    first, second = _group(train_dir, shuffle_caption=True), _group(train_dir, shuffle_caption=True)

    def epoch(group: config_util.DatasetGroup, e: int) -> list:
        return [(group[(e, i)]["absolute_paths"], group[(e, i)]["captions"]) for i in range(len(group))]

    assert epoch(first, 0) == epoch(second, 0)
    assert epoch(first, 0) != epoch(first, 1)
    other_seed = _group(train_dir, shuffle_caption=True, seed=12)
    assert epoch(other_seed, 0) != epoch(first, 0)
    assert torch.equal(first[(2, 3)]["images"], second[(2, 3)]["images"])


def test_center_crop_matches_bucket_rules(tmp_path: Path) -> None:
    path = write_image(tmp_path / "t" / "1_x" / "wide.png", 160, 64, seed=3)
    group = _group(tmp_path / "t", train_batch_size=1)
    batch = group[(0, 0)]
    assert batch["images"].shape == (1, 3, 32, 96)
    # 160x64 (AR 2.5) -> bucket 96x32 (AR 3, error 0.5 vs 1.5 for 64x64 / 128x32);
    # AR below the bucket's: match widths, scale 0.6 -> 96x38 (38.4 rounded), centre crop 3 rows off the top
    import cv2

    expected = cv2.resize(image_array(160, 64, 3), (96, 38), interpolation=cv2.INTER_AREA)[3:35]
    assert torch.allclose(batch["images"][0], to_model_tensor(expected))
    assert Path(batch["absolute_paths"][0]) == path


def test_flip_color_and_random_crop_augment_deterministically(tmp_path: Path) -> None:
    write_image(tmp_path / "t" / "8_x" / "a.png", 64, 64, seed=5)
    plain = _group(tmp_path / "t", train_batch_size=1)
    flipped_group = _group(tmp_path / "t", train_batch_size=1, flip_aug=True)
    base = plain[(0, 0)]["images"][0]
    outcomes = []
    for i in range(8):
        image = flipped_group[(0, i)]["images"][0]
        outcomes.append("flip" if torch.equal(image, base.flip(-1)) else "same" if torch.equal(image, base) else "other")
    assert set(outcomes) == {"flip", "same"}
    color = _group(tmp_path / "t", train_batch_size=1, color_aug=True)
    changed = [not torch.equal(color[(e, 0)]["images"][0], base) for e in range(12)]
    assert any(changed) and not all(changed)  # p = 0.33 per item
    assert torch.equal(color[(3, 0)]["images"], _group(tmp_path / "t", train_batch_size=1, color_aug=True)[(3, 0)]["images"])
    # no bucketing, image larger than the resolution: random 32x32 windows of the full image
    crop = _group(tmp_path / "t", train_batch_size=1, enable_bucket=False, resolution="32", random_crop=True)
    full = to_model_tensor(image_array(64, 64, 5))
    windows = set()
    for e in range(6):
        image = crop[(e, 0)]["images"][0]
        assert image.shape == (3, 32, 32)
        matches = [(t, l) for t in range(33) for l in range(33) if torch.equal(full[:, t:t + 32, l:l + 32], image)]
        assert matches
        windows.add(matches[0])
    assert len(windows) > 1


def test_face_crop_centres_the_face(tmp_path: Path) -> None:
    image = np.zeros((128, 128, 3), np.uint8)
    image[80:100, 20:40] = 255  # the "face" at cx=30, cy=90, 20x20
    from PIL import Image

    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    Image.fromarray(image).save(folder / "p_30_90_20_20.png")
    write_text(folder / "p.txt", "face caption")
    group = _group(tmp_path / "t", enable_bucket=False, resolution="32", face_crop_aug_range="2.0,2.0", train_batch_size=1)
    batch = group[(0, 0)]
    assert batch["captions"] == ["face caption"]  # caption file without the face suffix
    crop = batch["images"][0]
    assert crop.shape == (3, 32, 32)
    # face 20 px, range 2.0: scale = 32 / (20 * 2) = 0.8 -> face 16 px around the centre of the crop
    bright = (crop[0] > 0).nonzero()
    centre = bright.float().mean(0)
    assert abs(centre[0].item() - 15.5) <= 2 and abs(centre[1].item() - 15.5) <= 2
    assert 12 <= bright[:, 0].max() - bright[:, 0].min() + 1 <= 18


def test_reg_images_prior_loss_weight(tmp_path: Path) -> None:
    make_dreambooth_folder(tmp_path / "t", "5_dog", [(64, 64)] * 2, ["sks dog"] * 2)
    make_dreambooth_folder(tmp_path / "r", "1_dog", [(64, 64)] * 3, None, seed=30)
    group = _group(tmp_path / "t", reg_data_dir=str(tmp_path / "r"), prior_loss_weight=0.25, train_batch_size=1)
    reg = {k: i.num_repeats for k, i in group.datasets[0].image_data.items() if i.is_reg}
    # 10 train images with repeats: 3 reg on the first pass, then +1 per pass until 10 -> 4, 3, 3
    assert sorted(reg.values()) == [3, 3, 4]
    assert group.num_reg_images == 3 and group.num_train_images == 10 and len(group) == 20
    weights = Counter()
    for i in range(len(group)):
        batch = group[(0, i)]
        weights[(batch["captions"][0], batch["loss_weights"][0].item())] += 1
    assert weights == Counter({("sks dog", 1.0): 10, ("dog", 0.25): 10})


def test_bad_images_are_skipped_with_a_named_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "t" / "2_x"
    write_image(folder / "good.png", 64, 64)
    (folder / "garbage.png").write_bytes(b"not an image at all")
    good_bytes = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    write_image(folder / "tiny.png", 20, 20)
    with caplog.at_level(logging.WARNING):
        group = _group(tmp_path / "t", bucket_no_upscale=True, train_batch_size=1)
    names = {Path(k).name for k in group.datasets[0].image_data}
    assert names == {"good.png"}
    for name in ("garbage.png", "truncated.png", "tiny.png"):
        assert name in caplog.text
    assert group.datasets[0].subsets[0].img_count == 1 and group.num_train_images == 2


def test_truncated_jpeg_skipped_or_named_when_it_breaks_later(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "t" / "1_x"
    path = write_image(folder / "photo.jpg", 64, 64)
    write_image(folder / "other.jpg", 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    group = _group(tmp_path / "t", train_batch_size=1)
    assert "photo.jpg" in caplog.text and len(group) == 1
    # an image damaged after the scan fails with its name, not a PIL traceback
    other = folder / "other.jpg"
    other.write_bytes(other.read_bytes()[:300])
    with pytest.raises(UserError, match="other.jpg"):
        group[(0, 0)]


def test_bad_folders_and_captions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "t" / "3_empty").mkdir(parents=True)
    with pytest.raises(UserError, match="no training images"):
        _group(tmp_path / "t")
    assert "3_empty" in caplog.text
    make_dreambooth_folder(tmp_path / "u", "1_x", [(64, 64)], [""])
    with pytest.raises(UserError, match=r"img0\.txt.*empty"):
        _group(tmp_path / "u")
    bad_json = write_text(tmp_path / "meta.json", "{broken")
    with pytest.raises(UserError, match="meta.json"):
        config_util.build_dataset_group(argparse.Namespace(in_json=str(bad_json), resolution="64"), support_dreambooth=False)
    listed = write_json(tmp_path / "list.json", ["a", "b"])
    with pytest.raises(UserError, match="list.json"):
        config_util.build_dataset_group(argparse.Namespace(in_json=str(listed), resolution="64"), support_dreambooth=False)


def test_small_image_without_buckets_is_upscaled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_image(tmp_path / "t" / "1_x" / "small.png", 32, 48)
    group = _group(tmp_path / "t", enable_bucket=False, resolution="64", train_batch_size=1)
    assert "small.png" in caplog.text and "upscaled" in caplog.text
    assert group[(0, 0)]["images"].shape == (1, 3, 64, 64)


def test_epoch_batch_sampler_sharding_and_resume() -> None:
    assert list(EpochBatchSampler(5, epoch=2)) == [(2, i) for i in range(5)]
    assert list(EpochBatchSampler(5, epoch=0, start=3)) == [(0, 3), (0, 4)]
    rank0 = list(EpochBatchSampler(5, 1, 0, rank=0, world_size=2))
    rank1 = list(EpochBatchSampler(5, 1, 0, rank=1, world_size=2))
    assert rank0 == [(1, 0), (1, 2), (1, 4)]
    assert rank1 == [(1, 1), (1, 3), (1, 0)]  # equal counts: the short rank repeats an early batch
    sampler = EpochBatchSampler(4, 0)
    sampler.set_epoch(3, start=1)
    assert list(sampler) == [(3, 1), (3, 2), (3, 3)] and len(sampler) == 3


def _collect(loader: torch.utils.data.DataLoader) -> list:
    return [(key, b["absolute_paths"], b["captions"], b["images"]) for key, b in loader]


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        ka == kb and pa == pb and ca == cb and torch.equal(ia, ib) for (ka, pa, ca, ia), (kb, pb, cb, ib) in zip(a, b)
    )


def test_persistent_workers_give_each_epoch_its_own_batches(train_dir: Path) -> None:
    group = _group(train_dir, shuffle_caption=True, flip_aug=True, color_aug=True)
    serial_loader = make_dataloader(group, epoch=1, n_workers=0)
    serial = {1: _collect(serial_loader)}
    serial_loader.sampler.set_epoch(2)
    serial[2] = _collect(serial_loader)
    loader = make_dataloader(group, epoch=1, n_workers=2, persistent=True)
    assert loader.num_workers == 2 and loader.persistent_workers
    epoch1 = _collect(loader)
    workers = [w.pid for w in loader._iterator._workers]
    loader.sampler.set_epoch(2)
    epoch2 = _collect(loader)
    assert [w.pid for w in loader._iterator._workers] == workers  # the same worker processes
    assert [k for k, *_ in epoch2] == [(2, i) for i in range(len(group))]
    assert _same_batches(epoch1, serial[1]) and _same_batches(epoch2, serial[2])
    assert not _same_batches([(None, *rest) for _, *rest in epoch1], [(None, *rest) for _, *rest in epoch2])
    # a resumed epoch starts at its batch index
    loader.sampler.set_epoch(2, start=4)
    assert _same_batches(_collect(loader), serial[2][4:])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_dataloader_workers_capped_at_cpu_count(train_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    group = _group(train_dir)
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert make_dataloader(group, n_workers=8).num_workers == 3
    assert make_dataloader(group, n_workers=2).num_workers == 2
    no_workers = make_dataloader(group, n_workers=0, persistent=True)
    assert no_workers.num_workers == 0 and not no_workers.persistent_workers


def test_debug_dataset_logs_what_the_model_sees(train_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    group = _group(train_dir)
    with caplog.at_level(logging.INFO):
        rows = debug_dataset(group, epoch=0, max_batches=2)
    assert 2 <= len(rows) <= 4
    for row in rows:
        assert row["caption"] in caplog.text and Path(row["path"]).name in caplog.text
        assert f"{row['size'][0]}x{row['size'][1]}" in caplog.text
    assert group.captions_are_fixed() and not _group(train_dir, shuffle_caption=True).captions_are_fixed()


def test_flag_metadata_without_config(train_dir: Path) -> None:
    import json

    meta = _group(train_dir).metadata_for_training(uses_dataset_config=False, total_batch_size=2)
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_cat": {"n_repeats": 2, "img_count": 2},
                                                   "3_sks dog": {"n_repeats": 3, "img_count": 4}}
    assert meta["ss_reg_dataset_dirs"] == "{}" and meta["ss_resolution"] == "(64, 64)"
    bucket_info = json.loads(meta["ss_bucket_info"])
    assert bucket_info["buckets"]["1"] == {"resolution": [64, 64], "count": 11}
    assert json.loads(meta["ss_tag_frequency"])["3_sks dog"]["dog"] == 4
    no_bucket = _group(train_dir, enable_bucket=False, random_crop=True).metadata_for_training(False)
    assert no_bucket["ss_bucket_info"] == "null" and no_bucket["ss_min_bucket_reso"] == "None"


def test_add_replacement_reaches_batches(train_dir: Path) -> None:
    group = _group(train_dir)
    group.add_replacement("dog", "tok1 tok2")
    captions = [c for i in range(len(group)) for c in group[(0, i)]["captions"]]
    assert "tok1 tok2, park" in captions and not any(c.startswith("dog") for c in captions)
    group.add_replacement("", ["a photo of tok", "art of tok"])
    assert not group.captions_are_fixed()
    assert {c for i in range(len(group)) for c in group[(0, i)]["captions"]} == {"a photo of tok", "art of tok"}


@pytest.mark.parametrize("name, value", [
    ("shuffle_caption", True), ("caption_dropout_rate", 0.5), ("caption_dropout_every_n_epochs", 2),
    ("caption_tag_dropout_rate", 0.1), ("token_warmup_step", 5),
])
def test_captions_not_fixed_with_any_caption_randomness(train_dir: Path, name: str, value: object) -> None:
    assert _group(train_dir).captions_are_fixed()
    group = _group(train_dir, **{name: value})
    assert not group.captions_are_fixed()
    # only one of two subsets varies its captions: still not fixed
    setattr(group.datasets[0].subsets[0], name, type(value)(0))
    assert len(group.datasets[0].subsets) == 2 and not group.captions_are_fixed()
    setattr(group.datasets[0].subsets[1], name, type(value)(0))
    assert group.captions_are_fixed()
