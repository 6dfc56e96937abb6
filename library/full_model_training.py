"""Training the base model itself (train_db.py, fine_tune.py): the `TrainingMethod` both share.

The U-Net trains, the text encoder trains when asked (`--train_text_encoder` in fine_tune.py; by
default in train_db.py until `--stop_text_encoder_training`), and the whole model is saved in the
format `--save_model_as` says (library.model_saving).

Memory: only the weights that train are kept in float32 (or in the `--full_fp16/bf16` dtype,
loaded directly in it); frozen parts are cast to the mixed-precision dtype by the core. No EMA,
no second copy of any weight. When the text encoder stops training, its parameters leave the
optimizer (param group emptied, moments deleted) and its gradients are dropped.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from library import model_saving, modelspec, train_core, train_saving
from library.errors import UserError

logger = logging.getLogger(__name__)


def build_parser(description: str, dreambooth: bool) -> argparse.ArgumentParser:
    """The flags train_db.py (`dreambooth`) and fine_tune.py share, as sd-scripts groups them:
    DreamBooth folders / reg images / prior loss, or metadata JSON / dataset repeats."""
    from library import train_util

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_util.add_sd_models_arguments(parser)
    train_util.add_dataset_arguments(parser, dreambooth, not dreambooth, True)
    train_util.add_training_arguments(parser, dreambooth)
    train_util.add_sd_saving_arguments(parser)
    train_util.add_optimizer_arguments(parser)
    train_util.add_dataset_config_argument(parser)
    train_util.add_custom_train_arguments(parser)
    add_full_model_arguments(parser)
    return parser


def run_script(
    parser: argparse.ArgumentParser, make_method: Callable[[argparse.Namespace], train_core.TrainingMethod],
    argv: Optional[Sequence[str]] = None,
) -> train_core.TrainResult:
    """A script's `main`: parse (with `--config_file`), train, report where the model went."""
    from library import train_util

    args = train_util.parse_args_with_config(parser, argv)
    result = train_core.run_training(args, make_method(args))
    if result.final_model_path is not None:
        logger.info("model saved: %s", result.final_model_path)
    return result


