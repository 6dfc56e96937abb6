"""Model hashes written into LoRA / model metadata (SPEC 2.6).

* `sshs_model_hash` ("addnet" hash of sd-webui-additional-networks / A1111): SHA-256 of the
  safetensors data section, i.e. everything after the 8-byte header length and the header.
* `sshs_legacy_hash`: first 8 hex digits of SHA-256 of the 64 KiB at offset 1 MiB of the
  serialisation that carries only the `ss_*` metadata.
* `model_hash(path)`: the A1111 legacy checkpoint hash (same 1 MiB / 64 KiB rule on a file).
* `calculate_sha256(path)`: SHA-256 of a whole file (`prefetch_sha256(path)` starts it in the
  background, so that a trainer's metadata hash overlaps model loading).
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
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


def _sha256_of_file(path: Union[str, os.PathLike]) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(_READ_BLOCK)
    view = memoryview(buffer)
    with _open_for_hash(path) as stream:
        while True:
            count = stream.readinto(buffer)
            if not count:
                break
            sha.update(view[:count])
    return sha.hexdigest()


class _Sha256Job:
    """One file hashed in a daemon thread (hashlib releases the GIL while it hashes)."""

    def __init__(self, path: Path) -> None:
        self._result: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), name=f"sha256 {path.name}", daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._result = _sha256_of_file(path)
        except BaseException as err:  # noqa: BLE001 - handed to the caller of wait()
            self._error = err

    def wait(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


# (resolved path, size, mtime_ns) -> job; a changed file gets a new key and is hashed again
_PREFETCHED: dict[tuple[str, int, int], _Sha256Job] = {}
_PREFETCH_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def prefetch_sha256(path: Union[str, os.PathLike]) -> None:
    """Start hashing `path` in the background; `calculate_sha256` of the unchanged file then
    waits for that result instead of reading the file again. A trainer calls it at start, so the
    hash of a multi-GB model overlaps loading it instead of delaying the first save."""
    path = Path(path)
    if not path.is_file():
        return
    key = _file_key(path)
    with _PREFETCH_LOCK:
        if key not in _PREFETCHED:
            _PREFETCHED[key] = _Sha256Job(path)


def calculate_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 (64 hex) of the whole file (the background result of `prefetch_sha256` when there is one)."""
    path = Path(path)
    if path.is_file():
        with _PREFETCH_LOCK:
            job = _PREFETCHED.get(_file_key(path))
        if job is not None:
            return job.wait()
    return _sha256_of_file(path)
