"""Caption files and per-step caption processing (shuffle, keep_tokens, dropout, tag dropout, warm-up).

Processing is deterministic: every random choice comes from the generator passed in, which
the dataset seeds from (seed, epoch, batch_index, position).
"""
from __future__ import annotations

import json
import logging
import math
import re
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
    replacements: dict[str, str | list[str]] | None = None,
) -> str:
    """The caption the model sees at this step (sd-scripts order: dropout, warm-up, keep, shuffle, tag dropout).

    `epoch` is 0-based; caption_dropout_every_n_epochs drops on 1-based epochs divisible by n,
    as sd-scripts does. `replacements` (textual inversion) then replace text; the key "" replaces
    the whole caption (by one of a list of templates, chosen at random).
    """
    drop = settings.caption_dropout_rate > 0 and rng.random() < settings.caption_dropout_rate
    every_n = settings.caption_dropout_every_n_epochs
    drop = drop or (every_n > 0 and (epoch + 1) % every_n == 0)
    if drop:
        return ""
    warmup = warmup_steps(settings.token_warmup_step, max_train_steps)
    if settings.shuffle_caption or warmup > 0 or settings.caption_tag_dropout_rate > 0:
        caption = _shuffle_and_drop_tags(caption, settings, rng, step, warmup)
    for old, new in (replacements or {}).items():
        if old == "":
            caption = new[int(rng.integers(0, len(new)))] if isinstance(new, list) else new
        else:
            caption = caption.replace(old, new)  # type: ignore[arg-type]
    return caption


def _shuffle_and_drop_tags(caption: str, settings: CaptionSettings, rng: np.random.Generator, step: int, warmup: int) -> str:
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


# --- metadata JSON helpers for the finetune/ scripts ----------------------------------------------
def read_metadata_file(path: str | Path) -> dict:
    """Metadata JSON object; UserError naming the file when missing, unreadable or not an object."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metadata file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"metadata file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"metadata file {path} must hold a JSON object keyed by image")
    return data


def merge_text_files_into_metadata(
    metadata: dict, image_paths: Iterable[Path], field_name: str, extension: str, full_path: bool
) -> int:
    """Put the text of `<image stem><extension>` under `field_name` of each image's entry.

    Keys are the image stem, or the full path with `full_path`. Images without a text file
    are logged and left out. Returns how many entries were set.
    """
    count = 0
    for image_path in image_paths:
        text_path = image_path.with_name(image_path.stem + extension)
        if not text_path.is_file():
            logger.warning(f"no {extension} file for {image_path}; skipped")
            continue
        try:
            text = text_path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"{text_path} is not valid UTF-8 text") from None
        key = str(image_path) if full_path else image_path.stem
        metadata.setdefault(key, {})[field_name] = text
        count += 1
    return count


# sd-scripts clean_captions_and_tags rules (the tag patterns assume ", tag, " delimiters)
_HAIR_LENGTH = re.compile(r", (long|short|medium) hair, ")
_HAIR_CUT = re.compile(r", (bob|hime) cut, ")
_HAIR = re.compile(r", ([\w\-]+) hair, ")
_WORD = re.compile(r", ([\w\-]+|hair ornament), ")
# with several people, per-person attributes that occur more than once are dropped
_MULTI_PERSON_PATTERNS = [
    _HAIR_LENGTH,
    _HAIR_CUT,
    re.compile(r", [\w\-]+ eyes, "),
    re.compile(r", ([\w\-]+ sleeves|sleeveless), "),
    re.compile(
        r", (ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up|two tails"
        r"|[\w\-]+ braid|sidelocks), "
    ),
]
# applied in order, each until nothing changes
CAPTION_REPLACEMENTS = [
    ("anime anime", "anime"), ("young ", ""), ("anime girl", "girl"), ("cartoon female", "girl"),
    ("cartoon lady", "girl"), ("cartoon character", "girl"), ("cartoon woman", "girl"), ("cartoon women", "girls"),
    ("cartoon girl", "girl"), ("anime female", "girl"), ("anime lady", "girl"), ("anime character", "girl"),
    ("anime woman", "girl"), ("anime women", "girls"), ("lady", "girl"), ("female", "girl"), ("woman", "girl"),
    ("women", "girls"), ("people", "girls"), ("person", "girl"), ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"), ("a cartoon picture", "a picture"), ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"), ("a cartoon drawing", "a drawing"), ("girl girl", "girl"),
]


def clean_tags(image_key: str, tags: str) -> str:
    """Tagger output clean-up: `_` -> space (not in `^_^`), drop ratings, drop duplicate/conflicting tags."""
    tags = tags.replace("^_^", "\x00").replace("_", " ").replace("\x00", "^_^")
    parts = tags.split(", rating")  # DeepDanbooru appends ratings last
    if len(parts) > 2:
        logger.warning(f"multiple ratings in the tags of {image_key}: {tags}")
    tags = parts[0]
    padded = ", " + tags.replace(", ", ", , ") + ", "  # every tag now has its own ", " on both sides
    if "girls" in padded or "boys" in padded:
        for pattern in _MULTI_PERSON_PATTERNS:
            if len(pattern.findall(padded)) > 1:
                padded = pattern.sub("", padded)
        # one shared hair length survives the hair-colour removal below
        hair_length = _HAIR_LENGTH.search(padded)
        if hair_length:
            padded = _HAIR_LENGTH.sub(", @@@, ", padded)
        if len(_HAIR.findall(padded)) > 1:
            padded = _HAIR.sub("", padded)
        if hair_length:
            padded = padded.replace(", @@@, ", hair_length.group())
    # "shirt" is redundant next to "white shirt"
    for word in _WORD.findall(padded):
        if re.search(rf", ((\w+) )+{re.escape(word)}, ", padded):
            padded = padded.replace(f", {word}, ", "")
    padded = padded.replace(", , ", ", ")
    return padded[2:-2]


def clean_caption(caption: str) -> str:
    """Normalise BLIP-style captions ("anime woman" -> "girl", ...)."""
    for old, new in CAPTION_REPLACEMENTS:
        while old in caption:
            caption = caption.replace(old, new)
    return caption


def clean_metadata(metadata: dict, debug: bool = False) -> dict:
    """Clean `tags` and `caption` of every entry in place; returns the metadata."""
    for image_key, entry in metadata.items():
        for field_name, cleaner in (("tags", lambda text: clean_tags(image_key, text)), ("caption", clean_caption)):
            value = entry.get(field_name)
            if value is None:
                logger.info(f"{image_key} has no {field_name}")
                continue
            cleaned = cleaner(value)
            entry[field_name] = cleaned
            if debug and cleaned != value:
                logger.info(f"{image_key} {field_name}\n  FROM: {value}\n  TO:   {cleaned}")
    return metadata
