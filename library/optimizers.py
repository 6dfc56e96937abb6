"""Optimizers and learning-rate schedulers selected by the sd-scripts flags.

`get_optimizer` understands the sd-scripts names (case-insensitive) and any `module.ClassName`;
`get_scheduler_fix` builds the schedule with diffusers / transformers / torch classes.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import logging
from typing import Any, Iterable, Optional

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

# name (lower case) -> (module, class attribute path within it, pip package)
_BNB = "bitsandbytes"
_BUILTIN_OPTIMIZERS: dict[str, tuple[str, str, str]] = {
    "adamw": ("torch.optim", "AdamW", "torch"),
    "sgdnesterov": ("torch.optim", "SGD", "torch"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "adamw8bit": (_BNB, "optim.AdamW8bit", _BNB),
    "sgdnesterov8bit": (_BNB, "optim.SGD8bit", _BNB),
    "lion8bit": (_BNB, "optim.Lion8bit", _BNB),
    "pagedadamw": (_BNB, "optim.PagedAdamW", _BNB),
    "pagedadamw8bit": (_BNB, "optim.PagedAdamW8bit", _BNB),
    "pagedadamw32bit": (_BNB, "optim.PagedAdamW32bit", _BNB),
    "pagedlion8bit": (_BNB, "optim.PagedLion8bit", _BNB),
    "dadaptation": ("dadaptation", "DAdaptAdam", "dadaptation"),  # M23: DAdaptation = DAdaptAdam
    "dadaptadam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "dadaptadan": ("dadaptation", "DAdaptAdan", "dadaptation"),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "dadaptlion": ("dadaptation", "DAdaptLion", "dadaptation"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD", "dadaptation"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers"),
}
OPTIMIZER_NAMES = [
    "AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "SGDNesterov8bit", "PagedAdamW", "PagedAdamW8bit",
    "PagedAdamW32bit", "PagedLion8bit", "DAdaptation", "DAdaptAdam", "DAdaptAdamPreprint", "DAdaptAdaGrad",
    "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy", "AdaFactor",
]
SCHEDULER_NAMES = [
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "adafactor",
]


def parse_key_value_args(values: Optional[Iterable[str]], flag: str) -> dict[str, Any]:
    """`key=value` strings -> kwargs; values are Python literals (`0.01`, `(0.9,0.999)`, `True`), else strings."""
    kwargs: dict[str, Any] = {}
    for item in values or []:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{flag}: expected key=value, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text  # e.g. decouple=True is a literal, but mode=fast is a plain string
    return kwargs


def _import_class(module_name: str, attr_path: str, package: str, what: str) -> type:
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        hint = " (bitsandbytes needs a CUDA GPU)" if package == _BNB else ""
        raise UserError(
            f"{what} needs the '{package}' package, which is not installed: pip install {package}{hint}"
        ) from err
    try:
        for part in attr_path.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise UserError(f"{what}: {module_name}.{attr_path} not found (is the installed {package} too old?)") from err
    return obj


def _uses_param_groups(params: list) -> bool:
    return len(params) > 0 and isinstance(params[0], dict)


def _warn_dadapt_lr(lr: float, params: list) -> None:
    actual_lr, lr_count = lr, 1
    if _uses_param_groups(params):
        actual_lr = params[0].get("lr", lr)
        lr_count = len({group.get("lr", actual_lr) for group in params})
    if actual_lr is not None and actual_lr <= 0.1:
        logger.warning("learning rate %s is low for D-Adaptation / Prodigy: around 1.0 is recommended", actual_lr)
    if lr_count > 1:
        logger.warning("D-Adaptation / Prodigy with several learning rates: only the first one takes effect")


def _prepare_adafactor(args: argparse.Namespace, kwargs: dict[str, Any], params: list, lr: float) -> Optional[float]:
    """sd-scripts' Adafactor rules: relative_step defaults to True and then drives the lr itself."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step, so relative_step is set to True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if getattr(args, "max_grad_norm", 0.0) != 0.0:
            logger.info("Adafactor: --max_grad_norm is set, so gradients are clipped; consider --max_grad_norm 0")
        if getattr(args, "lr_scheduler", "") != "constant_with_warmup":
            logger.info("Adafactor without relative_step: --lr_scheduler constant_with_warmup is recommended")
        return lr
    if lr:
        logger.info("Adafactor relative_step: the learning rate %s is used as initial lr (for logging)", lr)
    args.learning_rate = None
    if _uses_param_groups(params):
        had_group_lr = False
        for group in params:
            had_group_lr = group.pop("lr", None) is not None or had_group_lr
        if had_group_lr:
            logger.info("Adafactor relative_step: --unet_lr / --text_encoder_lr are ignored")
            args.unet_lr = None
            args.text_encoder_lr = None
    if getattr(args, "lr_scheduler", "") != "adafactor":
        logger.info("Adafactor relative_step: the adafactor scheduler is used")
    args.lr_scheduler = f"adafactor:{lr}"
    return None


