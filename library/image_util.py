"""Image loading with clear errors, resize/crop to a bucket, and augmentations (PIL/numpy/OpenCV).

Images are handled as HxWx3 uint8 RGB numpy arrays until `to_model_tensor` turns them into
CHW float tensors in [-1, 1]. Random choices take a `numpy.random.Generator` so that callers
control determinism.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from library.errors import UserError
from library.preflight import make_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

Reso = tuple[int, int]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def glob_images(directory: Path | str, stem: str | None = None) -> list[Path]:
    """Images directly inside `directory` (non-recursive, sorted); only `<stem>.<ext>` if stem given."""
    directory = Path(directory)
    if stem is not None:
        found = []
        for ext in IMAGE_EXTENSIONS:
            for candidate in (directory / f"{stem}{ext}", directory / f"{stem}{ext.upper()}"):
                if candidate.is_file() and candidate not in found:
                    found.append(candidate)
        return found
    return sorted(p for p in directory.iterdir() if p.is_file() and is_image_file(p))


def glob_images_recursive(directory: Path | str) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and is_image_file(p))


def read_image_size(path: Path | str) -> Reso:
    """(width, height) from the header; also checks the file's structure (PNG chunks, ...).

    Raises UserError naming the file when it is not a readable image.
    """
    try:
        with Image.open(path) as img:
            size = img.size
        with Image.open(path) as img:
            img.verify()  # catches truncated/corrupt PNG data without decoding pixels
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    if size[0] < 1 or size[1] < 1:
        raise UserError(f"image {path} has no pixels ({size[0]}x{size[1]})")
    return size


def load_image(path: Path | str) -> np.ndarray:
    """HxWx3 uint8 RGB array; UserError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as img:
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.array(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def resize_area(image: np.ndarray, size: Reso) -> np.ndarray:
    """Resize to (width, height) with cv2 INTER_AREA (the sd-scripts choice for buckets)."""
    if image.shape[1] == size[0] and image.shape[0] == size[1]:
        return image
    return cv2.resize(image, (int(size[0]), int(size[1])), interpolation=cv2.INTER_AREA)


def trim_and_resize(
    image: np.ndarray, bucket: Reso, resized_size: Reso, random_crop: bool = False, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Resize to `resized_size` (covers `bucket`), then crop the excess: centred, or random."""
    image = resize_area(image, resized_size)
    height, width = image.shape[:2]
    if width > bucket[0]:
        excess = width - bucket[0]
        left = int(rng.integers(0, excess + 1)) if (random_crop and rng is not None) else excess // 2
        image = image[:, left : left + bucket[0]]
    if height > bucket[1]:
        excess = height - bucket[1]
        top = int(rng.integers(0, excess + 1)) if (random_crop and rng is not None) else excess // 2
        image = image[top : top + bucket[1]]
    if image.shape[0] != bucket[1] or image.shape[1] != bucket[0]:
        raise ValueError(f"resized image {image.shape[1]}x{image.shape[0]} does not cover bucket {bucket}")
    return image


def random_crop_to(image: np.ndarray, size: Reso, rng: np.random.Generator) -> np.ndarray:
    """Crop a (width, height) window at a random position (image must be at least that large)."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, height - size[1] + 1))
    left = int(rng.integers(0, width - size[0] + 1))
    return image[top : top + size[1], left : left + size[0]]


def face_info_from_stem(stem: str) -> tuple[int, int, int, int] | None:
    """Face centre/size `(cx, cy, w, h)` from a stem ending in `_cx_cy_w_h`, else None."""
    tokens = stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return cx, cy, w, h


def crop_target_face(
    image: np.ndarray,
    target: Reso,
    face: tuple[int, int, int, int],
    face_crop_aug_range: Sequence[float],
    random_crop: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Scale so the face has a size within `face_crop_aug_range` of the target, crop around it.

    Follows sd-scripts: only downscales (scale <= 1, but never below covering the target);
    the crop centres the face, jittered a little, or widely with random_crop.
    """
    height, width = image.shape[:2]
    target_w, target_h = target
    if height == target_h and width == target_w:
        return image
    face_cx, face_cy, face_w, face_h = face
    face_size = max(face_w, face_h, 1)
    short_side = min(target_w, target_h)
    cover_scale = max(target_h / height, target_w / width)
    min_scale = min(1.0, max(cover_scale, short_side / (face_size * face_crop_aug_range[1])))
    max_scale = min(1.0, max(min_scale, short_side / (face_size * face_crop_aug_range[0])))
    scale = min_scale if min_scale >= max_scale else float(rng.uniform(min_scale, max_scale))
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    if new_h < target_h or new_w < target_w:  # image smaller than target: upscale to cover
        scale = cover_scale
        new_h, new_w = max(target_h, int(height * scale + 0.5)), max(target_w, int(width * scale + 0.5))
    image = resize_area(image, (new_w, new_h)) if scale < 1.0 else cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LANCZOS4)
    face_cx, face_cy = int(face_cx * scale + 0.5), int(face_cy * scale + 0.5)
    for axis, (target_len, length, face_pos) in enumerate(((target_h, new_h, face_cy), (target_w, new_w, face_cx))):
        start = face_pos - target_len // 2
        if random_crop:
            spread = max(length - face_pos, face_pos)
            # sum of two uniforms: shifts stay near the face but can reach the background
            start += int(rng.integers(0, spread + 1)) + int(rng.integers(0, spread + 1)) - spread
        elif face_crop_aug_range[0] != face_crop_aug_range[1] and face_size > short_side // 10 and face_size >= 40:
            start += int(rng.integers(-(face_size // 20), face_size // 20 + 1))
        start = max(0, min(start, length - target_len))
        image = image[start : start + target_len] if axis == 0 else image[:, start : start + target_len]
    return image


def color_aug(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """sd-scripts colour jitter: with p=0.33, either a hue shift of +-8 (OpenCV hue units) or gamma 0.95-1.05."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = float(rng.uniform(-8, 8))
        hue = (hsv[:, :, 0].astype(np.float32) + shift) % 180
        hsv[:, :, 0] = hue.astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = float(rng.uniform(0.95, 1.05))
    return np.clip(((image.astype(np.float32) / 255.0) ** gamma) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def flip_horizontal(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def to_model_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [-1, 1]."""
    import torch  # late: the caption/metadata scripts use this module without torch

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def file_mtime(path: Path | str) -> float:
    return os.stat(path).st_mtime


def interpolation_flag(name: str | None, upscale: bool) -> int:
    """cv2 interpolation constant for a tool's `--interpolation` name (None: area down, lanczos up)."""
    table = {
        "area": cv2.INTER_AREA,
        "cubic": cv2.INTER_CUBIC,
        "lanczos4": cv2.INTER_LANCZOS4,
        "nearest": cv2.INTER_NEAREST,
        "linear": cv2.INTER_LINEAR,
    }
    if name is None:
        return cv2.INTER_LANCZOS4 if upscale else cv2.INTER_AREA
    if name not in table:
        raise UserError(f"--interpolation must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def scale_to_max_area(size: Reso, max_area: int) -> Reso:
    """Largest size with the same aspect ratio and at most `max_area` pixels (floors each side)."""
    width, height = size
    if width * height <= max_area:
        return size
    factor = math.sqrt(max_area / (width * height))
    return (max(1, int(width * factor)), max(1, int(height * factor)))


def resize_folder_images(
    src_dir: Path | str,
    dst_dir: Path | str,
    max_resolutions: Sequence[str] = ("512x512", "384x384", "256x256", "128x128"),
    divisible_by: int = 1,
    interpolation: str | None = None,
    save_as_png: bool = False,
    copy_associated_files: bool = False,
) -> list[Path]:
    """tools/resize_images_to_resolution.py: shrink each image to at most W*H pixels per resolution.

    Output `<stem>+<WxH>.jpg|.png`, sides floored to `divisible_by` by a centre crop; other files
    of the folder are copied, except latent caches (`.npz`), which would not match the new size; with copy_associated_files `<stem>.*` files are copied per
    resolution as `<stem>+<WxH><ext>`. Each resolution is made from the original image.
    """
    import shutil

    from library.io_util import atomic_path

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise UserError(f"source folder {src_dir} not found")
    if divisible_by < 1:
        raise UserError(f"--divisible_by must be at least 1, got {divisible_by}")
    areas = []
    for text in max_resolutions:
        try:
            w, h = (int(v) for v in text.strip().lower().split("x"))
        except ValueError:
            raise UserError(f"--max_resolution entries must look like 512x512, got {text!r}") from None
        areas.append((f"{w}x{h}", w * h))
    make_dir(dst_dir, "destination folder")  # a clear error when the path runs through a file
    written: list[Path] = []
    # cached latents (.npz) belong to the original image size: never carry them over
    files = sorted(p for p in src_dir.iterdir() if p.is_file() and p.suffix.lower() != ".npz")
    for path in files:
        if not is_image_file(path):
            with atomic_path(dst_dir / path.name) as tmp:
                shutil.copyfile(path, tmp)
            continue
        try:
            original = load_image(path)
        except UserError as err:
            logger.warning(f"skipping image: {err}")
            continue
        for name, max_area in areas:
            height, width = original.shape[:2]
            image = original
            if width * height > max_area:
                new_size = scale_to_max_area((width, height), max_area)
                image = cv2.resize(original, new_size, interpolation=interpolation_flag(interpolation, upscale=False))
            height, width = image.shape[:2]
            new_w, new_h = width - width % divisible_by, height - height % divisible_by
            if new_w < 1 or new_h < 1:
                logger.warning(f"skipping {path} at {name}: smaller than --divisible_by {divisible_by}")
                continue
            top, left = (height - new_h) // 2, (width - new_w) // 2
            image = image[top : top + new_h, left : left + new_w]
            target = dst_dir / f"{path.stem}+{name}{'.png' if save_as_png else '.jpg'}"
            with atomic_path(target) as tmp:
                Image.fromarray(image).save(tmp, format="PNG" if save_as_png else "JPEG", quality=100)
            logger.info(f"{path.name} {original.shape[1]}x{original.shape[0]} -> {target.name} {new_w}x{new_h}")
            written.append(target)
        if copy_associated_files:
            for other in files:
                if other.stem == path.stem and other != path and not is_image_file(other):
                    for name, _ in areas:
                        with atomic_path(dst_dir / f"{path.stem}+{name}{other.suffix}") as tmp:
                            shutil.copyfile(other, tmp)
    return written
