"""Model hashes written into LoRA / model metadata (SPEC 2.6).

* `sshs_model_hash` ("addnet" hash of sd-webui-additional-networks / A1111): SHA-256 of the
  safetensors data section, i.e. everything after the 8-byte header length and the header.
* `sshs_legacy_hash`: first 8 hex digits of SHA-256 of the 64 KiB at offset 1 MiB of the
  serialisation that carries only the `ss_*` metadata.
* `model_hash(path)`: the A1111 legacy checkpoint hash (same 1 MiB / 64 KiB rule on a file).
* `calculate_sha256(path)`: SHA-256 of a whole file.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import BinaryIO, Mapping, Union

import safetensors.torch
import torch

from library.errors import UserError

LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000
_READ_BLOCK = 1024 * 1024


def addnet_hash_legacy(stream: BinaryIO) -> str:
    """First 8 hex of SHA-256 of the 64 KiB at offset 1 MiB (empty input for short streams)."""
    sha = hashlib.sha256()
    stream.seek(LEGACY_HASH_OFFSET)
    sha.update(stream.read(LEGACY_HASH_LENGTH))
    return sha.hexdigest()[:8]


def addnet_hash_safetensors(stream: BinaryIO) -> str:
    """SHA-256 (64 hex) of a safetensors stream's data section (after length word and header)."""
    stream.seek(0)
    header_length = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_length)
    sha = hashlib.sha256()
    for block in iter(lambda: stream.read(_READ_BLOCK), b""):
        sha.update(block)
    return sha.hexdigest()


def precalculate_safetensors_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[str, str]:
    """(model_hash, legacy_hash) of the safetensors serialisation of `tensors`.

    Only the `ss_*` metadata enter the serialisation that is hashed, so user-added keys
    (and the sshs_* keys themselves) do not change the result.
    """
    training_metadata = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    serialised = safetensors.torch.save(dict(tensors), training_metadata)
    stream = io.BytesIO(serialised)
    return addnet_hash_safetensors(stream), addnet_hash_legacy(stream)


def _open_for_hash(path: Union[str, os.PathLike]) -> BinaryIO:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cannot hash {path}: file not found")
    return path.open("rb")


def model_hash(path: Union[str, os.PathLike]) -> str:
    """A1111 legacy model hash: 8 hex of SHA-256 of 64 KiB at offset 1 MiB of the file."""
    with _open_for_hash(path) as stream:
        return addnet_hash_legacy(stream)


def calculate_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 (64 hex) of the whole file."""
    sha = hashlib.sha256()
    with _open_for_hash(path) as stream:
        for block in iter(lambda: stream.read(_READ_BLOCK), b""):
            sha.update(block)
    return sha.hexdigest()
