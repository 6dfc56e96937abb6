"""Tiny image / dataset fixtures for the dataset tests (plain functions, numpy + PIL)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def image_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient plus a little noise: distinct per seed, compresses well."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    img = np.stack([
        base[0] + 100 * xs / max(width, 1),
        base[1] + 100 * ys / max(height, 1),
        base[2] + 50 * (xs + ys) / max(width + height, 1),
    ], axis=-1)
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """Write a PNG/JPG (by extension) of the given size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_array(width, height, seed)).save(path)
    return path


def write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_dreambooth_folder(
    root: Path, folder: str, sizes: Sequence[tuple[int, int]], captions: Sequence[str | None] | None = None,
    ext: str = ".png", caption_extension: str = ".txt", seed: int = 0,
) -> list[Path]:
    """`root/folder/img{i}{ext}` images with optional caption files; returns image paths."""
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = write_image(root / folder / f"img{i}{ext}", w, h, seed + i)
        if captions is not None and captions[i] is not None:
            write_text(path.with_suffix(caption_extension), captions[i])
        paths.append(path)
    return paths


def write_json(path: Path, data: object) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


