"""Shared parts of the captioners and the tagger: finding images, loading them in batches,
locating model folders, and writing one caption / tag file per image.

`finetune/make_captions.py` (BLIP), `finetune/make_captions_by_git.py` (GIT) and
`finetune/tag_images_by_wd14_tagger.py` (WD14 ONNX) all run `caption_images` with their own
`describe` function; the file handling, corrupt-image skipping and batching live here once.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from library.errors import UserError
from library.image_util import glob_images, glob_images_recursive, load_image
from library.io_util import write_text_atomic

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# images

def find_images(train_data_dir: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Images of the folder (and its subfolders with `recursive`); UserError if there are none."""
    folder = Path(train_data_dir)
    if not folder.is_dir():
        raise UserError(f"train_data_dir: folder not found: {folder}")
    paths = glob_images_recursive(folder) if recursive else glob_images(folder)
    if not paths:
        hint = "" if recursive else " (use --recursive for images in subfolders)"
        raise UserError(f"train_data_dir: no images (.png/.jpg/.jpeg/.webp/.bmp) in {folder}{hint}")
    return paths


@dataclass
class LoadedImage:
    """One image of a batch: its path and the preprocessed pixels (None if it could not be read)."""

    path: Path
    data: Any
    error: Optional[str] = None


class ImageFolderDataset(torch.utils.data.Dataset):
    """Decodes images (and runs `preprocess` on the HxWx3 uint8 RGB array) in loader workers.

    A file that cannot be decoded yields an item with `error` set instead of raising, so one
    corrupt image never stops a run over thousands.
    """

    def __init__(self, paths: Sequence[Path], preprocess: Optional[Callable[[np.ndarray], Any]] = None):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        path = self.paths[index]
        try:
            image = load_image(path)
        except UserError as err:
            return LoadedImage(path, None, str(err))
        return LoadedImage(path, self.preprocess(image) if self.preprocess else image)


def _keep_list(items: list[LoadedImage]) -> list[LoadedImage]:
    return items


