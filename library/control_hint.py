"""ControlNet hint images: preprocessors by name (`--control_net_preps`) and hint tensors.

Names follow sd-scripts: `none` (the image is already a hint, e.g. an edge map made with
`tools/canny.py`) and `canny`, `canny_LOW` or `canny_LOW_HIGH` (OpenCV Canny thresholds,
default 63 and 191). A hint tensor is the preprocessed image resized to the output size,
RGB in [0, 1], as ControlNets were trained on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from PIL import Image

from library.errors import UserError
from library.image_util import load_image, resize_area
from library.io_util import atomic_path

DEFAULT_CANNY_LOW = 63
DEFAULT_CANNY_HIGH = 191

Preprocessor = Callable[[np.ndarray], np.ndarray]


def canny_edges(image: np.ndarray, low: int = DEFAULT_CANNY_LOW, high: int = DEFAULT_CANNY_HIGH) -> np.ndarray:
    """Canny edge map (HxW uint8, 0 or 255) of an HxWx3 RGB uint8 image."""
    if not 0 <= low <= high:
        raise UserError(f"canny thresholds must satisfy 0 <= low <= high (got low={low}, high={high})")
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return cv2.Canny(gray, int(low), int(high))


def get_preprocessor(name: str | None) -> Preprocessor | None:
    """The preprocessor called `name` (None for `none`); unknown names are a UserError."""
    if name is None or name.lower() == "none":
        return None
    parts = name.split("_")
    if parts[0].lower() == "canny" and len(parts) <= 3:
        try:
            thresholds = [int(p) for p in parts[1:]]
        except ValueError:
            thresholds = None
        if thresholds is not None:
            low = thresholds[0] if thresholds else DEFAULT_CANNY_LOW
            high = thresholds[1] if len(thresholds) > 1 else DEFAULT_CANNY_HIGH
            canny_edges(np.zeros((1, 1, 3), np.uint8), low, high)  # check the thresholds now, not per image
            return lambda image: canny_edges(image, low, high)
    raise UserError(f"--control_net_preps: unknown preprocessor '{name}' (expected none, canny, canny_LOW or canny_LOW_HIGH)")


def prepare_hint(
    image: np.ndarray | Image.Image, preprocessor: Preprocessor | None, width: int, height: int
) -> torch.Tensor:
    """`Tensor[1, 3, height, width]` in [0, 1]: the image resized to the output size, then preprocessed."""
    array = np.array(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    array = resize_area(array.astype(np.uint8), (width, height))
    if preprocessor is not None:
        array = preprocessor(array)
        if array.ndim == 2:  # edge maps are single-channel; ControlNets take RGB
            array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def write_canny(input_path: str | Path, output_path: str | Path, low: int, high: int) -> Path:
    """Write the Canny edge map of an image as a PNG (atomically); returns the output path."""
    edges = canny_edges(load_image(input_path), low, high)
    output_path = Path(output_path)
    with atomic_path(output_path, suffix=output_path.suffix or ".png") as tmp:
        Image.fromarray(edges).save(tmp, format="PNG")
    return output_path
