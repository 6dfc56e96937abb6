"""WD14 tagger through ONNX Runtime: the model folder layout, preprocessing, and tag selection.

A WD14 model folder holds `model.onnx` (input NHWC float32 BGR 0-255 of a fixed square size,
output one sigmoid probability per tag) and `selected_tags.csv` (`tag_id,name,category,count`;
category 9 = rating, 0 = general, 4 = character; row i is output i).
"""
from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from library.captioning import fetch_hub_snapshot
from library.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
DEFAULT_MODEL_DIR = "wd14_tagger_model"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4


# ---------------------------------------------------------------------------------------
# model folder

def model_location(model_dir: str | Path, repo_id: str) -> Path:
    """sd-scripts keeps each repo in `<model_dir>/<repo_id with / as _>`; a `model_dir` that
    itself holds model.onnx is used as it is."""
    model_dir = Path(model_dir)
    if (model_dir / MODEL_FILE).is_file():
        return model_dir
    return model_dir / repo_id.replace("/", "_")


def ensure_model_files(model_dir: str | Path, repo_id: str, force_download: bool = False) -> Path:
    """The folder with model.onnx and selected_tags.csv, downloaded from `repo_id` if missing."""
    location = model_location(model_dir, repo_id)
    complete = (location / MODEL_FILE).is_file() and (location / TAGS_FILE).is_file()
    if complete and not force_download:
        return location
    logger.info("downloading WD14 tagger %s to %s", repo_id, location)
    fetch_hub_snapshot(repo_id, "--model_dir", "WD14 tagger", [MODEL_FILE, TAGS_FILE], local_dir=location,
                       force_download=force_download)
    for name in (MODEL_FILE, TAGS_FILE):
        if not (location / name).is_file():
            raise UserError(f"WD14 tagger {repo_id}: {name} is missing in {location}")
    return location


@dataclass
class TagTable:
    """Tag names of the model outputs, by category (indices are output positions)."""

    names: list[str]
    categories: list[int]

    def indices(self, category: int) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c == category]


def read_tag_table(path: Path) -> TagTable:
    names, categories = [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise UserError(f"{path}: expected a header 'tag_id,name,category,count'")
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            names.append(row[1])
            categories.append(int(row[2]))
        except (IndexError, ValueError):
            raise UserError(f"{path}:{line_no}: expected 'tag_id,name,category,count', got {row!r}") from None
    if not names:
        raise UserError(f"{path}: no tags")
    return TagTable(names, categories)


class WD14Model:
    """An ONNX Runtime session of model.onnx (CUDA when available) and its tag table."""

    def __init__(self, folder: Path):
        import onnxruntime as ort

        self.tags = read_tag_table(folder / TAGS_FILE)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(folder / MODEL_FILE), providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception classes
            raise UserError(f"cannot load ONNX model {folder / MODEL_FILE}: {err}") from None
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = model_input.shape
        if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] or shape[3] != 3:
            raise UserError(f"{folder / MODEL_FILE}: expected an input of shape [batch, size, size, 3], got {shape}")
        self.image_size = int(shape[1])
        self.path = folder / MODEL_FILE
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int):
            self._check_output_size(outputs[-1])

    def _check_output_size(self, size: int) -> None:
        if size != len(self.tags.names):
            raise UserError(
                f"{self.path} outputs {size} probabilities but {self.path.parent / TAGS_FILE} lists "
                f"{len(self.tags.names)} tags (the CSV belongs to another model?)"
            )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """[N, size, size, 3] BGR float32 → [N, tags] probabilities."""
        probs = self.session.run(None, {self.input_name: batch.astype(np.float32)})[0]
        self._check_output_size(probs.shape[-1])
        return probs


