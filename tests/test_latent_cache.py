"""Latent caching: equal to fresh latents, disk reuse and invalidation, atomic npz."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_fixtures import make_dreambooth_folder, write_image
from library import config_util, latent_cache
from library.errors import UserError


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts how many images go through `encode`."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.images_encoded = 0

    def encode(self, images: torch.Tensor):  # noqa: ANN201 - diffusers output object
        self.images_encoded += images.shape[0]
        return self.vae.encode(images)


def _group(train: Path, **overrides: object) -> config_util.DatasetGroup:
    values = dict(train_data_dir=str(train), resolution="64", enable_bucket=True, min_bucket_reso=32,
                  max_bucket_reso=128, bucket_reso_steps=32, train_batch_size=1, caption_extension=".txt", seed=4)
    values.update(overrides)
    return config_util.build_dataset_group(argparse.Namespace(**values))


@pytest.fixture()
def train(tmp_path: Path) -> Path:
    make_dreambooth_folder(tmp_path / "t", "2_x", [(64, 64), (96, 64), (64, 128)], ["a", "b", "c"])
    return tmp_path / "t"


def _fresh_latents(vae: torch.nn.Module, group: config_util.DatasetGroup, path: str, flip: bool) -> torch.Tensor:
    """Encode the uncached batch image of `path` directly with diffusers, same noise seed."""
    dataset = group.datasets[0]
    info = dataset.image_data[path]
    image = dataset.prepare_image(info)
    key = latent_cache.image_noise_key(image) + (":flip" if flip else "")
    if flip:
        image = image[:, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(tensor).latent_dist
    noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(latent_cache.noise_seed(group.seed, key)))
    return dist.mean[0] + dist.std[0] * noise


def test_memory_cache_equals_fresh_latents(train: Path, tiny_models_v1: tuple) -> None:
    vae = tiny_models_v1[1]
    group = _group(train, flip_aug=True)
    uncached = {tuple(group[(0, i)]["absolute_paths"]): group[(0, i)]["images"] for i in range(len(group))}
    assert all(v is not None for v in uncached.values())
    counting = CountingVAE(vae)
    assert group.cache_latents(counting, vae_batch_size=2) == 3
    assert counting.images_encoded == 6  # 3 images + 3 flipped
    seen_flip = seen_plain = False
    for i in range(len(group)):
        batch = group[(0, i)]
        assert batch["images"] is None
        path = batch["absolute_paths"][0]
        plain, flipped = _fresh_latents(vae, group, path, False), _fresh_latents(vae, group, path, True)
        latents = batch["latents"][0]
        info = group.datasets[0].image_data[path]
        assert latents.shape == (4, info.bucket_reso[1] // 8, info.bucket_reso[0] // 8)
        if torch.allclose(latents, plain, atol=1e-5):
            seen_plain = True
        else:
            assert torch.allclose(latents, flipped, atol=1e-5)
            seen_flip = True
    assert seen_plain and seen_flip
    # the batch size of the VAE does not change the result
    other = _group(train, flip_aug=True)
    other.cache_latents(vae, vae_batch_size=1)
    for key, info in group.datasets[0].image_data.items():
        assert torch.allclose(info.latents, other.datasets[0].image_data[key].latents, atol=1e-5)


def test_cached_latents_do_not_depend_on_where_the_dataset_lies(tmp_path: Path, tiny_models_v1: tuple) -> None:
    """The VAE sample's noise is keyed by the image, so a moved (or renamed) folder caches the
    same latents; different images, and an image and its flip, still get different noise."""
    vae = tiny_models_v1[1]
    latents = []
    for folder in ("a", "a_much_longer_folder_name/nested"):
        root = tmp_path / folder
        make_dreambooth_folder(root, "2_x", [(64, 64), (96, 64), (64, 128)], ["a", "b", "c"])
        group = _group(root, flip_aug=True)
        group.cache_latents(vae, vae_batch_size=2)
        infos = sorted(group.datasets[0].image_data.values(), key=lambda info: Path(info.absolute_path).name)
        latents.append([(info.latents, info.latents_flipped) for info in infos])
    for (plain, flipped), (plain_moved, flipped_moved) in zip(*latents):
        assert torch.equal(plain, plain_moved) and torch.equal(flipped, flipped_moved)
        # a flip's noise is its own: the flipped latents are not the plain ones mirrored
        assert not torch.allclose(flipped, plain.flip(-1), atol=1e-3)
    keys = {latent_cache.image_noise_key(np.full((8, 8, 3), v, np.uint8)) for v in (0, 1)}
    assert len(keys) == 2 and latent_cache.image_noise_key(np.zeros((8, 4, 3), np.uint8)) not in keys


def test_disk_cache_reused_and_invalidated(train: Path, tiny_models_v1: tuple) -> None:
    vae = CountingVAE(tiny_models_v1[1])
    group = _group(train)
    assert group.cache_latents(vae, 4, cache_to_disk=True) == 3
    npz_files = sorted(p.name for p in (train / "2_x").glob("*.npz"))
    assert npz_files == ["img0.npz", "img1.npz", "img2.npz"]
    with np.load(train / "2_x" / "img2.npz") as npz:
        assert list(npz.keys()) == ["arr_0"] and npz["arr_0"].shape == (4, 12, 4)  # bucket 32x96
    stored = torch.from_numpy(np.load(train / "2_x" / "img0.npz")["arr_0"])
    batches = [group[(0, i)] for i in range(len(group))]
    assert all(b["images"] is None and b["latents"] is not None for b in batches)
    hit = next(b for b in batches if b["absolute_paths"][0].endswith("img0.png"))
    assert torch.equal(hit["latents"][0], stored)

    # a second run reuses every file: no VAE work
    vae.images_encoded = 0
    again = _group(train)
    assert again.cache_latents(vae, 4, cache_to_disk=True) == 0 and vae.images_encoded == 0

    # the image changes (newer than its npz): only that one is recomputed
    image = train / "2_x" / "img1.png"
    write_image(image, 96, 64, seed=99)
    newer = os.stat(train / "2_x" / "img1.npz").st_mtime + 0.01
    os.utime(image, (newer, newer))
    assert _group(train).cache_latents(vae, 4, cache_to_disk=True) == 1

    # another resolution changes the buckets: shapes no longer match, all are recomputed
    vae.images_encoded = 0
    bigger = _group(train, resolution="128", max_bucket_reso=256)
    assert bigger.cache_latents(vae, 4, cache_to_disk=True) == 3 and vae.images_encoded == 3
    with np.load(train / "2_x" / "img0.npz") as npz:
        assert npz["arr_0"].shape == (4, 16, 16)

    # a damaged npz is treated as missing
    (train / "2_x" / "img0.npz").write_bytes(b"PK\x03\x04 broken")
    assert _group(train, resolution="128", max_bucket_reso=256).cache_latents(vae, 4, cache_to_disk=True) == 1


def test_non_main_process_only_records_paths(train: Path, tiny_models_v1: tuple) -> None:
    vae = CountingVAE(tiny_models_v1[1])
    group = _group(train, flip_aug=True)
    assert group.cache_latents(vae, 1, cache_to_disk=True, is_main_process=False) == 0
    assert vae.images_encoded == 0 and not list((train / "2_x").glob("*.npz"))
    info = next(iter(group.datasets[0].image_data.values()))
    assert info.latents_npz.endswith(".npz") and info.latents_npz_flipped.endswith("_flip.npz")


def test_augmentations_that_break_caching_are_refused(train: Path, tiny_models_v1: tuple) -> None:
    for flag in ("color_aug", "random_crop"):
        group = _group(train, **{flag: True})
        with pytest.raises(UserError, match=flag):
            group.cache_latents(tiny_models_v1[1], 1)


def test_npz_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.npz"
    latent_cache.save_latents_npz(target, torch.ones(4, 2, 2))

    def broken_savez(handle, *arrays):  # noqa: ANN001, ANN202
        handle.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError):
        latent_cache.save_latents_npz(target, torch.zeros(4, 2, 2))
    monkeypatch.undo()
    assert torch.equal(latent_cache.load_latents_npz(target), torch.ones(4, 2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]


def test_unreadable_npz_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError, match="bad.npz"):
        latent_cache.load_latents_npz(bad)


def test_latent_size_follows_the_vae_depth() -> None:
    from diffusers import AutoencoderKL

    from library.tiny_sd import tiny_vae_config

    assert latent_cache.vae_downscale_factor(AutoencoderKL(**tiny_vae_config())) == 8
    three_levels = dict(tiny_vae_config(), block_out_channels=[32, 32, 64],
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    assert latent_cache.vae_downscale_factor(AutoencoderKL(**three_levels)) == 4
    assert latent_cache.expected_latent_hw((96, 64)) == (8, 12)
    assert latent_cache.expected_latent_hw((96, 64), downscale=4) == (16, 24)
