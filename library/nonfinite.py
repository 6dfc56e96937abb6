"""The NaN / inf loss guard of the training loop, and the precision advice that goes with it.

A non-finite loss means the weights are about to be (or were) ruined. By default the run stops
with one line naming the step, the learning rate(s) and the precision settings; saves are only
made after the losses were read, so the last save on disk is a good one. With
`--skip_nonfinite_steps N` a step whose loss is not finite is skipped instead (gradients dropped,
weights unchanged, logged), at most N times; one more stops the run as above.

Skipping needs the loss on the host before the optimizer step, i.e. one host sync per step on
an accelerator; that cost is paid only when the flag is given.
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Sequence

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)


def add_nonfinite_arguments(parser: argparse.ArgumentParser) -> None:
    """`--skip_nonfinite_steps` and `--no_half_vae` (the usual fix for fp16 NaNs)."""
    parser.add_argument(
        "--skip_nonfinite_steps", type=int, default=0,
        help="skip up to N optimizer steps whose loss is NaN/inf (weights unchanged, each logged) instead of "
        "stopping at the first one (default 0: stop)",
    )
    parser.add_argument(
        "--no_half_vae", action="store_true",
        help="keep the VAE in float32 under --mixed_precision fp16/bf16 (fp16 VAEs overflow to NaN on some images)",
    )


def vae_dtype(args: argparse.Namespace, weight_dtype: torch.dtype) -> torch.dtype:
    """dtype of the frozen VAE: the mixed-precision dtype, or float32 with `--no_half_vae`."""
    return torch.float32 if getattr(args, "no_half_vae", False) else weight_dtype


def precision_settings(args: argparse.Namespace) -> str:
    """The flags that decide numerical precision, as the user would type them."""
    parts = [f"--mixed_precision {getattr(args, 'mixed_precision', None) or 'no'}"]
    for flag in ("full_fp16", "full_bf16", "no_half_vae"):
        if getattr(args, flag, False):
            parts.append(f"--{flag}")
    return " ".join(parts)


def advice(args: argparse.Namespace) -> str:
    """What usually fixes a diverging run with these settings."""
    if (getattr(args, "mixed_precision", None) or "no") == "fp16" or getattr(args, "full_fp16", False):
        hints = ["try --mixed_precision bf16"]
        if not getattr(args, "no_half_vae", False):
            hints.append("or --no_half_vae")
        return " ".join(hints) + ", or lower the learning rate"
    return "lower the learning rate or check the data"


def _lr_text(lrs: Sequence[float]) -> str:
    return ", ".join(f"{lr:.3g}" for lr in lrs) if lrs else "unknown"


class NonFiniteGuard:
    """Decides what happens to a step whose loss is NaN / inf (`--skip_nonfinite_steps`)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.limit = int(getattr(args, "skip_nonfinite_steps", 0) or 0)
        if self.limit < 0:
            raise UserError(f"--skip_nonfinite_steps must be 0 or more, got {self.limit}")
        self.skipped = 0

    @property
    def skips(self) -> bool:
        """True when steps are checked before the optimizer step (and may be skipped)."""
        return self.limit > 0

    def stop_message(self, step: int, value: float, lrs: Sequence[float]) -> str:
        what = f"loss became {value} at step {step}"
        if self.skipped:
            what += f" after {self.skipped} skipped step(s) (--skip_nonfinite_steps {self.limit})"
        return (
            f"{what}: training diverged (learning rate {_lr_text(lrs)}; {precision_settings(self.args)}): "
            f"{advice(self.args)}; the last save in --output_dir is from before this step"
        )

    def check(self, step: int, value: float, lrs: Sequence[float]) -> None:
        """Stop the run (UserError) when a read loss is not finite."""
        if not math.isfinite(value):
            raise UserError(self.stop_message(step, value, lrs))

    def step_is_finite(self, step_loss: torch.Tensor, accelerator: Any = None) -> bool:
        """Whether every process's loss of this step is finite (one host sync; all ranks agree)."""
        flag = torch.isfinite(step_loss.detach().float()).all().float().reshape(1)
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            flag = accelerator.gather(flag)
        return bool(flag.min().item() > 0)

    def record_skip(self, step: int, value: float, lrs: Sequence[float]) -> None:
        """Log a skipped step; past the limit, stop as without the flag."""
        if self.skipped >= self.limit:
            raise UserError(self.stop_message(step, value, lrs))
        self.skipped += 1
        logger.warning(
            "step %d: loss is %s: step skipped, weights unchanged (%d of --skip_nonfinite_steps %d; lr %s; %s)",
            step, value, self.skipped, self.limit, _lr_text(lrs), precision_settings(self.args),
        )
