"""Optimizer names / args / metadata strings and lr schedulers against hand-computed values."""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys

import pytest
import torch

from library import optimizers, train_util
from library.errors import UserError

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
BNB_NAMES = {"AdamW8bit", "Lion8bit", "SGDNesterov8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
             "PagedLion8bit"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_util.add_optimizer_arguments(parser)
    train_util.add_training_arguments(parser, True)
    parser.add_argument("--unet_lr", type=float, default=None)
    parser.add_argument("--text_encoder_lr", type=float, default=None)
    return parser.parse_args(list(argv))


def tiny_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 3)), torch.nn.Parameter(torch.randn(3))]


def one_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> float:
    """One optimizer step on a quadratic loss; returns the largest parameter change."""
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    loss = sum(((p - 0.5) ** 2).sum() for p in params)
    loss.backward()
    optimizer.step()
    return max((p.detach() - b).abs().max().item() for p, b in zip(params, before))


@pytest.mark.parametrize("name", optimizers.OPTIMIZER_NAMES)
def test_every_optimizer_constructs_and_steps(name):
    if name in BNB_NAMES and not (HAS_BNB and torch.cuda.is_available()):
        pytest.skip(f"{name} needs bitsandbytes and a CUDA GPU (not available here)")
    adaptive = name.lower().startswith("dadapt") or name == "Prodigy"
    args = parse("--optimizer_type", name, "--learning_rate", "1.0" if adaptive else "0.01")
    params = tiny_params()
    optimizer_name, optimizer_args, optimizer = optimizers.get_optimizer(args, params)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer_name == type(optimizer).__module__ + "." + type(optimizer).__name__
    assert one_step(optimizer, params) > 0.0


@pytest.mark.parametrize("name,expected", [
    ("adamw", "torch.optim.adamw.AdamW"),
    ("LION", "lion_pytorch.lion_pytorch.Lion"),
    ("DAdaptation", "dadaptation.dadapt_adam.DAdaptAdam"),  # M23 alias
    ("dadaptadanip", "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP"),
    ("Adafactor", "transformers.optimization.Adafactor"),
    ("sgdnesterov", "torch.optim.sgd.SGD"),
    ("", "torch.optim.adamw.AdamW"),  # default
])
def test_names_are_case_insensitive(name, expected):
    optimizer_name, _, _ = optimizers.get_optimizer(parse("--optimizer_type", name), tiny_params())
    assert optimizer_name == expected


@pytest.mark.parametrize("name", sorted(BNB_NAMES))
def test_missing_bitsandbytes_error_names_optimizer_and_package(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes the import fail
    with pytest.raises(UserError) as info:
        optimizers.get_optimizer(parse("--optimizer_type", name), tiny_params())
    message = str(info.value)
    assert name in message and "pip install bitsandbytes" in message and "\n" not in message


def test_legacy_flags(monkeypatch):
    name, _, _ = optimizers.get_optimizer(parse("--use_lion_optimizer"), tiny_params())
    assert name == "lion_pytorch.lion_pytorch.Lion"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match="AdamW8bit.*bitsandbytes"):
        optimizers.get_optimizer(parse("--use_8bit_adam"), tiny_params())
    with pytest.raises(UserError, match="--use_8bit_adam and --use_lion_optimizer"):
        optimizers.get_optimizer(parse("--use_8bit_adam", "--use_lion_optimizer"), tiny_params())
    with pytest.raises(UserError, match="--use_lion_optimizer and --optimizer_type"):
        optimizers.get_optimizer(parse("--use_lion_optimizer", "--optimizer_type", "AdamW"), tiny_params())


def test_module_class_path():
    params = tiny_params()
    name, args_text, optimizer = optimizers.get_optimizer(
        parse("--optimizer_type", "torch.optim.Adam", "--optimizer_args", "amsgrad=True"), params
    )
    assert name == "torch.optim.adam.Adam" and args_text == "amsgrad=True"
    assert optimizer.param_groups[0]["amsgrad"] is True
    assert one_step(optimizer, params) > 0
    name, _, _ = optimizers.get_optimizer(parse("--optimizer_type", "RMSprop"), tiny_params())  # torch.optim
    assert name == "torch.optim.rmsprop.RMSprop"
    with pytest.raises(UserError, match="no_such_pkg"):
        optimizers.get_optimizer(parse("--optimizer_type", "no_such_pkg.Opt"), tiny_params())
    with pytest.raises(UserError, match="torch.optim.NoSuchOpt"):
        optimizers.get_optimizer(parse("--optimizer_type", "NoSuchOpt"), tiny_params())
    with pytest.raises(UserError, match="not a torch.optim.Optimizer"):
        optimizers.get_optimizer(parse("--optimizer_type", "torch.nn.Linear"), tiny_params())


