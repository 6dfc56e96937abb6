"""Checks of the folders a run writes to, made before the first training step.

A run that can only fail at its first save (an `--output_dir` that is a file, a read-only
`--logging_dir`, a dataset folder where `--cache_latents_to_disk` cannot write) would otherwise
train for hours and then lose everything. Here each folder is created if needed and probed with
a real temporary file, so the failure comes in seconds with one line naming the flag.

Also the translation of "disk full" / "read-only" / "permission denied" errors raised in the
middle of a write into a `UserError` naming the file (`disk_user_error`), used by
`io_util.atomic_path` and by the training-state writer.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from library.errors import UserError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# errors of the storage (not of the program): the user frees space or fixes permissions
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# writers implemented outside Python (safetensors) report the OS error in their message only
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "os error 28", "Disk quota exceeded")


def make_dir(folder: PathLike, what: str) -> Path:
    """`mkdir -p folder`; failure is a `UserError` naming `what` and the real cause (e.g. a file
    where a folder of the path should be, which the OS reports as "File exists")."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocking} is a file, not a folder" if blocking is not None else (err.strerror or str(err))
        raise UserError(f"{what}: cannot create the folder {folder}: {reason}") from err
    return folder


def ensure_writable_dir(path: PathLike, flag: str, create: bool = True) -> Path:
    """Create `path` (with parents) if `create`, then prove that a file can be written in it.

    Raises `UserError` naming `flag` when the path is a file, cannot be created or is not
    writable. The probe file is removed again.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is an existing file, not a folder")
    if not folder.exists():
        if not create:
            raise UserError(f"{flag} {folder}: folder not found")
        make_dir(folder, flag)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise UserError(f"{flag} {folder} is not writable: {err.strerror or err}") from err
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return folder


def check_training_outputs(args: argparse.Namespace, has_sample_prompts: bool) -> None:
    """`--output_dir`, the sample folder and `--logging_dir` of a training run, before training."""
    output_dir = getattr(args, "output_dir", None)
    if output_dir:
        ensure_writable_dir(output_dir, "--output_dir")
        if has_sample_prompts:
            ensure_writable_dir(Path(output_dir) / "sample", "--sample_prompts: sample folder")
    logging_dir = getattr(args, "logging_dir", None)
    if logging_dir:
        ensure_writable_dir(logging_dir, "--logging_dir")


def latent_cache_folders(dataset_group: Any) -> list[Path]:
    """Folders that `--cache_latents_to_disk` writes `.npz` files into (beside the images)."""
    folders: dict[str, None] = {}
    for dataset in getattr(dataset_group, "datasets", []):
        for info in getattr(dataset, "image_data", {}).values():
            path = getattr(info, "latents_npz", None) or getattr(info, "absolute_path", None)
            if path:
                folders[str(Path(path).parent)] = None
    return [Path(f) for f in folders]


def check_latent_cache_folders(folders: Iterable[PathLike]) -> None:
    """Every `.npz` cache folder is writable (`--cache_latents_to_disk`), before any encoding."""
    for folder in folders:
        ensure_writable_dir(folder, "--cache_latents_to_disk: latent cache folder", create=False)


def disk_user_error(err: BaseException, target: PathLike) -> Optional[UserError]:
    """A `UserError` naming `target` when `err` is a storage error (full, read-only, denied)."""
    reason = None
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        reason = DISK_ERRNOS[err.errno]
    elif any(text in str(err) for text in _DISK_FULL_TEXT):
        reason = DISK_ERRNOS[errno.ENOSPC]
    if reason is None:
        return None
    return UserError(f"cannot write {target}: {reason} ({err}); earlier saves are kept")


@contextlib.contextmanager
def disk_errors_as_user_errors(target: PathLike) -> Iterator[None]:
    """Turn storage errors raised inside the block into a `UserError` naming `target`."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # safetensors raises its own error type for OS errors
        user_error = disk_user_error(err, target)
        if user_error is None:
            raise
        raise user_error from err
