"""`--resume` path handling: a state folder, or an output folder whose latest state is picked.

State folders are written under a hidden temporary name and renamed when complete
(`train_saving.save_train_state`), so every visible `*-state` folder holding a
`train_state.json` is a whole state; hidden (`.`) folders are half-written ones and never used.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Union

from library.errors import UserError

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"  # same name as train_saving.TRAIN_STATE_FILE
# files accelerate.save_state writes; a folder written by sd-scripts has these but no JSON
_ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "model.safetensors", "pytorch_model.bin")


def is_state_folder(path: Path) -> bool:
    """True for a folder written by `--save_state` (ours or sd-scripts')."""
    return path.is_dir() and any((path / name).is_file() for name in (TRAIN_STATE_FILE, *_ACCELERATE_FILES))


def state_step(path: Path) -> int:
    """Global step recorded in a state folder (-1 when it has no readable train_state.json)."""
    try:
        data = json.loads((path / TRAIN_STATE_FILE).read_text(encoding="utf-8"))
        return int(data.get("global_step", data.get("current_step", -1)))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1


def find_latest_state(folder: Path) -> Optional[Path]:
    """The state folder in `folder` with the highest step (then the newest), or None."""
    candidates = [
        child for child in folder.iterdir()
        if not child.name.startswith(".") and child.name.endswith("-state") and is_state_folder(child)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda child: (state_step(child), child.stat().st_mtime, child.name))


def resolve_resume_path(value: Optional[Union[str, Path]]) -> Optional[Path]:
    """The state folder `--resume value` means; the latest state when `value` is an output folder."""
    if not value:
        return None
    path = Path(value)
    if not path.exists():
        raise UserError(f"--resume: state folder not found: {path}")
    if not path.is_dir():
        raise UserError(f"--resume {path} is a file: give a state folder (*-state) or the output folder holding them")
    if is_state_folder(path):
        return path
    latest = find_latest_state(path)
    if latest is None:
        raise UserError(
            f"--resume {path}: no training state in this folder (states are '*-state' folders written with "
            "--save_state or --save_state_on_train_end)"
        )
    logger.info("--resume %s: using the latest state found: %s (step %d)", path, latest.name, state_step(latest))
    return latest


def mismatch_message(state_dir: Path, err: BaseException) -> str:
    """One line for a state that cannot be loaded into this run (another run's state)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    if isinstance(err, FileNotFoundError):
        return f"--resume: the state in {state_dir} is incomplete: {first}"
    if "size mismatch" in str(err):
        first = "tensor shapes differ (" + str(err).split("size mismatch for ", 1)[1].splitlines()[0].strip() + ")"
    return (
        f"--resume: the state in {state_dir} does not fit this run (saved by a run with other settings, "
        f"e.g. another network or --network_dim?): {first}"
    )