def resolve_optimizer_type(args: argparse.Namespace) -> str:
    """Optimizer name after the legacy flags `--use_8bit_adam` / `--use_lion_optimizer`."""
    optimizer_type = getattr(args, "optimizer_type", "") or ""
    if getattr(args, "use_8bit_adam", False):
        if getattr(args, "use_lion_optimizer", False):
            raise UserError("--use_8bit_adam and --use_lion_optimizer cannot be used together")
        if optimizer_type:
            raise UserError("--use_8bit_adam and --optimizer_type cannot be used together")
        return "AdamW8bit"
    if getattr(args, "use_lion_optimizer", False):
        if optimizer_type:
            raise UserError("--use_lion_optimizer and --optimizer_type cannot be used together")
        return "Lion"
    return optimizer_type or "AdamW"


def get_optimizer(args: argparse.Namespace, trainable_params: Any) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer of `--optimizer_type` / `--optimizer_args`.

    Returns (optimizer_name "module.Class", optimizer_args "k=v,...", optimizer); ss_optimizer is
    `optimizer_name + "(" + optimizer_args + ")"` when args exist (see `optimizer_metadata_string`).
    May change `args` as sd-scripts does: Adafactor with relative_step sets `args.learning_rate = None`
    and `args.lr_scheduler = "adafactor:<lr>"`.
    """
    optimizer_type = resolve_optimizer_type(args)
    kwargs = parse_key_value_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    params = list(trainable_params)
    if not params:
        raise UserError("no trainable parameters were given to the optimizer")
    lr = args.learning_rate
    key = optimizer_type.lower()
    what = f"--optimizer_type {optimizer_type}"

    if key in _BUILTIN_OPTIMIZERS:
        module_name, attr_path, package = _BUILTIN_OPTIMIZERS[key]
        optimizer_class = _import_class(module_name, attr_path, package, what)
        if package == _BNB and not torch.cuda.is_available():
            raise UserError(f"{what} (bitsandbytes) needs a CUDA GPU; use AdamW, Lion or another optimizer on CPU")
        if key in ("sgdnesterov", "sgdnesterov8bit"):
            if "momentum" not in kwargs:
                logger.info("SGD with Nesterov needs momentum: momentum=0.9 is used")
                kwargs["momentum"] = 0.9
            kwargs["nesterov"] = True
        elif key.startswith("dadapt") or key == "prodigy":
            _warn_dadapt_lr(lr, params)
        elif key == "adafactor":
            lr = _prepare_adafactor(args, kwargs, params, lr)
    else:
        # any optimizer: "ClassName" of torch.optim, or "module.path.ClassName" (original case kept)
        module_name, _, class_name = optimizer_type.rpartition(".")
        optimizer_class = _import_class(module_name or "torch.optim", class_name, module_name or "torch", what)
        if not isinstance(optimizer_class, type) or not issubclass(optimizer_class, torch.optim.Optimizer):
            raise UserError(f"{what}: {optimizer_type} is not a torch.optim.Optimizer class")

    logger.info("use %s optimizer | %s", optimizer_type, kwargs)
    # sd-scripts passes `nesterov=True` as a kwarg, so it is not part of ss_optimizer's args
    ctor_kwargs = dict(kwargs)
    if key == "adamw" and "foreach" not in kwargs and "fused" not in kwargs:
        # torch picks the per-tensor loop on CPU; the foreach path gives bit-identical weights
        # and is faster over a LoRA's hundreds of small tensors (benchmarks/RESULTS.md). Not
        # part of ss_optimizer: the file's metadata stays what sd-scripts writes.
        ctor_kwargs["foreach"] = True
    shown_kwargs = {k: v for k, v in kwargs.items() if not (k == "nesterov" and key.startswith("sgdnesterov"))}
    try:
        optimizer = optimizer_class(params, lr=lr, **ctor_kwargs)
    except TypeError as err:
        raise UserError(f"{what}: invalid --optimizer_args {shown_kwargs}: {err}") from err
    except ValueError as err:
        raise UserError(f"{what}: {err}") from err

    optimizer_name = optimizer_class.__module__ + "." + optimizer_class.__name__
    optimizer_args = ",".join(f"{k}={v}" for k, v in shown_kwargs.items())
    return optimizer_name, optimizer_args, optimizer


def optimizer_metadata_string(optimizer_name: str, optimizer_args: str) -> str:
    """ss_optimizer value: `module.Class` plus `(k=v,...)` when there are optimizer args."""
    return optimizer_name + (f"({optimizer_args})" if optimizer_args else "")


def _warmup_steps(args: argparse.Namespace, num_training_steps: int) -> int:
    warmup = getattr(args, "lr_warmup_steps", 0)
    if warmup is None:
        return 0
    if isinstance(warmup, float):  # a ratio of the train steps (newer sd-scripts)
        return int(warmup * num_training_steps)
    return int(warmup)


def get_scheduler_fix(args: argparse.Namespace, optimizer: torch.optim.Optimizer, num_processes: int) -> Any:
    """The lr scheduler of `--lr_scheduler` / `--lr_scheduler_type` (sd-scripts semantics).

    Total steps are `max_train_steps * num_processes` because an accelerate-prepared scheduler steps
    once per process per optimizer step; the warmup step count is taken as given (as sd-scripts does),
    a float warmup is a ratio of those total steps.
    """
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    name = str(args.lr_scheduler)
    num_training_steps = int(args.max_train_steps) * int(num_processes)
    num_warmup_steps = _warmup_steps(args, num_training_steps)
    scheduler_kwargs = parse_key_value_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")

    def no_warmup(which: str) -> None:
        if num_warmup_steps:
            raise UserError(f"{which} does not use --lr_warmup_steps: set it to 0 (or use constant_with_warmup)")

    scheduler_type = getattr(args, "lr_scheduler_type", "") or ""
    if scheduler_type:
        module_name, _, class_name = scheduler_type.rpartition(".")
        what = f"--lr_scheduler_type {scheduler_type}"
        scheduler_class = _import_class(module_name or "torch.optim.lr_scheduler", class_name,
                                        module_name or "torch", what)
        no_warmup(what)
        logger.info("use %s | %s as lr_scheduler", scheduler_type, scheduler_kwargs)
        try:
            return scheduler_class(optimizer, **scheduler_kwargs)
        except TypeError as err:
            raise UserError(f"{what}: invalid --lr_scheduler_args {scheduler_kwargs}: {err}") from err

    if name.startswith("adafactor"):
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise UserError("--lr_scheduler adafactor can only be used with --optimizer_type AdaFactor")
        no_warmup("--lr_scheduler adafactor")
        _, _, initial_lr = name.partition(":")
        try:
            initial_lr_value = float(initial_lr) if initial_lr and initial_lr != "None" else 0.0
        except ValueError as err:
            raise UserError(f"--lr_scheduler {name}: bad initial learning rate") from err
        return AdafactorSchedule(optimizer, initial_lr_value)

    if name not in SCHEDULER_NAMES:
        raise UserError(f"--lr_scheduler {name!r} is unknown; choose one of {', '.join(SCHEDULER_NAMES)}")
    schedule_func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    if name == "constant":
        no_warmup("--lr_scheduler constant")
        return schedule_func(optimizer, **scheduler_kwargs)
    if name == "constant_with_warmup":
        return schedule_func(optimizer, num_warmup_steps=num_warmup_steps, **scheduler_kwargs)
    if num_warmup_steps > num_training_steps:
        raise UserError(f"--lr_warmup_steps ({num_warmup_steps}) exceeds the training steps ({num_training_steps})")
    common = dict(num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, **scheduler_kwargs)
    if name == "cosine_with_restarts":
        return schedule_func(optimizer, num_cycles=int(args.lr_scheduler_num_cycles), **common)
    if name == "polynomial":
        return schedule_func(optimizer, power=float(args.lr_scheduler_power), **common)
    return schedule_func(optimizer, **common)
