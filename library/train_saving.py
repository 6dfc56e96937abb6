"""Output names, save cadence, removal of old saves and training-state folders.

Names follow sd-scripts (SPEC 1.9, made by `library.train_util`): epoch saves
`{name|"epoch"}-{epoch:06d}.{ext}`, step saves `{name|"at"}-step{step:08d}.{ext}`, the final
save `{name|"last"}.{ext}`; state folders add `-state`. A state folder is what `accelerator.save_state` writes plus `train_state.json`
(global step, epoch and the number of batches of that epoch already trained), enough for
`--resume` to continue exactly where the run stopped.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from library import train_util
from library.errors import UserError
from library.io_util import replace_dir
from library.preflight import disk_errors_as_user_errors
from library.resume_util import FINGERPRINT_KEY, mismatch_message

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"


@dataclass
class SavePlan:
    """When to save models and states, and which old saves to remove (sd-scripts rules)."""

    args: Namespace
    output_dir: Path
    num_train_epochs: int
    save_every_n_epochs: Optional[int] = None
    save_every_n_steps: Optional[int] = None
    save_last_n_epochs: Optional[int] = None
    save_last_n_epochs_state: Optional[int] = None
    save_last_n_steps: Optional[int] = None
    save_last_n_steps_state: Optional[int] = None
    save_state: bool = False

    @classmethod
    def from_args(cls, args: Namespace, num_train_epochs: int) -> "SavePlan":
        if not getattr(args, "output_dir", None):
            raise UserError("--output_dir is required (the folder the trained model is saved to)")
        every_n_epochs = getattr(args, "save_every_n_epochs", None)
        ratio = getattr(args, "save_n_epoch_ratio", None)
        if ratio:
            # sd-scripts: save N times over the run (at least every epoch)
            every_n_epochs = max(1, math.floor(num_train_epochs / ratio))
        return cls(
            args=args,
            output_dir=Path(args.output_dir),
            num_train_epochs=num_train_epochs,
            save_every_n_epochs=every_n_epochs or None,
            save_every_n_steps=getattr(args, "save_every_n_steps", None) or None,
            save_last_n_epochs=getattr(args, "save_last_n_epochs", None),
            save_last_n_epochs_state=getattr(args, "save_last_n_epochs_state", None),
            save_last_n_steps=getattr(args, "save_last_n_steps", None),
            save_last_n_steps_state=getattr(args, "save_last_n_steps_state", None),
            save_state=bool(getattr(args, "save_state", False)),
        )

    # --- cadence -------------------------------------------------------------------
    def saves_at_epoch_end(self, epoch_no: int) -> bool:
        """`epoch_no` is 1-based; the last epoch is covered by the final save."""
        every = self.save_every_n_epochs
        return bool(every) and epoch_no % every == 0 and epoch_no < self.num_train_epochs

    def saves_at_step(self, global_step: int) -> bool:
        every = self.save_every_n_steps
        return bool(every) and global_step % every == 0

    # --- paths ---------------------------------------------------------------------
    def epoch_model_path(self, epoch_no: int, ext: str) -> Path:
        return self.output_dir / train_util.get_epoch_ckpt_name(self.args, ext, epoch_no)

    def step_model_path(self, step: int, ext: str) -> Path:
        return self.output_dir / train_util.get_step_ckpt_name(self.args, ext, step)

    def last_model_path(self, ext: str) -> Path:
        return self.output_dir / train_util.get_last_ckpt_name(self.args, ext)

    def epoch_state_dir(self, epoch_no: int) -> Path:
        return self.output_dir / train_util.get_epoch_state_name(self.args, epoch_no)

    def step_state_dir(self, step: int) -> Path:
        return self.output_dir / train_util.get_step_state_name(self.args, step)

    def last_state_dir(self) -> Path:
        return self.output_dir / train_util.get_last_state_name(self.args)

    # --- removal of old saves ---------------------------------------------------------
    def outdated_epoch_model(self, epoch_no: int, ext: str) -> Optional[Path]:
        """The epoch save that falls out of `--save_last_n_epochs` after saving `epoch_no`."""
        if not self.save_last_n_epochs or not self.save_every_n_epochs:
            return None
        old = epoch_no - self.save_every_n_epochs * self.save_last_n_epochs
        return self.epoch_model_path(old, ext) if old > 0 else None

    def outdated_epoch_state(self, epoch_no: int) -> Optional[Path]:
        keep = self.save_last_n_epochs_state or self.save_last_n_epochs
        if not keep or not self.save_every_n_epochs:
            return None
        old = epoch_no - self.save_every_n_epochs * keep
        return self.epoch_state_dir(old) if old > 0 else None

    def outdated_step_model(self, step: int, ext: str) -> Optional[Path]:
        """The step save older than `--save_last_n_steps` steps, on the save grid."""
        return self._old_step(step, self.save_last_n_steps, lambda s: self.step_model_path(s, ext))

    def outdated_step_state(self, step: int) -> Optional[Path]:
        keep = self.save_last_n_steps_state or self.save_last_n_steps
        return self._old_step(step, keep, self.step_state_dir)

    def _old_step(self, step: int, keep: Optional[int], to_path) -> Optional[Path]:
        if not keep or not self.save_every_n_steps:
            return None
        old = step - keep - 1
        old -= old % self.save_every_n_steps
        return to_path(old) if old > 0 else None


def remove_old(path: Optional[Path]) -> None:
    """Delete an outdated save (file or state folder) if it exists."""
    if path is None or not path.exists():
        return
    logger.info("removing old save: %s", path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# --- training state (accelerate state + our JSON) -------------------------------------
def save_train_state(accelerator: Any, state_dir: Path, train_state: dict[str, Any]) -> None:
    """Write `accelerator.save_state` + `train_state.json` into `state_dir` atomically.

    Every process must call this (accelerate writes one RNG file per process); the folder is
    built under a fixed temporary name and moved into place by the main process, so an
    interrupted save never leaves a half-written state where a good one was.
    """
    state_dir = Path(state_dir)
    tmp = state_dir.with_name(f".{state_dir.name}.partial")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with disk_errors_as_user_errors(state_dir):
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=2), encoding="utf-8")
    except BaseException:
        if accelerator.is_main_process:  # a half-written state is never left for --resume to find
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, state_dir)
        logger.info("saved training state: %s", state_dir)
    accelerator.wait_for_everyone()


def load_train_state(accelerator: Any, state_dir: str | Path) -> dict[str, Any]:
    """Restore models/optimizer/scheduler with accelerate and return `train_state.json`.

    A state folder written by sd-scripts (no or older JSON) resumes at the start of the
    epoch it names; a missing folder is a `UserError` naming `--resume`.
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise UserError(f"--resume: state folder not found: {state_dir}")
    logger.info("resuming from state: %s", state_dir)
    try:
        accelerator.load_state(str(state_dir))
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as err:
        raise UserError(mismatch_message(state_dir, err)) from err
    if not (state_dir / TRAIN_STATE_FILE).is_file():
        logger.warning("%s has no %s: resuming at step 0 with restored optimizer", state_dir, TRAIN_STATE_FILE)
    return read_resume_json(state_dir)