def test_optimizer_args_parsing_and_metadata_string():
    kwargs = optimizers.parse_key_value_args(
        ["weight_decay=0.1", "betas=0.9,0.99", "decouple=True", "mode=fast", "eps=1e-8", "d_coef=2"], "--x"
    )
    assert kwargs == {"weight_decay": 0.1, "betas": (0.9, 0.99), "decouple": True, "mode": "fast", "eps": 1e-8,
                      "d_coef": 2}
    with pytest.raises(UserError, match="--optimizer_args.*weight_decay"):
        optimizers.get_optimizer(parse("--optimizer_args", "weight_decay"), tiny_params())
    name, args_text, optimizer = optimizers.get_optimizer(
        parse("--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99"), tiny_params()
    )
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert optimizers.optimizer_metadata_string(name, args_text) == \
        "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"
    assert optimizers.optimizer_metadata_string("torch.optim.adamw.AdamW", "") == "torch.optim.adamw.AdamW"
    with pytest.raises(UserError, match="AdamW.*not_a_kwarg"):
        optimizers.get_optimizer(parse("--optimizer_args", "not_a_kwarg=1"), tiny_params())
    name, args_text, optimizer = optimizers.get_optimizer(parse("--optimizer_type", "SGDNesterov"), tiny_params())
    assert args_text == "momentum=0.9" and optimizer.param_groups[0]["nesterov"] is True


def test_param_groups_keep_their_lrs():
    first, second = tiny_params()
    groups = [{"params": [first], "lr": 1e-3}, {"params": [second], "lr": 1e-4}]
    _, _, optimizer = optimizers.get_optimizer(parse("--learning_rate", "0.5"), groups)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]
    with pytest.raises(UserError, match="no trainable parameters"):
        optimizers.get_optimizer(parse(), [])


def test_adafactor_relative_step_rules():
    first, second = tiny_params()
    args = parse("--optimizer_type", "AdaFactor", "--learning_rate", "1e-3", "--unet_lr", "1e-4")
    groups = [{"params": [first], "lr": 1e-4}, {"params": [second], "lr": 1e-5}]
    name, args_text, optimizer = optimizers.get_optimizer(args, groups)
    assert args_text == "relative_step=True"
    assert args.learning_rate is None and args.unet_lr is None and args.lr_scheduler == "adafactor:0.001"
    scheduler = optimizers.get_scheduler_fix(args, optimizer, 1)
    assert scheduler.get_last_lr() == [0.001, 0.001]  # initial lr before the first step
    assert one_step(optimizer, [first, second]) > 0
    scheduler.step()
    assert all(lr > 0 for lr in scheduler.get_last_lr())

    # relative_step=False keeps lr and scheduler; warmup_init forces relative_step back on
    args = parse("--optimizer_type", "adafactor", "--learning_rate", "0.01", "--optimizer_args",
                 "relative_step=False", "scale_parameter=False", "--lr_scheduler", "constant_with_warmup")
    _, _, optimizer = optimizers.get_optimizer(args, tiny_params())
    assert optimizer.param_groups[0]["lr"] == 0.01 and args.lr_scheduler == "constant_with_warmup"
    args = parse("--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "warmup_init=True")
    _, args_text, _ = optimizers.get_optimizer(args, tiny_params())
    assert "relative_step=True" in args_text and args.lr_scheduler.startswith("adafactor:")


# ---- schedulers ----


def lr_after(steps: int, *argv: str, num_processes: int = 1, base_lr: float = 1.0) -> float:
    args = parse("--learning_rate", str(base_lr), "--max_train_steps", "100", *argv)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = optimizers.get_scheduler_fix(args, optimizer, num_processes)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


WARMUP = ("--lr_warmup_steps", "10")


@pytest.mark.parametrize("scheduler,steps,expected", [
    ("linear", 5, 0.5), ("linear", 10, 1.0), ("linear", 55, 45 / 90), ("linear", 100, 0.0),
    ("cosine", 5, 0.5), ("cosine", 55, 0.5), ("cosine", 40, 0.5 * (1 + math.cos(math.pi / 3))),
    ("constant_with_warmup", 5, 0.5), ("constant_with_warmup", 10, 1.0), ("constant_with_warmup", 90, 1.0),
    ("polynomial", 55, (1 - 1e-7) * 0.5**2 + 1e-7), ("polynomial", 5, 0.5),
])
def test_scheduler_values(scheduler, steps, expected):
    extra = ("--lr_scheduler_power", "2") if scheduler == "polynomial" else ()
    assert lr_after(steps, "--lr_scheduler", scheduler, *WARMUP, *extra) == pytest.approx(expected, abs=1e-9)


def test_cosine_with_restarts_and_constant():
    restarts = ("--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2", *WARMUP)
    assert lr_after(28, *restarts) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))  # progress 0.2 -> 0.4
    assert lr_after(55, *restarts) == pytest.approx(1.0)  # the restart
    assert lr_after(37, "--lr_scheduler", "constant") == pytest.approx(1.0)
    with pytest.raises(UserError, match="constant.*--lr_warmup_steps"):
        lr_after(1, "--lr_scheduler", "constant", *WARMUP)
    with pytest.raises(UserError, match="--lr_scheduler 'bogus'"):
        lr_after(1, "--lr_scheduler", "bogus")
    with pytest.raises(UserError, match="adafactor"):
        lr_after(1, "--lr_scheduler", "adafactor")  # needs the Adafactor optimizer


