"""Aspect-ratio bucket maths (sd-scripts M23 rules), as pure functions plus a small manager.

A bucket is a (width, height) training size. With bucketing on, every image is scaled so
that it covers its bucket and the excess is cropped; batches are drawn from one bucket.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from library.errors import UserError

Reso = tuple[int, int]


def parse_resolution(value: object, name: str = "--resolution") -> Reso | None:
    """`512`, `"512"`, `"512,768"`, `[512, 768]` or `(w, h)` -> (w, h); None stays None."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            nums = [int(p) for p in parts]
        else:
            nums = [int(v) for v in value]  # type: ignore[union-attr]
        if len(nums) == 1:
            return (nums[0], nums[0])
        if len(nums) == 2:
            return (nums[0], nums[1])
    except (TypeError, ValueError):
        pass
    raise UserError(f"{name} must be a size like 512 or 512,768 (width,height), got {value!r}")


def make_bucket_resolutions(max_reso: Reso, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> list[Reso]:
    """Bucket list for a target resolution, computed in units of `divisible` (M23).

    Buckets whose short side would fall below `min_size` are dropped, as newer sd-scripts
    does (M23 kept them, down to zero-height buckets for small resolutions); for the usual
    512 / 256 / 1024 / 64 settings both give the same 17 buckets.
    """
    max_width, max_height = max_reso
    max_area = (max_width // divisible) * (max_height // divisible)  # in step^2 units
    resos: set[Reso] = set()
    square = int(math.sqrt(max_area)) * divisible
    resos.add((square, square))
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // (width // divisible)) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def round_to_steps(x: float, reso_steps: int) -> int:
    """Round to the nearest int, then floor to a multiple of `reso_steps`."""
    value = int(x + 0.5)
    return value - value % reso_steps


def cover_size(image_size: Reso, bucket: Reso) -> Reso:
    """Size the image is resized to so that it covers `bucket` (one side equal, the other larger)."""
    image_width, image_height = image_size
    aspect_ratio = image_width / image_height
    if aspect_ratio > bucket[0] / bucket[1]:
        scale = bucket[1] / image_height  # wider than the bucket: match heights
    else:
        scale = bucket[0] / image_width
    return (int(image_width * scale + 0.5), int(image_height * scale + 0.5))


def no_upscale_size(image_size: Reso, max_area: int, reso_steps: int) -> tuple[Reso, Reso]:
    """(bucket, resized_size) for bucket_no_upscale: shrink only when larger than max_area."""
    image_width, image_height = image_size
    aspect_ratio = image_width / image_height
    if image_width * image_height > max_area:
        resized_width = math.sqrt(max_area * aspect_ratio)
        resized_height = max_area / resized_width
        # round either side to steps; keep the variant whose aspect ratio is closer
        width_rounded = round_to_steps(resized_width, reso_steps)
        height_in_wr = round_to_steps(width_rounded / aspect_ratio, reso_steps)
        ar_width_rounded = width_rounded / height_in_wr if height_in_wr > 0 else math.inf
        height_rounded = round_to_steps(resized_height, reso_steps)
        width_in_hr = round_to_steps(height_rounded * aspect_ratio, reso_steps)
        ar_height_rounded = width_in_hr / height_rounded if height_rounded > 0 else math.inf
        if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
            resized = (width_rounded, int(width_rounded / aspect_ratio + 0.5))
        else:
            resized = (int(height_rounded * aspect_ratio + 0.5), height_rounded)
    else:
        resized = (image_width, image_height)
    bucket = (resized[0] - resized[0] % reso_steps, resized[1] - resized[1] % reso_steps)
    return bucket, resized


def select_bucket(
    image_size: Reso,
    predefined_resos: Sequence[Reso] | None,
    no_upscale: bool = False,
    max_area: int | None = None,
    reso_steps: int = 64,
) -> tuple[Reso, Reso, float]:
    """(bucket, resized_size, aspect-ratio error) for one image (M23 BucketManager.select_bucket).

    Without no_upscale: an exact (w, h) match in `predefined_resos` wins, else the first bucket
    (in list order) with the smallest |bucket AR - image AR|. With no_upscale: bucket from the
    image itself (see `no_upscale_size`); it may be (0, h) for images narrower than one step.
    """
    image_width, image_height = image_size
    aspect_ratio = image_width / image_height
    if not no_upscale:
        if not predefined_resos:
            raise ValueError("predefined_resos is required without no_upscale")
        reso = (image_width, image_height)
        if reso not in set(predefined_resos):
            ratios = np.array([w / h for w, h in predefined_resos])
            reso = tuple(predefined_resos[int(np.abs(ratios - aspect_ratio).argmin())])  # type: ignore[assignment]
        resized = cover_size(image_size, reso)
    else:
        if max_area is None:
            raise ValueError("max_area is required with no_upscale")
        reso, resized = no_upscale_size(image_size, max_area, reso_steps)
    ar_error = (reso[0] / reso[1]) - aspect_ratio if reso[1] > 0 else math.inf
    return (int(reso[0]), int(reso[1])), resized, ar_error


class BucketManager:
    """Bucket list of one dataset plus the image keys (with repeats) assigned to each bucket."""

    def __init__(
        self,
        no_upscale: bool,
        max_reso: Reso | None,
        min_size: int | None,
        max_size: int | None,
        reso_steps: int | None,
    ) -> None:
        self.no_upscale = no_upscale
        self.max_reso = max_reso
        self.max_area = None if max_reso is None else max_reso[0] * max_reso[1]
        self.min_size = min_size
        self.max_size = max_size
        self.reso_steps = reso_steps or 64
        self.predefined_resos: list[Reso] = []
        self.resos: list[Reso] = []
        self.buckets: list[list[str]] = []
        self._reso_to_id: dict[Reso, int] = {}

    def make_buckets(self) -> None:
        assert self.max_reso is not None and self.min_size is not None and self.max_size is not None
        self.set_predefined_resos(make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.reso_steps))

    def set_predefined_resos(self, resos: Iterable[Reso]) -> None:
        self.predefined_resos = sorted({(int(w), int(h)) for w, h in resos})

    def select_bucket(self, image_width: int, image_height: int) -> tuple[Reso, Reso, float]:
        reso, resized, ar_error = select_bucket(
            (image_width, image_height), self.predefined_resos, self.no_upscale, self.max_area, self.reso_steps
        )
        return reso, resized, ar_error

    def add_image(self, reso: Reso, image_key: str) -> None:
        if reso not in self._reso_to_id:
            self._reso_to_id[reso] = len(self.resos)
            self.resos.append(reso)
            self.buckets.append([])
        self.buckets[self._reso_to_id[reso]].append(image_key)

    def sort(self) -> None:
        """Order buckets by resolution (for stable logs, metadata and batch order)."""
        order = sorted(range(len(self.resos)), key=lambda i: self.resos[i])
        self.resos = [self.resos[i] for i in order]
        self.buckets = [self.buckets[i] for i in order]
        self._reso_to_id = {reso: i for i, reso in enumerate(self.resos)}
