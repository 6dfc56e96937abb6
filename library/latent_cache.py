"""Latent caching in memory and in `.npz` files (sd-scripts M23 layout: key `arr_0`, unscaled).

A disk cache `<image minus ext>.npz` (and `<stem>_flip.npz` with flip_aug) is reused when its
latent shape matches the image's bucket and it is newer than the image; otherwise it is
recomputed. Files are written atomically. Sampling from the VAE posterior uses per-image
noise seeded by (seed, image path), so results do not depend on vae_batch_size or order.
"""
from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from library.errors import UserError
from library.image_util import file_mtime, flip_horizontal, to_model_tensor
from library.io_util import atomic_path

logger = logging.getLogger(__name__)

Reso = tuple[int, int]


class CacheableImage(Protocol):
    absolute_path: str
    bucket_reso: Reso
    latents: torch.Tensor | None
    latents_flipped: torch.Tensor | None
    latents_npz: str | None
    latents_npz_flipped: str | None


def npz_paths_for_image(image_path: str | Path) -> tuple[str, str]:
    """(`<image minus ext>.npz`, `<image minus ext>_flip.npz`)."""
    path = Path(image_path)
    base = path.with_suffix("")
    return str(base) + ".npz", str(base) + "_flip.npz"


def vae_downscale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent cell: 2 per VAE level after the first (8 for every SD VAE)."""
    config = getattr(vae, "config", None)
    levels = len(getattr(config, "block_out_channels", ())) if config is not None else 0
    return 2 ** (levels - 1) if levels else 8


def expected_latent_hw(bucket: Reso, downscale: int = 8) -> tuple[int, int]:
    """(h, w) of the latents of a bucket-sized image."""
    return (bucket[1] // downscale, bucket[0] // downscale)


def _npz_shape(path: str) -> tuple[int, ...] | None:
    """Shape of `arr_0` from its `.npy` header alone; None when missing or damaged.

    Re-checking a cache then reads a few hundred bytes per file instead of every latent (about
    twice as fast over 1,000 files; benchmarks/RESULTS.md). A member whose size does not match
    its header is damaged; a truncated archive already fails to open (its directory is at the end).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("arr_0.npy")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                else:  # other header versions: read the array
                    return tuple(np.load(path)["arr_0"].shape)
                header_size = member.tell()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    if info.file_size != header_size + int(np.prod(shape)) * dtype.itemsize:
        return None
    return tuple(shape)


def is_disk_cache_valid(
    npz_path: str, bucket: Reso, image_path: str | None, flip_npz_path: str | None = None, downscale: int = 8
) -> bool:
    """True when the npz (and the flipped one, if asked) exist, fit the bucket and are newer than the image."""
    expected = expected_latent_hw(bucket, downscale)
    for path in [npz_path] + ([flip_npz_path] if flip_npz_path else []):
        if not Path(path).is_file():
            return False
        shape = _npz_shape(path)
        if shape is None or len(shape) != 3 or shape[1:3] != expected:
            return False
        if image_path is not None and Path(image_path).is_file() and file_mtime(path) < file_mtime(image_path):
            return False  # the image changed after the cache was written
    return True


def save_latents_npz(path: str | Path, latents: torch.Tensor) -> None:
    """Write `[4, h, w]` float32 latents as `arr_0`, atomically."""
    array = latents.detach().to("cpu", torch.float32).numpy()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, array)


def load_latents_npz(path: str | Path) -> torch.Tensor:
    """Latents from an npz (`arr_0`); UserError naming the file when unreadable."""
    try:
        with np.load(path) as npz:
            array = npz["arr_0"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"cannot read latent cache {path}: {err}; delete it to recompute") from None
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def noise_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from the run seed and an image key."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_noise_key(array: np.ndarray) -> str:
    """The noise key of a bucket-sized image: its shape and a digest of its pixels.

    Keyed by content, not by path, so that a dataset trains the same wherever it lies (a moved
    folder, another drive, Windows or Linux) and in whatever order its images are cached.
    """
    pixels = np.ascontiguousarray(array)
    return "x".join(str(n) for n in pixels.shape) + ":" + hashlib.sha256(pixels).hexdigest()


