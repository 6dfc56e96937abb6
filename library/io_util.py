"""Atomic file writing: outputs are written to a temp file and renamed into place.

An existing output is therefore never left half-overwritten when a save is interrupted.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no plain getter)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _raise_disk_error(err: BaseException, target: Path) -> None:
    """A full / read-only disk is the user's to fix: re-raise it as one line naming the file."""
    from library.preflight import disk_user_error  # late import: preflight imports nothing from here

    user_error = disk_user_error(err, target) if isinstance(err, Exception) else None
    if user_error is not None:
        raise user_error from err


def _make_parent(target: Path) -> None:
    """Create the output's folder; a path through a file or a read-only place is the user's to fix."""
    from library.preflight import make_dir

    make_dir(target.parent, f"cannot write {target}")


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` atomically.

    The temp file keeps the target's extension (or `suffix`) because some writers pick the
    format from the extension. On error the temp file is removed and `target` is untouched.
    """
    target = Path(target)
    _make_parent(target)
    ext = suffix if suffix is not None else target.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{ext}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, target.stat().st_mode & 0o777 if target.is_file() else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _raise_disk_error(err, target)
        raise


@contextlib.contextmanager
def atomic_dir(target: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`.

    An existing folder is moved aside first and deleted only after the new one is in place.
    """
    target = Path(target)
    _make_parent(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        # mkdtemp makes 0700 folders; give the output the mode a plain mkdir would
        os.chmod(tmp, 0o777 & ~_umask())
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_disk_error(err, target)
        raise
    replace_dir(tmp, target)


def replace_dir(new: PathLike, target: PathLike) -> None:
    """Move the finished folder `new` to `target` (a sibling on the same file system).

    An existing `target` is moved aside first and deleted only after `new` is in place, so
    an interruption never leaves no folder where a good one was.
    """
    target = Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(target: PathLike, text: str) -> None:
    """Write UTF-8 text to `target` through a temp file."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