def preprocess_image(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 → the WD14 input: padded to a square on white, resized to `size`, BGR float32."""
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.full((side, side, 3), 255, dtype=np.uint8)
    square[top : top + height, left : left + width] = image
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LANCZOS4
    square = cv2.resize(square, (size, size), interpolation=interpolation)
    return square[:, :, ::-1].astype(np.float32)


# ---------------------------------------------------------------------------------------
# tag selection

def split_escaped(text: str, separator: str) -> list[str]:
    """Split on `separator` except where it is escaped with a backslash (`\\,`)."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            current.append(text[i + 1])
            i += 2
            continue
        if text[i] == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def parse_tag_replacement(spec: Optional[str]) -> list[tuple[str, str]]:
    """`--tag_replacement "src1,dst1;src2,dst2"` (`\\,` and `\\;` for literal commas/semicolons)."""
    if not spec:
        return []
    pairs = []
    for item in _split_keep_escapes(spec, ";"):
        if not item.strip():
            continue
        fields = split_escaped(item, ",")
        if len(fields) != 2 or not fields[0].strip():
            raise UserError(f"--tag_replacement: expected 'source,target' pairs separated by ';', got {item!r}")
        pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


def _split_keep_escapes(text: str, separator: str) -> list[str]:
    """Like split_escaped, but escapes other than `\\<separator>` are kept for the next split."""
    escaped = "\\" + separator
    placeholder = "\0"
    return [part.replace(placeholder, separator) for part in text.replace(escaped, placeholder).split(separator)]


def split_tags(text: Optional[str], separator: str) -> list[str]:
    """Comma-style list of the user's tags (`--undesired_tags`, `--always_first_tags`, caption files)."""
    if not text:
        return []
    sep = separator.strip() or separator
    return [tag.strip() for tag in text.split(sep) if tag.strip()]


@dataclass
class TagSettings:
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    undesired_tags: set[str] = field(default_factory=set)
    remove_underscore: bool = False
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    character_tags_first: bool = False
    always_first_tags: list[str] = field(default_factory=list)
    caption_separator: str = ", "
    tag_replacements: list[tuple[str, str]] = field(default_factory=list)


def display_name(tag: str, settings: TagSettings) -> str:
    """The name written: underscores → spaces for tags longer than 3 characters (keeps `^_^`),
    then `--tag_replacement`."""
    if settings.remove_underscore and len(tag) > 3:
        tag = tag.replace("_", " ")
    for source, target in settings.tag_replacements:
        if tag == source:
            tag = target
    return tag


def select_tags(probs: np.ndarray, table: TagTable, settings: TagSettings) -> list[str]:
    """Tags of one image, in the order they are written."""
    def above(category: int, threshold: float) -> list[str]:
        chosen = []
        for i in table.indices(category):
            name = display_name(table.names[i], settings)
            if probs[i] >= threshold and name not in settings.undesired_tags and name not in chosen:
                chosen.append(name)
        return chosen

    general = above(GENERAL, settings.general_threshold)
    character = above(CHARACTER, settings.character_threshold)
    tags = character + general if settings.character_tags_first else general + character
    # the user's first tags go to the front in the order given
    for tag in reversed(settings.always_first_tags):
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    ratings = table.indices(RATING)
    if ratings and (settings.use_rating_tags or settings.use_rating_tags_as_last_tag):
        rating = display_name(table.names[max(ratings, key=lambda i: probs[i])], settings)
        if rating not in settings.undesired_tags:
            if settings.use_rating_tags_as_last_tag:
                tags.append(rating)
            else:
                tags.insert(0, rating)
    return tags


def merge_with_existing(existing_text: str, new_tags: Sequence[str], separator: str) -> list[str]:
    """`--append_tags`: the file's tags, then the new ones it does not have yet."""
    tags = split_tags(existing_text.strip().splitlines()[0] if existing_text.strip() else "", separator)
    return tags + [tag for tag in new_tags if tag not in tags]


def frequency_report(counter: Counter) -> str:
    lines = ["tag frequencies:"]
    lines += [f"{tag}: {count}" for tag, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "\n".join(lines)


def settings_from_args(args: Any) -> TagSettings:
    thresh = args.thresh
    separator = args.caption_separator
    return TagSettings(
        general_threshold=args.general_threshold if args.general_threshold is not None else thresh,
        character_threshold=args.character_threshold if args.character_threshold is not None else thresh,
        undesired_tags=set(split_tags(args.undesired_tags, separator)),
        remove_underscore=args.remove_underscore,
        use_rating_tags=args.use_rating_tags,
        use_rating_tags_as_last_tag=args.use_rating_tags_as_last_tag,
        character_tags_first=args.character_tags_first,
        always_first_tags=split_tags(args.always_first_tags, separator),
        caption_separator=separator,
        tag_replacements=parse_tag_replacement(args.tag_replacement),
    )
