"""Caption files and per-step caption processing (shuffle, keep_tokens, dropout, tag dropout, warm-up).

Processing is deterministic: every random choice comes from the generator passed in, which
the dataset seeds from (seed, epoch, batch_index, position).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class CaptionSettings:
    """The subset settings that affect caption processing (names as in the dataset config)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0


def caption_file_candidates(image_path: Path, caption_extension: str) -> list[Path]:
    """`<image minus ext><caption_extension>`, then the same without a `_cx_cy_w_h` face suffix."""
    candidates = [image_path.with_name(image_path.stem + caption_extension)]
    tokens = image_path.stem.split("_")
    if len(tokens) >= 5:
        base = "_".join(tokens[:-4])
        candidates.append(image_path.with_name(base + caption_extension))
    return candidates


def read_caption_file(path: Path) -> str:
    """First line of a UTF-8 caption file, stripped; UserError naming the file if empty/undecodable."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"caption file {path} is not valid UTF-8 text") from None
    except OSError as err:
        raise UserError(f"cannot read caption file {path}: {err}") from None
    lines = text.splitlines()
    if not lines:
        raise UserError(f"caption file {path} is empty; write a caption or delete the file")
    return lines[0].strip().lstrip("\ufeff")


def read_caption(image_path: Path, caption_extension: str) -> str | None:
    """Caption of an image from its caption file, or None when there is no file."""
    for candidate in caption_file_candidates(image_path, caption_extension):
        if candidate.is_file():
            return read_caption_file(candidate)
    return None


def update_tag_frequency(frequency: dict[str, dict[str, int]], dir_name: str, captions: Iterable[str]) -> None:
    """Count lower-cased comma-separated tags per folder (ss_tag_frequency)."""
    counts = frequency.setdefault(dir_name, {})
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1


def warmup_steps(token_warmup_step: float, max_train_steps: int | None) -> int:
    """token_warmup_step below 1 is a fraction of max_train_steps."""
    if 0 < token_warmup_step < 1:
        return math.floor(token_warmup_step * (max_train_steps or 0))
    return int(token_warmup_step)


def process_caption(
    caption: str,
    settings: CaptionSettings,
    rng: np.random.Generator,
    epoch: int,
    step: int,
    max_train_steps: int | None = None,
) -> str:
    """The caption the model sees at this step (sd-scripts order: dropout, warm-up, keep, shuffle, tag dropout).

    `epoch` is 0-based; caption_dropout_every_n_epochs drops on 1-based epochs divisible by n,
    as sd-scripts does.
    """
    drop = settings.caption_dropout_rate > 0 and rng.random() < settings.caption_dropout_rate
    every_n = settings.caption_dropout_every_n_epochs
    drop = drop or (every_n > 0 and (epoch + 1) % every_n == 0)
    if drop:
        return ""
    warmup = warmup_steps(settings.token_warmup_step, max_train_steps)
    if not (settings.shuffle_caption or warmup > 0 or settings.caption_tag_dropout_rate > 0):
        return caption
    tokens = [t.strip() for t in caption.strip().split(",")]
    if warmup > 0 and step < warmup:
        count = math.floor(step * ((len(tokens) - settings.token_warmup_min) / warmup)) + settings.token_warmup_min
        tokens = tokens[: max(0, count)]
    fixed = tokens[: settings.keep_tokens] if settings.keep_tokens > 0 else []
    flex = tokens[settings.keep_tokens :] if settings.keep_tokens > 0 else list(tokens)
    if settings.shuffle_caption:
        order = rng.permutation(len(flex))
        flex = [flex[i] for i in order]
    if settings.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= settings.caption_tag_dropout_rate]
    return ", ".join(fixed + flex)