def test_warmup_ratio_and_num_processes():
    # a float warmup is a ratio of max_train_steps * num_processes
    assert lr_after(5, "--lr_scheduler", "linear", "--lr_warmup_steps", "0.1") == pytest.approx(0.5)
    # with 2 processes the schedule spans 200 scheduler steps; int warmup is not scaled (as sd-scripts)
    assert lr_after(105, "--lr_scheduler", "linear", *WARMUP, num_processes=2) == pytest.approx(95 / 190)
    assert lr_after(10, "--lr_scheduler", "linear", "--lr_warmup_steps", "0.1", num_processes=2) == pytest.approx(0.5)


def test_custom_scheduler_type():
    step_lr = ("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=10", "gamma=0.5")
    assert lr_after(25, *step_lr) == pytest.approx(0.25)
    exponential = ("--lr_scheduler_type", "torch.optim.lr_scheduler.ExponentialLR", "--lr_scheduler_args", "gamma=0.9")
    assert lr_after(2, *exponential) == pytest.approx(0.81)
    with pytest.raises(UserError, match="--lr_scheduler_type StepLR.*bad_arg"):
        lr_after(1, "--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "bad_arg=1")
    with pytest.raises(UserError, match="nowhere_mod"):
        lr_after(1, "--lr_scheduler_type", "nowhere_mod.Sched")


class _FakeBnbOptimizer(torch.optim.SGD):
    """Stands in for a bitsandbytes optimizer (same constructor shape) to test the name mapping."""

    def __init__(self, params, lr, **kwargs):
        self.received = dict(kwargs)
        kwargs.pop("percentile_clipping", None)
        super().__init__(params, lr=lr, momentum=kwargs.get("momentum", 0.0), nesterov=kwargs.get("nesterov", False))


def test_bitsandbytes_mapping_with_a_stand_in_module(monkeypatch):
    import types

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(**{name: type(name, (_FakeBnbOptimizer,), {}) for name in (
        "AdamW8bit", "SGD8bit", "Lion8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "PagedLion8bit")})
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="AdamW8bit.*CUDA GPU"):
        optimizers.get_optimizer(parse("--optimizer_type", "AdamW8bit"), tiny_params())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _, _, optimizer = optimizers.get_optimizer(parse("--use_8bit_adam"), tiny_params())
    assert type(optimizer).__name__ == "AdamW8bit"
    _, args_text, optimizer = optimizers.get_optimizer(parse("--optimizer_type", "sgdnesterov8bit"), tiny_params())
    assert type(optimizer).__name__ == "SGD8bit" and optimizer.received == {"momentum": 0.9, "nesterov": True}
    assert args_text == "momentum=0.9"
    _, _, optimizer = optimizers.get_optimizer(parse("--optimizer_type", "PagedLion8bit"), tiny_params())
    assert type(optimizer).__name__ == "PagedLion8bit"
