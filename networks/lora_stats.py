"""Statistics of the tensors of a LoRA file and the modules that cannot work (check_lora_weights.py).

A module is flagged when one of its tensors holds NaN or inf values (it would poison every
image) or when its `lora_up` or `lora_down` is all zero (it changes nothing - an untrained or
broken module).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

PROBLEM_NAN = "NaN"
PROBLEM_INF = "inf"
PROBLEM_ZERO = "all zero"


@dataclass(frozen=True)
class TensorStats:
    """mean / min / max of |v| and the Frobenius norm of one tensor, over its finite values."""

    key: str
    shape: tuple[int, ...]
    mean_abs: float
    min_abs: float
    max_abs: float
    norm: float
    num_nan: int
    num_inf: int

    @property
    def all_zero(self) -> bool:
        return self.max_abs == 0.0 and self.num_nan == 0 and self.num_inf == 0

    def csv_line(self) -> str:
        """sd-scripts' `key,(d0-d1-...),mean|v|,min|v|` columns, then max|v| and the norm."""
        shape = "(" + "-".join(str(d) for d in self.shape) + ")"
        return f"{self.key},{shape},{self.mean_abs},{self.min_abs},{self.max_abs},{self.norm}"


@dataclass
class ModuleProblems:
    """What is wrong with one LoRA module (empty `problems`: nothing)."""

    name: str
    problems: list[str] = field(default_factory=list)


def tensor_stats(key: str, tensor: torch.Tensor) -> TensorStats:
    values = tensor.detach().to("cpu", torch.float32).reshape(-1)
    nan = torch.isnan(values)
    inf = torch.isinf(values)
    finite = values[~(nan | inf)].abs()
    if finite.numel():
        mean, low, high = finite.mean().item(), finite.min().item(), finite.max().item()
        norm = torch.linalg.vector_norm(finite).item()
    else:
        mean = low = high = norm = math.nan
    return TensorStats(key, tuple(tensor.shape), mean, low, high, norm, int(nan.sum()), int(inf.sum()))


def is_weight_key(key: str) -> bool:
    """The keys sd-scripts' check_lora_weights lists by default."""
    return "lora_up" in key or "lora_down" in key


def all_tensor_stats(state_dict: Mapping[str, torch.Tensor], show_all_keys: bool = False) -> list[TensorStats]:
    """Stats of every lora_up / lora_down tensor (and of every other key with `show_all_keys`)."""
    keys = [k for k in state_dict if is_weight_key(k)]
    if show_all_keys:
        keys += [k for k in state_dict if not is_weight_key(k)]
    return [tensor_stats(k, state_dict[k]) for k in keys]


def module_problems(stats: Iterable[TensorStats]) -> list[ModuleProblems]:
    """Modules (name before the first '.') with NaN / inf values or an all-zero up or down weight."""
    by_module: dict[str, ModuleProblems] = {}
    for item in stats:
        name = item.key.split(".", 1)[0]
        entry = by_module.setdefault(name, ModuleProblems(name))
        found = []
        if item.num_nan:
            found.append(PROBLEM_NAN)
        if item.num_inf:
            found.append(PROBLEM_INF)
        if item.all_zero and is_weight_key(item.key):
            found.append(PROBLEM_ZERO)
        for problem in found:
            text = f"{problem} in {item.key.split('.', 1)[1]}"
            if text not in entry.problems:
                entry.problems.append(text)
    return [entry for entry in by_module.values() if entry.problems]
