"""Prompt lines → image jobs for `gen_img_diffusers.py`: per-line options, seeds, init images
and the grouping of jobs into batches.

A prompt line is `prompt --n negative --w 512 --h 768 --d 1,2 --s 30 --l 7 --nl 4 --t 0.6
--am 0.5,1 --c clip prompt` (SPEC 5.1). The options the training samples know are read by
`library.sampling.parse_prompt_options`; the generator's own ones here. A line option wins
over the flag (`--W`, `--steps`, ...).
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from PIL import Image

from library.errors import UserError
from library.gen_args import DEFAULT_SIZE, DEFAULT_STRENGTH
from library.image_util import glob_images, load_image
from library.sampling import MAX_SEED, parse_prompt_options, split_prompt_line
from library.samplers import check_sampler_name

logger = logging.getLogger(__name__)


@dataclass
class PromptLine:
    """One prompt line's text and the options it sets (None: not set on the line)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seeds: list[int] | None = None
    steps: int | None = None
    scale: float | None = None
    sampler: str | None = None
    negative_scale: float | None = None
    negative_scale_off: bool = False  # `--nl none`: no negative scale even if --negative_scale is set
    strength: float | None = None
    network_muls: list[float] | None = None
    clip_prompt: str | None = None


@dataclass
class ImageJob:
    """Everything needed to generate one image."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    scale: float
    sampler: str
    negative_scale: float | None
    strength: float
    network_muls: tuple[float, ...] | None
    clip_prompt: str | None
    init_image: Image.Image | None = None
    init_image_name: str | None = None
    mask: Image.Image | None = None
    index: int = 0  # position in the whole run
    extra: dict = field(default_factory=dict)

    def batch_key(self) -> tuple:
        """Jobs with the same key can be generated in one batch."""
        return (
            self.width, self.height, self.steps, self.scale, self.sampler, self.negative_scale, self.strength,
            self.network_muls, self.init_image is not None, self.mask is not None,
            self.prompt.count(" AND "),
        )


_SEEDS = re.compile(r"d ([\d,\s]+)", re.IGNORECASE)
_OWN_OPTIONS = [
    (re.compile(r"nl (.+)", re.IGNORECASE), "negative_scale"),
    (re.compile(r"t ([\d.]+)", re.IGNORECASE), "strength"),
    (re.compile(r"am ([\d.,\s-]+)", re.IGNORECASE), "network_muls"),
    (re.compile(r"c (.+)", re.IGNORECASE), "clip_prompt"),
]


def parse_line(line: str) -> PromptLine | None:
    """A prompt line; None for an empty line."""
    line = line.strip()
    if not line:
        return None
    text, options = split_prompt_line(line)
    values, unparsed = parse_prompt_options(options)
    parsed = PromptLine(
        prompt=text,
        negative_prompt=values.get("negative_prompt"),
        width=values.get("width"),
        height=values.get("height"),
        steps=values.get("steps"),
        scale=values.get("scale"),
        sampler=values.get("sampler"),
    )
    if parsed.sampler is not None:
        parsed.sampler = check_sampler_name(parsed.sampler, f"--ss of prompt '{text}'")
    for option in options:
        match = _SEEDS.match(option)
        if match:
            parsed.seeds = [int(s) for s in re.split(r"[,\s]+", match.group(1).strip()) if s]
    for option in unparsed:
        for pattern, name in _OWN_OPTIONS:
            match = pattern.match(option)
            if not match:
                continue
            raw = match.group(1).strip()
            try:
                if name == "negative_scale":
                    if raw.lower() == "none":
                        parsed.negative_scale, parsed.negative_scale_off = None, True
                    else:
                        parsed.negative_scale = float(raw)
                elif name == "strength":
                    parsed.strength = float(raw)
                elif name == "network_muls":
                    parsed.network_muls = [float(v) for v in re.split(r"[,\s]+", raw) if v]
                else:
                    parsed.clip_prompt = raw
            except ValueError:
                logger.warning("ignoring prompt option with a bad value: --%s", option)
            break
        else:
            logger.warning("ignoring unknown prompt option: --%s", option)
    return parsed


def read_prompt_file(path: str | Path) -> list[str]:
    """`--from_file`: the non-empty lines of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--from_file: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--from_file: cannot read {path}: {err}") from None
    return [line for line in text.splitlines() if line.strip()]


def image_sources(path: str | None, flag: str) -> list[Path]:
    """An image file, or the images of a folder (sorted)."""
    if path is None:
        return []
    source = Path(path)
    if source.is_dir():
        found = glob_images(source)
        if not found:
            raise UserError(f"{flag} {source}: the folder holds no images")
        return found
    if not source.is_file():
        raise UserError(f"{flag}: image not found: {source}")
    return [source]


def open_image(path: Path, mode: str) -> Image.Image:
    """A decoded image (clear error for an unreadable file)."""
    return Image.fromarray(load_image(path)).convert(mode)


