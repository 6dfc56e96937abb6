"""Fault injection for the reliability tests: scripts run in a subprocess with this folder on
PYTHONPATH, so Python imports this module at start-up, before any library code.

Each fault is off unless its environment variable is set (tests only):

- `REL_ENOSPC_MATCH=<text>`: `safetensors.torch.save_file` to a path containing <text> writes
  the first half of the real file, then raises `OSError(ENOSPC)`, as a full disk does.
- `REL_SLOW_SAVE_MATCH=<text>`: such a save writes the first half, creates the file named by
  `REL_SLOW_SAVE_MARKER`, then sleeps (the test SIGKILLs the process meanwhile).
- `REL_DENY_WRITE_DIR=<folder>`: `tempfile.mkstemp(dir=<folder>)` raises `PermissionError`, as
  a folder the user may not write does (also when the tests run as root, where chmod cannot).
- `REL_NAN_AFTER_CALLS=<n>`: `custom_train_functions.compute_loss` returns NaN from its n-th
  call on (1-based); `REL_NAN_CALLS=<a,b>` only on those calls.
"""
from __future__ import annotations

import errno
import os
import time

_ENOSPC = os.environ.get("REL_ENOSPC_MATCH")
_SLOW = os.environ.get("REL_SLOW_SAVE_MATCH")
_DENY = os.environ.get("REL_DENY_WRITE_DIR")
_NAN_AFTER = os.environ.get("REL_NAN_AFTER_CALLS")
_NAN_CALLS = os.environ.get("REL_NAN_CALLS")


def _install_save_faults() -> None:
    import safetensors.torch as st

    real_save_file = st.save_file

    def save_file(tensors, filename, metadata=None):
        name = str(filename)
        for match, action in ((_ENOSPC, "enospc"), (_SLOW, "slow")):
            if match and match in name:
                real_save_file(tensors, filename, metadata=metadata)
                data = open(filename, "rb").read()
                with open(filename, "wb") as handle:  # what got to disk before the failure
                    handle.write(data[: len(data) // 2])
                if action == "enospc":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
                open(os.environ["REL_SLOW_SAVE_MARKER"], "w", encoding="utf-8").close()
                time.sleep(600)
        return real_save_file(tensors, filename, metadata=metadata)

    st.save_file = save_file


def _install_deny_write() -> None:
    import tempfile

    real_mkstemp = tempfile.mkstemp
    denied = os.path.realpath(_DENY)

    def mkstemp(*args, **kwargs):
        folder = kwargs.get("dir")
        if folder is not None and os.path.realpath(str(folder)) == denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        return real_mkstemp(*args, **kwargs)

    tempfile.mkstemp = mkstemp


def _install_nan_loss() -> None:
    import sys

    sys.path.insert(0, os.getcwd())  # scripts run from the repository root
    from library import custom_train_functions as ctf

    real_compute_loss = ctf.compute_loss
    after = int(_NAN_AFTER) if _NAN_AFTER else None
    calls = {int(c) for c in _NAN_CALLS.split(",")} if _NAN_CALLS else set()
    count = {"n": 0}

    def compute_loss(*args, **kwargs):
        loss = real_compute_loss(*args, **kwargs)
        count["n"] += 1
        if (after is not None and count["n"] >= after) or count["n"] in calls:
            return loss * float("nan")  # keeps the graph: backward gives NaN gradients, as in a real blow-up
        return loss

    ctf.compute_loss = compute_loss


if _ENOSPC or _SLOW:
    _install_save_faults()
if _DENY:
    _install_deny_write()
if _NAN_AFTER or _NAN_CALLS:
    _install_nan_loss()