def sample_latents(vae: torch.nn.Module, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """`vae.encode(images).latent_dist.sample()` with one seeded noise draw per image; float32 on CPU."""
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
        mean = dist.mean.float().cpu()
        std = dist.std.float().cpu()
    noise = torch.stack(
        [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )
    return mean + std * noise


def cache_latents(
    infos: Sequence[CacheableImage],
    flip_flags: Sequence[bool],
    prepare_image: Callable[[CacheableImage], np.ndarray],
    vae: torch.nn.Module,
    vae_batch_size: int = 1,
    cache_to_disk: bool = False,
    is_main_process: bool = True,
    seed: int = 0,
) -> int:
    """Encode every image that has no valid cache; returns how many images went through the VAE.

    `prepare_image(info)` gives the bucket-sized uint8 image (no random augmentation).
    In memory the latents go to `info.latents` / `info.latents_flipped`; on disk the npz
    paths go to `info.latents_npz` / `info.latents_npz_flipped` and are loaded per step.
    """
    vae_batch_size = max(1, int(vae_batch_size or 1))
    downscale = vae_downscale_factor(vae)
    todo: list[tuple[CacheableImage, bool]] = []
    for info, flip in tqdm(list(zip(infos, flip_flags)), desc="checking latent caches", leave=False):
        if getattr(info, "npz_prepared", False):
            continue  # fine-tuning npz written by prepare_buckets_latents.py
        if info.latents is not None:
            continue
        if cache_to_disk:
            npz, npz_flip = npz_paths_for_image(info.absolute_path)
            info.latents_npz, info.latents_npz_flipped = npz, (npz_flip if flip else None)
            if not is_main_process:
                continue  # the main process writes the files
            if is_disk_cache_valid(npz, info.bucket_reso, info.absolute_path, npz_flip if flip else None, downscale):
                continue
        todo.append((info, flip))
    # batches of one bucket each, in bucket order
    todo.sort(key=lambda item: (item[0].bucket_reso[0] * item[0].bucket_reso[1], item[0].bucket_reso))
    batches: list[list[tuple[CacheableImage, bool]]] = []
    for item in todo:
        if batches and len(batches[-1]) < vae_batch_size and batches[-1][-1][0].bucket_reso == item[0].bucket_reso:
            batches[-1].append(item)
        else:
            batches.append([item])
    for batch in tqdm(batches, desc="caching latents", smoothing=1):
        arrays = [prepare_image(info) for info, _ in batch]
        images = torch.stack([to_model_tensor(a) for a in arrays])
        keys = [image_noise_key(a) for a in arrays]
        latents = sample_latents(vae, images, [noise_seed(seed, k) for k in keys])
        flipped: list[torch.Tensor | None] = [None] * len(batch)
        if any(flip for _, flip in batch):
            flip_images = torch.stack([to_model_tensor(flip_horizontal(a)) for a in arrays])
            flip_latents = sample_latents(vae, flip_images, [noise_seed(seed, k + ":flip") for k in keys])
            flipped = [flip_latents[i] if batch[i][1] else None for i in range(len(batch))]
        for (info, flip), latent, flip_latent in zip(batch, latents, flipped):
            if torch.isnan(latent).any() or (flip_latent is not None and torch.isnan(flip_latent).any()):
                raise UserError(f"NaN in latents of {info.absolute_path}; try a different --vae or no half precision")
            if cache_to_disk:
                save_latents_npz(info.latents_npz, latent)  # type: ignore[arg-type]
                if flip_latent is not None:
                    save_latents_npz(info.latents_npz_flipped, flip_latent)  # type: ignore[arg-type]
            else:
                info.latents = latent.clone()
                info.latents_flipped = None if flip_latent is None else flip_latent.clone()
    return len(todo)


# --- prepare_buckets_latents.py (fine-tuning npz next to the images) -----------------------------
def prepared_npz_stem(train_data_dir: Path, image_key: str, full_path: bool, flip: bool, recursive: bool) -> Path:
    """`<train_data_dir>/<key>` (full_path: `<dir>/<stem>`, recursive: `<dir>/<relpath>/<stem>`), no extension."""
    if full_path:
        key_path = Path(image_key)
        base_name = key_path.stem
        try:
            relative = key_path.parent.resolve().relative_to(Path(train_data_dir).resolve())
        except ValueError:
            relative = Path()
    else:
        base_name, relative = image_key, Path()
    if flip:
        base_name += "_flip"
    folder = Path(train_data_dir) / relative if (recursive and str(relative) not in ("", ".")) else Path(train_data_dir)
    return folder / base_name


def prepare_buckets_latents(
    image_paths: Sequence[Path],
    metadata: dict,
    vae: torch.nn.Module,
    bucket_manager: Any,
    train_data_dir: Path,
    batch_size: int = 1,
    full_path: bool = False,
    flip_aug: bool = False,
    skip_existing: bool = False,
    recursive: bool = False,
    load_images: Callable[[Sequence[Path]], Iterable[tuple[Path, np.ndarray | None]]] | None = None,
) -> dict[Reso, int]:
    """Assign each image a bucket (`train_resolution`, floored to x8) and write its npz latents.

    Sampling uses the VAE's posterior with the global torch RNG, as sd-scripts does. Stale
    `_flip.npz` files are removed when flip_aug is off. Returns image counts per bucket.
    """
    from library.image_util import load_image, trim_and_resize

    if load_images is None:
        def load_images(paths: Sequence[Path]) -> Iterator[tuple[Path, np.ndarray | None]]:
            for path in paths:
                try:
                    yield path, load_image(path)
                except UserError as err:
                    logger.warning(f"skipping image: {err}")
                    yield path, None

    pending: dict[Reso, list[tuple[str, np.ndarray]]] = {}
    counts: dict[Reso, int] = {}

    def encode_and_save(reso: Reso) -> None:
        items = pending.pop(reso, [])
        if not items:
            return
        images = torch.stack([to_model_tensor(img) for _, img in items])
        param = next(vae.parameters())
        with torch.no_grad():
            latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.sample().float().cpu()
            flipped = None
            if flip_aug:
                latents_f = vae.encode(torch.flip(images, dims=[3]).to(param.device, param.dtype))
                flipped = latents_f.latent_dist.sample().float().cpu()
        for i, (key, _) in enumerate(items):
            save_latents_npz(str(prepared_npz_stem(train_data_dir, key, full_path, False, recursive)) + ".npz", latents[i])
            flip_path = Path(str(prepared_npz_stem(train_data_dir, key, full_path, True, recursive)) + ".npz")
            if flipped is not None:
                save_latents_npz(flip_path, flipped[i])
            elif flip_path.is_file():
                logger.info(f"removing stale flipped latents {flip_path}")
                flip_path.unlink()

    for image_path, image in tqdm(load_images(image_paths), total=len(image_paths), desc="buckets and latents", smoothing=0):
        if image is None:
            continue
        key = str(image_path) if full_path else image_path.stem
        height, width = image.shape[:2]
        reso, resized, _ = bucket_manager.select_bucket(width, height)
        if min(reso) < 8:
            logger.warning(f"skipping {image_path}: {width}x{height} is smaller than one bucket step")
            continue
        metadata.setdefault(key, {})["train_resolution"] = [reso[0] - reso[0] % 8, reso[1] - reso[1] % 8]
        counts[reso] = counts.get(reso, 0) + 1
        if skip_existing:
            npz = str(prepared_npz_stem(train_data_dir, key, full_path, False, recursive)) + ".npz"
            flip_npz = str(prepared_npz_stem(train_data_dir, key, full_path, True, recursive)) + ".npz"
            if is_disk_cache_valid(npz, reso, None, flip_npz if flip_aug else None, vae_downscale_factor(vae)):
                continue
        pending.setdefault(reso, []).append((key, trim_and_resize(image, reso, resized)))
        if len(pending[reso]) >= batch_size:
            encode_and_save(reso)
    for reso in list(pending):
        encode_and_save(reso)
    return counts