def read_resume_json(state_dir: Optional[str | Path]) -> dict[str, Any]:
    """`train_state.json` of a `--resume` folder, read before models are built (seed, position)."""
    if not state_dir:
        return {}
    state_file = Path(state_dir) / TRAIN_STATE_FILE
    if not state_file.is_file():
        return {}
    try:
        return json.loads(state_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"--resume: {state_file} is not valid JSON: {err}") from err


def train_state_dict(
    global_step: int, epoch: int, micro_batches_done: int, num_processes: int, seed: int, max_train_steps: int,
    run: Optional[dict[str, Any]] = None, skipped_nonfinite_steps: int = 0,
) -> dict[str, Any]:
    """Content of `train_state.json`: where the run stands (0-based epoch, batches of that epoch
    already trained by all processes together), as `run` the fingerprint of the run
    (`resume_util.run_fingerprint`) that `--resume` checks, and how many steps
    `--skip_nonfinite_steps` has skipped so far (the limit counts over the resumed run too)."""
    state: dict[str, Any] = {
        "global_step": global_step,
        "epoch": epoch,
        "batch_index": micro_batches_done * num_processes,
        "num_processes": num_processes,
        "seed": seed,
        "max_train_steps": max_train_steps,
        # the names newer sd-scripts write
        "current_step": global_step,
        "current_epoch": epoch,
        "skipped_nonfinite_steps": skipped_nonfinite_steps,
    }
    if run is not None:
        state[FINGERPRINT_KEY] = run
    return state


def resume_position(state: dict[str, Any], num_processes: int, num_batches_per_epoch: int) -> tuple[int, int, int]:
    """(global_step, epoch, batch_index) to continue from, for a `train_state.json` dict."""
    global_step = int(state.get("global_step", state.get("current_step", 0)))
    epoch = int(state.get("epoch", state.get("current_epoch", 0)))
    batch_index = int(state.get("batch_index", 0))
    saved_processes = int(state.get("num_processes", num_processes))
    if saved_processes != num_processes or batch_index % num_processes:
        logger.warning(
            "the state was saved with %d processes, now %d: resuming at the start of epoch %d",
            saved_processes, num_processes, epoch + 1,
        )
        batch_index = 0
    if batch_index >= num_batches_per_epoch:
        epoch, batch_index = epoch + 1, 0
    logger.info("resuming at step %d, epoch %d, batch %d", global_step, epoch + 1, batch_index)
    return global_step, epoch, batch_index