def iter_image_batches(
    paths: Sequence[Path],
    batch_size: int = 1,
    n_workers: Optional[int] = None,
    preprocess: Optional[Callable[[np.ndarray], Any]] = None,
) -> Iterator[list[LoadedImage]]:
    """Batches of readable images in `paths` order; unreadable ones are logged and left out."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    dataset = ImageFolderDataset(paths, preprocess)
    # n_workers None (the sd-scripts default) loads in the main process, like 0
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=n_workers or 0, collate_fn=_keep_list
    )
    for batch in loader:
        good = []
        for item in batch:
            if item.error is not None:
                logger.warning("skipping %s: %s", item.path, item.error)
            else:
                good.append(item)
        if good:
            yield good


# ---------------------------------------------------------------------------------------
# caption files

def caption_path(image_path: Path, caption_extension: str) -> Path:
    """`<image path without its extension><caption_extension>` (sd-scripts' naming)."""
    return image_path.with_name(image_path.stem + caption_extension)


def caption_images(
    paths: Sequence[Path],
    describe: Callable[[list[LoadedImage]], list[str]],
    caption_extension: str,
    batch_size: int = 1,
    n_workers: Optional[int] = None,
    preprocess: Optional[Callable[[np.ndarray], Any]] = None,
    debug: bool = False,
) -> dict[Path, str]:
    """Run `describe` over batches of images and write each result to its caption file.

    Returns {caption file: text} for the files written. Each file is written atomically, so an
    interrupted run leaves every caption either old or new, never cut off.
    """
    written: dict[Path, str] = {}
    total = len(paths)
    with tqdm(total=total, desc="captioning", unit="image") as progress:
        for batch in iter_image_batches(paths, batch_size, n_workers, preprocess):
            texts = describe(batch)
            if len(texts) != len(batch):
                raise RuntimeError(f"captioner returned {len(texts)} captions for {len(batch)} images")
            for item, text in zip(batch, texts):
                target = caption_path(item.path, caption_extension)
                write_text_atomic(target, text + "\n")
                written[target] = text
                if debug:
                    print(f"{item.path}: {text}")
            progress.update(len(batch))
    skipped = total - len(written)
    logger.info("wrote %d caption files%s", len(written), f" ({skipped} images skipped)" if skipped else "")
    return written


# ---------------------------------------------------------------------------------------
# models

def looks_like_local_path(name: str) -> bool:
    """True for things a user means as a folder: absolute, ./ ../ ~, backslashes, or >1 slash."""
    return (
        Path(name).is_absolute()
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") != 1
    )


def resolve_model_source(name: str, flag: str, what: str) -> str:
    """A local model folder (checked) or a hub id (returned as given, loaded by the caller)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"{flag} {name}: not a transformers {what} folder (no config.json in it)")
        return str(path)
    if looks_like_local_path(name):
        raise UserError(f"{flag} {name}: model folder not found")
    return name


HUB_CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library messages can run to many lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def fetch_hub_snapshot(
    repo_id: str,
    flag: str,
    what: str,
    allow_patterns: Sequence[str],
    local_dir: Optional[Path] = None,
    force_download: bool = False,
) -> Path:
    """Files of a hub repo from the local cache, or downloaded when the hub can be reached.

    One listing request decides: offline, a missing cache fails in seconds with one line
    naming the model and the flag that takes a local folder (instead of a retry per file).
    """
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=list(allow_patterns), force_download=force_download,
                                   local_dir=str(local_dir) if local_dir is not None else None)
    except Exception as err:  # noqa: BLE001 - hub errors have many types; all mean "not available"
        reason = first_line(err)
        raise UserError(
            f"{what} model {repo_id!r} is not on disk and cannot be downloaded ({reason}); download it on a "
            f"machine with internet (e.g. `huggingface-cli download {repo_id} --local-dir <folder>`) and pass "
            f"{flag} <folder>"
        ) from None
    return Path(folder)


def fetch_hub_model(repo_id: str, flag: str, what: str) -> Path:
    """A transformers model repo: configs and safetensors weights (.bin only when there are none)."""
    folder = fetch_hub_snapshot(repo_id, flag, what, HUB_CONFIG_PATTERNS + ["*.safetensors"])
    if not any(folder.glob("*.safetensors")):
        folder = fetch_hub_snapshot(repo_id, flag, what, HUB_CONFIG_PATTERNS + ["*.bin"])
    return folder


def load_pretrained(loaders: Sequence[Callable[[str], Any]], name: str, flag: str, what: str) -> list[Any]:
    """Each `loader(folder)` on a local folder, or on the hub snapshot of a hub id (cached or fetched)."""
    source = resolve_model_source(name, flag, what)
    if source == name and not Path(name).exists():
        source = str(fetch_hub_model(name, flag, what))
    try:
        return [loader(source) for loader in loaders]
    except (OSError, ValueError) as err:
        reason = first_line(err)
        raise UserError(f"{flag} {name}: cannot load the {what} model from {source} ({reason})") from None


def preferred_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_common_caption_arguments(parser: argparse.ArgumentParser, caption_extension: str) -> None:
    """Flags every captioner has, with sd-scripts' names and defaults."""
    parser.add_argument("train_data_dir", type=str, help="folder of the images to caption")
    parser.add_argument("--caption_extension", type=str, default=caption_extension,
                        help=f"extension of the caption files written (default {caption_extension})")
    parser.add_argument("--caption_extention", type=str, default=None,
                        help="old misspelling of --caption_extension; overrides it when given")
    parser.add_argument("--batch_size", type=int, default=1, help="images per model call")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="worker processes that decode images (default: in the main process)")
    parser.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    parser.add_argument("--debug", action="store_true", help="print each caption as it is written")


def caption_extension_of(args: argparse.Namespace) -> str:
    return args.caption_extention if getattr(args, "caption_extention", None) is not None else args.caption_extension


def caption_folder(
    args: argparse.Namespace,
    make_describe: Callable[[], Callable[[list[LoadedImage]], list[str]]],
    preprocess: Optional[Callable[[np.ndarray], Any]] = None,
) -> dict[Path, str]:
    """A captioner's main loop from its parsed common flags: the images are listed first (a
    wrong folder fails before any model loads), then `make_describe()` loads the model."""
    paths = find_images(args.train_data_dir, args.recursive)
    describe = make_describe()
    logger.info("captioning %d images", len(paths))
    return caption_images(paths, describe, caption_extension_of(args), args.batch_size,
                          args.max_data_loader_n_workers, preprocess, args.debug)
