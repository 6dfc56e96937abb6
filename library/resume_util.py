"""`--resume` path handling: a state folder, or an output folder whose latest state is picked;
the run fingerprint that tells a state of this run from another run's.

State folders are written under a hidden temporary name and renamed when complete
(`train_saving.save_train_state`), so every visible `*-state` folder holding a
`train_state.json` is a whole state; hidden (`.`) folders are half-written ones and never used.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Union

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


# --- run fingerprint: is a state from this run? ---------------------------------------------
FINGERPRINT_KEY = "run"  # key of the fingerprint in train_state.json


def model_identity(path: Optional[Union[str, Path]]) -> dict[str, Any]:
    """Name, size and hash of the base model: the A1111 legacy hash (64 KiB at 1 MiB, one short
    read), or SHA-256 for a file too small for it.

    For a Diffusers folder the U-Net weights file stands for the model. Name alone is kept for a
    path that does not exist (the model loader reports that one)."""
    from library import model_hash

    if not path:
        return {}
    source = Path(path)
    identity: dict[str, Any] = {"name": source.name}
    weights = source
    if source.is_dir():
        weights = next(
            (source / "unet" / name for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
             if (source / "unet" / name).is_file()),
            source,
        )
    if weights.is_file():
        try:
            size = weights.stat().st_size
            # the legacy hash reads nothing of a file shorter than its offset: hash small files whole
            small = size <= model_hash.LEGACY_HASH_OFFSET + model_hash.LEGACY_HASH_LENGTH
            digest = (model_hash.calculate_sha256 if small else model_hash.model_hash)(weights)[:16]
        except OSError:  # unreadable: the model loader reports it with its own message
            return identity
        identity.update(size=size, hash=digest)
    return identity


def run_fingerprint(args: Any, method: Any) -> dict[str, Any]:
    """What a state must share with this run to be resumed by it: the trainer, the base model and
    the method's own settings that decide what trains (`TrainingMethod.state_fingerprint`).

    Learning rates, step counts, dataset and saving flags may change between a run and its resume."""
    fingerprint = {
        "trainer": getattr(method, "script_name", "") or type(method).__name__,
        "model": model_identity(getattr(args, "pretrained_model_name_or_path", None)),
        "v_parameterization": bool(getattr(args, "v_parameterization", False)),
        **method.state_fingerprint(args),
    }
    return json.loads(json.dumps(fingerprint))  # the form it has once read back from the JSON


def _same_model(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    # size + hash identify the file: a renamed or moved copy is the same model
    if "hash" in saved and "hash" in current:
        return (saved.get("size"), saved["hash"]) == (current.get("size"), current["hash"])
    return saved.get("name") == current.get("name")


def _describe_model(model: dict[str, Any]) -> str:
    if "hash" not in model:
        return str(model.get("name"))
    return f"{model.get('name')} ({model.get('size')} bytes, hash {model['hash']})"


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`what: X in the state, Y in this run` for every setting that differs. Keys only one side has
    (written by another version) are not compared."""
    differences = []
    for key in [k for k in current if k in saved]:
        before, now = saved[key], current[key]
        if key == "model":
            if isinstance(before, dict) and isinstance(now, dict) and not _same_model(before, now):
                differences.append(f"base model {_describe_model(before)} in the state, {_describe_model(now)} in this run")
        elif before != now:
            differences.append(f"{key} {json.dumps(before)} in the state, {json.dumps(now)} in this run")
    return differences


def check_run_fingerprint(state_dir: Union[str, Path], saved_state: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse another run's state with one line naming the state folder and what differs; a state
    without a fingerprint (older versions, sd-scripts) is resumed with a warning."""
    saved = saved_state.get(FINGERPRINT_KEY)
    if not isinstance(saved, dict):
        logger.warning(
            "--resume: %s records no run settings (written by an older version or by sd-scripts): "
            "cannot check that it is a state of this run", state_dir,
        )
        return
    differences = fingerprint_differences(saved, current)
    if differences:
        raise UserError(
            f"--resume: the state in {state_dir} is from another run: {'; '.join(differences)} "
            "(resume with that run's settings, or train without --resume)"
        )
