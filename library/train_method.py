"""The contract between a training script and the one loop (`library/train_core.py`).

A script subclasses `TrainingMethod` to say what trains and what is saved; the loop hands each
hook a `TrainContext`; `TrainHooks` lets tools and tests stop or observe a run; `run_training`
returns a `TrainResult`. `train_core` re-exports all four names.
"""
from __future__ import annotations

import abc
import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn


# --- what a script provides ------------------------------------------------------------
class TrainingMethod(abc.ABC):
    """What one trainer trains and saves. Subclass: `setup`, `trainable_modules` and `save` are
    required; the other hooks have working defaults."""

    #: default tracker name (`--log_tracker_name` overrides)
    tracker_name: str = "train"
    #: DDP must tolerate parameters without gradients in a step (e.g. LoRA module dropout)
    ddp_find_unused_parameters: bool = False
    #: the script this method trains for (recorded in states: `--resume` refuses another trainer's)
    script_name: str = ""
    #: dataset sources this method accepts (passed to the dataset config sanitizer)
    support_dreambooth: bool = True
    support_finetuning: bool = True
    support_dropout: bool = True
    #: the saves hold no text-encoder weight (a network): a frozen text encoder whose states for
    #: every caption of the run are cached before the loop, and that no sample needs, is freed then
    releases_cached_text_encoder: bool = False

    def verify_args(self, args: argparse.Namespace) -> None:
        """Raise `UserError` for flag combinations this method cannot run."""

    def state_fingerprint(self, args: argparse.Namespace) -> dict[str, Any]:
        """Settings a `--resume` state must share with this run, beyond the trainer and base model:
        those that decide which parameters train and what they mean (JSON values). Compared by
        `resume_util.check_run_fingerprint`; the default has none."""
        return {}

    def prepare_dataset(self, args: argparse.Namespace, dataset_group: Any) -> None:
        """Called right after the dataset is built, before `--debug_dataset` shows it and before any
        model loads (e.g. textual inversion registers its caption replacements here)."""

    def model_load_dtype(self, args: argparse.Namespace, weight_dtype: torch.dtype) -> torch.dtype:
        """dtype the base models are loaded in (frozen models can be loaded directly in weight_dtype)."""
        return torch.float32

    def fp8_models(self, args: argparse.Namespace) -> tuple[str, ...]:
        """Frozen base models ("unet", "text_encoder") whose Linear / Conv2d weights are stored in
        fp8 (`--fp8_base`; library/fp8_layers.py); none by default."""
        return ()

    @abc.abstractmethod
    def setup(self, ctx: "TrainContext") -> None:
        """Create / attach what trains (e.g. a LoRA network); freeze (`requires_grad_(False)`) the
        base models that do not train: frozen models are then cast to the mixed-precision dtype."""

    @property
    def train_unet(self) -> bool:
        return True

    @property
    def train_text_encoder(self) -> bool:
        """True when gradients flow through the text encoder (no caching of its outputs)."""
        return False

    @abc.abstractmethod
    def trainable_modules(self, ctx: "TrainContext") -> dict[str, nn.Module]:
        """Modules holding the trained parameters (they go into DDP and into saved states)."""

    def optimizer_params(self, ctx: "TrainContext") -> list:
        """Parameters or parameter groups handed to the optimizer."""
        return [p for m in self.trainable_modules(ctx).values() for p in m.parameters() if p.requires_grad]

    def lr_log_names(self, ctx: "TrainContext", num_groups: int) -> list[str]:
        """Tracker names of the param groups' learning rates."""
        return ["lr"] if num_groups == 1 else [f"lr/group{i}" for i in range(num_groups)]

    def on_epoch_start(self, ctx: "TrainContext", epoch: int) -> None:
        """Called before the first batch of every epoch (0-based)."""

    def on_step_end(self, ctx: "TrainContext") -> None:
        """Called on every process after each optimizer step (e.g. to restore frozen embedding rows)."""

    def model_extension(self, args: argparse.Namespace) -> str:
        """File extension of saved models, e.g. `.safetensors`."""
        return ".safetensors"

    @abc.abstractmethod
    def save(self, ctx: "TrainContext", path: Path, epoch_no: int, global_step: int, final: bool) -> None:
        """Write the trained weights to `path` (atomically). Runs on the main process only."""

    def sampling_models(self, ctx: "TrainContext") -> tuple[nn.Module, nn.Module]:
        """(text_encoder, unet) used for sample images (networks are already applied to them)."""
        return ctx.models.text_encoder, ctx.models.unet

    def prompt_replacement(self, ctx: "TrainContext") -> Optional[tuple[str, str]]:
        """(text, replacement) applied to sample prompts (textual inversion token strings)."""
        return None


@dataclass
class TrainHooks:
    """Programmatic hooks for tools and tests."""

    #: stop right after this optimizer step (after its saves), as if the process were killed
    stop_after_step: Optional[int] = None
    #: called on every process before the first step (after models, optimizer and --resume are ready)
    on_train_start: Optional[Callable[["TrainContext"], None]] = None
    #: called on every process at the end of training with the context
    on_train_end: Optional[Callable[["TrainContext"], None]] = None


@dataclass
class TrainContext:
    """Everything the hooks of a `TrainingMethod` may need."""

    args: argparse.Namespace
    accelerator: Any
    models: Any  # library.model_util.StableDiffusionModels
    weight_dtype: torch.dtype
    save_dtype: Optional[torch.dtype]
    dataset_group: Any = None
    noise_scheduler: Any = None
    optimizer: Any = None
    optimizer_name: str = ""
    optimizer_args: str = ""
    lr_scheduler: Any = None
    num_batches_per_epoch: int = 0  # all processes together
    batches_per_process: int = 0  # what one process trains per epoch
    num_train_epochs: int = 0
    max_train_steps: int = 0
    global_step: int = 0
    epoch: int = 0
    sample_prompts: list = field(default_factory=list)
    step_module: Any = None  # the accelerate-prepared DiffusionStep (DDP-wrapped with several processes)
    training_started_at: float = field(default_factory=time.time)


@dataclass
class TrainResult:
    global_step: int
    epoch: int
    step_losses: list[float]
    final_model_path: Optional[Path]
    stopped_early: bool