def add_full_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by train_db.py and fine_tune.py beyond the train_util groups."""
    parser.add_argument(
        "--learning_rate_te", type=float, default=None,
        help="learning rate of the text encoder (default: --learning_rate)",
    )
    modelspec.add_metadata_arguments(parser)


def text_encoder_stop_step(args: argparse.Namespace) -> Optional[int]:
    """`--stop_text_encoder_training`: None = train it to the end; 0 or negative = never train it."""
    value = getattr(args, "stop_text_encoder_training", None)
    return None if value is None else int(value)


class FullModelTrainingMethod(train_core.TrainingMethod):
    """The U-Net (and optionally the text encoder) train; the whole model is saved."""

    script_name = "train_db.py"

    def __init__(self, args: argparse.Namespace, train_text_encoder: bool, tracker_name: str,
                 support_dreambooth: bool = True):
        self.args = args
        self.tracker_name = tracker_name
        self.support_dreambooth = support_dreambooth
        self.support_finetuning = True
        stop = text_encoder_stop_step(args)
        # the text encoder is in the optimizer at all only when it trains for at least one step
        self.text_encoder_trained = train_text_encoder and (stop is None or stop > 0)
        self.stop_step = stop if self.text_encoder_trained else None
        self._text_encoder_active = self.text_encoder_trained
        # after the stop its parameters get no gradients
        self.ddp_find_unused_parameters = self.stop_step is not None
        self._stop_checked = False
        self._release_at_start = False  # resumed past the text-encoder stop (set in setup)

    # flags -----------------------------------------------------------------------------
    def verify_args(self, args: argparse.Namespace) -> None:
        if getattr(args, "diffusers_xformers", False):
            if importlib.util.find_spec("xformers") is None:
                raise UserError("--diffusers_xformers: the xformers package is not installed (pip install xformers)")
            args.xformers = True
        model_saving.prepare_output_format(args)
        steps = getattr(args, "max_train_steps", None)
        if self.stop_step is not None and not getattr(args, "max_train_epochs", None) and steps is not None:
            self._check_stop_step(steps)

    def _check_stop_step(self, max_train_steps: int) -> None:
        if self.stop_step is not None and self.stop_step > max_train_steps:
            raise UserError(
                f"--stop_text_encoder_training {self.stop_step} is greater than the number of training steps "
                f"({max_train_steps}); use a step within the run, or -1 to not train the text encoder"
            )

    def state_fingerprint(self, args: argparse.Namespace) -> dict[str, Any]:
        # the text encoder's optimizer group exists (filled or empty) only when it trains at all
        return {
            "trains": "U-Net and text encoder" if self.text_encoder_trained else "U-Net",
            "stop_text_encoder_training": self.stop_step,
        }

    def model_load_dtype(self, args: argparse.Namespace, weight_dtype: torch.dtype) -> torch.dtype:
        # --full_fp16/bf16 train in that dtype: loading in it avoids a float32 copy ever existing
        if getattr(args, "full_fp16", False) or getattr(args, "full_bf16", False):
            return weight_dtype
        return torch.float32

    # what trains ---------------------------------------------------------------------------
    @property
    def train_text_encoder(self) -> bool:
        return self._text_encoder_active

    def setup(self, ctx: train_core.TrainContext) -> None:
        models = ctx.models
        models.unet.requires_grad_(True)
        resume_step = int(train_saving.read_resume_json(getattr(self.args, "resume", None)).get("global_step", 0) or 0)
        # resumed after the stop: the saved optimizer already holds no text-encoder parameters (the
        # group is built empty), but the encoder is set up as the uninterrupted run had it when it
        # stopped (its float32 dtype, no cached outputs) and released at the first epoch start
        self._release_at_start = self.stop_step is not None and resume_step >= self.stop_step
        models.text_encoder.requires_grad_(self._text_encoder_active)
        what = "the U-Net and the text encoder" if self.text_encoder_trained else "the U-Net (text encoder frozen)"
        if self.stop_step is not None:
            what += f" (the text encoder until step {self.stop_step})"
        logger.info("training %s", what)

    def trainable_modules(self, ctx: train_core.TrainContext) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"unet": ctx.models.unet}
        if self.text_encoder_trained:
            modules["text_encoder"] = ctx.models.text_encoder
        return modules

    def optimizer_params(self, ctx: train_core.TrainContext) -> list:
        args = self.args
        groups = [{"params": list(ctx.models.unet.parameters()), "lr": args.learning_rate}]
        if self.text_encoder_trained:
            lr_te = args.learning_rate_te if getattr(args, "learning_rate_te", None) is not None else args.learning_rate
            # the group stays (empty) after the stop, so states saved before and after it have one layout
            params = [] if self._release_at_start else list(ctx.models.text_encoder.parameters())
            groups.append({"params": params, "lr": lr_te})
        return groups

    def lr_log_names(self, ctx: train_core.TrainContext, num_groups: int) -> list[str]:
        return ["lr/unet", "lr/textencoder"][:num_groups] if num_groups <= 2 else super().lr_log_names(ctx, num_groups)

    def on_epoch_start(self, ctx: train_core.TrainContext, epoch: int) -> None:
        if not self._stop_checked:  # the step count is known now (also with --max_train_epochs)
            self._stop_checked = True
            self._check_stop_step(ctx.max_train_steps)
        if self._release_at_start and self._text_encoder_active:
            release_from_optimizer(ctx.optimizer, ctx.models.text_encoder)
            self._text_encoder_active = False
            logger.info("resumed after step %d: the text encoder does not train (--stop_text_encoder_training)", self.stop_step)

    def on_step_end(self, ctx: train_core.TrainContext) -> None:
        if self._text_encoder_active and self.stop_step is not None and ctx.global_step >= self.stop_step:
            release_from_optimizer(ctx.optimizer, ctx.models.text_encoder)
            self._text_encoder_active = False
            logger.info("step %d: text encoder training stopped (--stop_text_encoder_training)", ctx.global_step)

    # saving ------------------------------------------------------------------------------
    def model_extension(self, args: argparse.Namespace) -> str:
        return model_saving.model_extension(args.save_model_as)

    def save(self, ctx: train_core.TrainContext, path: Path, epoch_no: int, global_step: int, final: bool) -> None:
        metadata = modelspec.metadata_from_args(
            self.args, modelspec.MODEL, ctx.training_started_at, v2=ctx.models.v2,
            v_parameterization=bool(getattr(self.args, "v_parameterization", False)),
        )
        model_saving.save_trained_model(
            ctx.models, path, self.args.save_model_as, ctx.save_dtype, epoch_no, global_step,
            metadata=metadata, vae_path=getattr(self.args, "vae", None),
        )


def release_from_optimizer(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """Freeze `module` and take its parameters out of `optimizer` (groups, moments, gradients),
    so the memory they held in the optimizer is freed. The groups themselves stay."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    module.requires_grad_(False)
    leaving = {id(p) for p in module.parameters()}
    for group in inner.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in leaving]
    for param in module.parameters():
        inner.state.pop(param, None)
        param.grad = None