class SeedSource:
    """Seeds of images whose line gives none.

    With `--seed S` the first image gets S and later ones are drawn from a stream seeded with
    S (a run repeats exactly); without it they are drawn at random. `--iter_same_seed` uses one
    seed for all images of an iteration, to compare prompts.
    """

    def __init__(self, seed: int | None, iter_same_seed: bool) -> None:
        self.first = seed
        self.random = random.Random(seed) if seed is not None else random.Random()
        self.iter_same_seed = iter_same_seed
        self.iteration_seed: int | None = None

    def _draw(self) -> int:
        if self.first is not None:
            value, self.first = self.first, None
            return value
        return self.random.randint(0, MAX_SEED)

    def start_iteration(self) -> None:
        if self.iter_same_seed:
            self.iteration_seed = self._draw()

    def next(self) -> int:
        return self.iteration_seed if self.iteration_seed is not None else self._draw()


@dataclass
class JobDefaults:
    """Flag values a line option overrides."""

    width: int | None
    height: int | None
    steps: int
    scale: float
    sampler: str
    negative_scale: float | None
    strength: float | None
    images_per_prompt: int


def jobs_for_line(
    line: PromptLine,
    defaults: JobDefaults,
    seeds: SeedSource,
    init_images: Sequence[Path],
    masks: Sequence[Path],
    first_index: int,
) -> list[ImageJob]:
    """The `--images_per_prompt` jobs of one prompt line."""
    jobs = []
    for number in range(defaults.images_per_prompt):
        index = first_index + number
        if line.seeds:
            seed = line.seeds[number % len(line.seeds)]
        else:
            seed = seeds.next()
        init_image = mask = None
        init_name = None
        if init_images:
            path = init_images[index % len(init_images)]
            init_image, init_name = open_image(path, "RGB"), path.stem
        if masks:
            mask = open_image(masks[index % len(masks)], "RGB")  # RGB: region masks use the channels
        width = line.width or defaults.width
        height = line.height or defaults.height
        if init_image is not None:
            width = width or init_image.width
            height = height or init_image.height
        width, height = _multiple_of_8(width or DEFAULT_SIZE), _multiple_of_8(height or DEFAULT_SIZE)
        negative_scale = None if line.negative_scale_off else (
            line.negative_scale if line.negative_scale is not None else defaults.negative_scale
        )
        strength = line.strength if line.strength is not None else defaults.strength
        jobs.append(
            ImageJob(
                prompt=line.prompt,
                negative_prompt=line.negative_prompt or "",
                seed=seed,
                width=width,
                height=height,
                steps=max(1, line.steps or defaults.steps),
                scale=line.scale if line.scale is not None else defaults.scale,
                sampler=line.sampler or defaults.sampler,
                negative_scale=negative_scale,
                strength=strength if strength is not None else DEFAULT_STRENGTH,
                network_muls=tuple(line.network_muls) if line.network_muls else None,
                clip_prompt=line.clip_prompt,
                init_image=init_image,
                init_image_name=init_name,
                mask=mask,
                index=index,
            )
        )
    return jobs


def _round_to_8(value: int) -> int:
    """An image side as the U-Net takes it: down to a multiple of 8, at least 8."""
    return value if value % 8 == 0 else max(8, value - value % 8)


def _multiple_of_8(value: int) -> int:
    rounded = _round_to_8(value)
    if rounded != value:
        logger.warning("image size %d is not divisible by 8; using %d", value, rounded)
    return rounded


def highres_first_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The 1st stage's size of a highres-fix image: `scale` of the final size, a multiple of 8."""
    return max(8, int(width * scale + 0.5) // 8 * 8), max(8, int(height * scale + 0.5) // 8 * 8)


def planned_sizes(
    lines: Iterable[str], defaults: JobDefaults, has_init_images: bool, highres_fix_scale: float | None
) -> list[tuple[int, int]] | None:
    """Every (width, height) the U-Net will run at for these lines, known before any image is
    opened; None where an init image's own size may decide one (then any size is possible)."""
    sizes = []
    for text in lines:
        line = parse_line(text)
        if line is None:
            continue
        width, height = line.width or defaults.width, line.height or defaults.height
        if has_init_images and not (width and height):
            return None
        size = (_round_to_8(width or DEFAULT_SIZE), _round_to_8(height or DEFAULT_SIZE))
        sizes.append(size)
        if highres_fix_scale is not None:
            sizes.append(highres_first_size(*size, highres_fix_scale))
    return sizes


def batches(jobs: Iterable[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Consecutive jobs with the same batch key, at most `batch_size` at a time."""
    batch: list[ImageJob] = []
    for job in jobs:
        if batch and (len(batch) >= batch_size or batch[0].batch_key() != job.batch_key()):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def with_size(job: ImageJob, width: int, height: int, **changes) -> ImageJob:
    return replace(job, width=width, height=height, **changes)
