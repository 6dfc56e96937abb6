"""Reading a `.safetensors` header on its own: the JSON after the 8-byte length word.

Tools that only need the metadata (`show_metadata.py`, the LoRA tools) read the header
directly instead of opening the file with the safetensors library, so files written by
other programs - with dtypes this safetensors version does not know, or no metadata - are
still readable, and no tensor data is touched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from library.errors import UserError

PathLike = Union[str, os.PathLike]
METADATA_KEY = "__metadata__"
# the safetensors format caps headers at 100 MB; anything larger is not a safetensors file
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: PathLike) -> dict[str, Any]:
    """The parsed header: tensor entries plus `__metadata__` when present."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else 0
        if length <= 0 or length > MAX_HEADER_BYTES or 8 + length > size:
            raise UserError(f"{path}: not a safetensors file (bad header length)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is a {type(header).__name__}, not an object)")
    return header


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The `__metadata__` object of a safetensors file ({} when there is none).

    Values are returned as stored; the format says strings, but files from other tools may
    hold other JSON values and are not refused for it.
    """
    metadata = read_header(path).get(METADATA_KEY)
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: '{METADATA_KEY}' in the header is a {type(metadata).__name__}, not an object")
    return metadata
