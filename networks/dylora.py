"""DyLoRA (networks.dylora): a LoRA trained so that every rank prefix r = k·unit is usable.

Files have the same keys, names and shapes as a LoRA of rank R = network_dim (SPEC 2.7); a
rank-r LoRA is `lora_down[:r]`, `lora_up[:, :r]` with alpha unchanged.

Training (DyLoRA paper): each forward of a module in training mode draws a prefix end b
(a multiple of `unit`), uses only the first b + unit rank components, trains only the unit
block [b, b + unit) (earlier blocks are used but frozen for this step) and scales the
output by scale·√(R / (b + unit)). In eval mode the full rank is used (or `set_eval_rank`).
The rank components are stored as one parameter per unit block so that blocks without a
gradient in a step get `grad is None` and optimizers leave them untouched.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional

import torch

from library.errors import UserError
from networks.lora import (
    BaseLoRAModule,
    LoRANetwork,
    PathLike,
    build_network_from_weights,
    parse_network_dim_alpha,
    warn_unknown_network_args,
)
from networks.lora_keys import TargetLayer, parse_float_arg, parse_int_arg

logger = logging.getLogger(__name__)

KNOWN_NETWORK_ARGS = frozenset({"conv_dim", "conv_alpha", "unit"})
_FILE_KEYS = ("lora_down.weight", "lora_up.weight", "alpha")


class DyLoRAModule(BaseLoRAModule):
    """Dynamic-rank adapter around one Linear / Conv2d layer."""

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: Any = 1.0,
        unit: int = 1,
    ) -> None:
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha)
        if unit <= 0 or lora_dim % unit != 0:
            raise UserError(f"DyLoRA module {lora_name}: rank {lora_dim} is not a multiple of unit {unit}")
        self.unit = unit
        self.num_units = lora_dim // unit
        self.eval_rank: Optional[int] = None
        self.is_conv = isinstance(org_module, torch.nn.Conv2d)
        if self.is_conv:
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            kernel = tuple(org_module.kernel_size)
            self.stride, self.padding, self.dilation = org_module.stride, org_module.padding, org_module.dilation
            up_tail: tuple[int, ...] = (1, 1)
        else:
            in_dim, out_dim = org_module.in_features, org_module.out_features
            kernel = ()
            up_tail = ()
        down = torch.empty(lora_dim, in_dim, *kernel)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        for i in range(self.num_units):
            block = slice(i * unit, (i + 1) * unit)
            self.register_parameter(f"lora_down_{i}", torch.nn.Parameter(down[block].clone()))
            self.register_parameter(f"lora_up_{i}", torch.nn.Parameter(torch.zeros(out_dim, unit, *up_tail)))

    def _down_blocks(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"lora_down_{i}") for i in range(self.num_units)]

    def _up_blocks(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"lora_up_{i}") for i in range(self.num_units)]

    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_down [R, ...], lora_up [out, R, ...]) as in a LoRA file."""
        return torch.cat(self._down_blocks(), dim=0), torch.cat(self._up_blocks(), dim=1)

    def _prefix_weights(self, num_units: int, trained_unit: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        downs, ups = self._down_blocks()[:num_units], self._up_blocks()[:num_units]
        if trained_unit is not None:
            downs = [d if i == trained_unit else d.detach() for i, d in enumerate(downs)]
            ups = [u if i == trained_unit else u.detach() for i, u in enumerate(ups)]
        return torch.cat(downs, dim=0), torch.cat(ups, dim=1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        org_out = self.org_forward(x, *args, **kwargs)
        if self.training:
            # torch RNG (not `random`) so that gradient-checkpoint recomputation draws the same b
            trained_unit = int(torch.randint(0, self.num_units, (1,)).item())
            rank = (trained_unit + 1) * self.unit
            factor = self.scale * math.sqrt(self.lora_dim / rank)
            down, up = self._prefix_weights(trained_unit + 1, trained_unit)
        else:
            rank = self.eval_rank or self.lora_dim
            factor = self.scale * self.lora_dim / rank  # alpha / rank: what a LoRA file sliced to this rank gives
            down, up = self._prefix_weights(rank // self.unit, None)
        h = x.to(down.dtype)
        if self.is_conv:
            h = torch.nn.functional.conv2d(h, down, None, self.stride, self.padding, self.dilation)
            h = torch.nn.functional.conv2d(h, up)
        else:
            h = torch.nn.functional.linear(torch.nn.functional.linear(h, down), up)
        return org_out + (h * (self.multiplier * factor)).to(org_out.dtype)

    # the file layout is the LoRA one: lora_down.weight / lora_up.weight / alpha
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        down, up = self.full_weights()
        alpha = self.alpha
        if not keep_vars:
            down, up, alpha = down.detach(), up.detach(), alpha.detach()
        destination[prefix + "lora_down.weight"] = down
        destination[prefix + "lora_up.weight"] = up
        destination[prefix + "alpha"] = alpha

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        own_down, own_up = self.full_weights()
        expected = {"lora_down.weight": own_down.shape, "lora_up.weight": own_up.shape, "alpha": self.alpha.shape}
        values = {}
        for key, shape in expected.items():
            full_key = prefix + key
            if full_key not in state_dict:
                missing_keys.append(full_key)
                continue
            value = state_dict[full_key]
            if value.shape != shape:
                error_msgs.append(f"size mismatch for {full_key}: file {tuple(value.shape)}, model {tuple(shape)}")
                continue
            values[key] = value
        with torch.no_grad():
            if "lora_down.weight" in values:
                for block, part in zip(self._down_blocks(), values["lora_down.weight"].split(self.unit, dim=0)):
                    block.copy_(part)
            if "lora_up.weight" in values:
                for block, part in zip(self._up_blocks(), values["lora_up.weight"].split(self.unit, dim=1)):
                    block.copy_(part)
            if "alpha" in values:
                self.alpha.copy_(values["alpha"])
                self._update_scale()
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):] not in _FILE_KEYS:
                    unexpected_keys.append(key)


class DyLoRANetwork(LoRANetwork):
    """LoRA network of DyLoRA modules; 3x3 convs (conv_dim) use network_dim and network_alpha."""

    NETWORK_MODULE = "networks.dylora"

    def __init__(
        self,
        text_encoder: Optional[torch.nn.Module],
        unet: Optional[torch.nn.Module],
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        unit: int = 1,
        apply_to_conv: bool = False,
        modules_dim: Optional[Mapping[str, int]] = None,
        modules_alpha: Optional[Mapping[str, Any]] = None,
    ) -> None:
        object.__setattr__(self, "unit", unit)  # needed by _make_module during LoRANetwork.__init__
        super().__init__(
            text_encoder,
            unet,
            multiplier=multiplier,
            lora_dim=lora_dim,
            alpha=alpha,
            conv_lora_dim=lora_dim if apply_to_conv else None,
            conv_alpha=alpha if apply_to_conv else None,
            modules_dim=modules_dim,
            modules_alpha=modules_alpha,
        )

    def _make_module(self, layer: TargetLayer, rank: int, alpha: Any) -> torch.nn.Module:
        return DyLoRAModule(layer.lora_name, layer.module, self.multiplier, rank, alpha, unit=self.unit)

    def set_eval_rank(self, rank: Optional[int]) -> None:
        """Evaluate with the first `rank` components (as a LoRA file sliced to that rank); None = full."""
        for lora in self.text_encoder_loras + self.unet_loras:
            if rank is not None and (rank <= 0 or rank % lora.unit or rank > lora.lora_dim):
                raise UserError(
                    f"DyLoRA rank {rank} is not a multiple of unit {lora.unit} in 1..{lora.lora_dim} ({lora.lora_name})"
                )
            lora.eval_rank = rank


def _parse_unit(kwargs: Mapping[str, Any]) -> int:
    unit = parse_int_arg("unit", kwargs.get("unit", 1))
    if unit <= 0:
        raise UserError(f"network_args unit must be a positive integer, got {kwargs.get('unit')!r}")
    return unit


def create_network(
    multiplier: float,
    network_dim: Optional[int],
    network_alpha: Optional[float],
    vae: Any,
    text_encoder: Optional[torch.nn.Module],
    unet: Optional[torch.nn.Module],
    neuron_dropout: Optional[float] = None,
    **kwargs: Any,
) -> DyLoRANetwork:
    """DyLoRA network from --network_dim/--network_alpha and --network_args unit / conv_dim."""
    warn_unknown_network_args(kwargs, KNOWN_NETWORK_ARGS, DyLoRANetwork.NETWORK_MODULE)
    dim, alpha = parse_network_dim_alpha(network_dim, network_alpha)
    unit = _parse_unit(kwargs)
    if dim % unit != 0:
        raise UserError(f"network_args unit={unit}: --network_dim {dim} must be a multiple of unit")
    apply_to_conv = False
    if kwargs.get("conv_dim") is not None:
        conv_dim = parse_int_arg("conv_dim", kwargs["conv_dim"])
        if conv_dim != dim:
            raise UserError(f"network_args conv_dim={conv_dim} must equal --network_dim {dim} for DyLoRA")
        if kwargs.get("conv_alpha") is not None and parse_float_arg("conv_alpha", kwargs["conv_alpha"]) != alpha:
            logger.warning("DyLoRA ignores conv_alpha; 3x3 convs use --network_alpha %s", alpha)
        apply_to_conv = True
    if neuron_dropout:
        logger.warning("DyLoRA does not support --network_dropout; it is ignored")
    return DyLoRANetwork(text_encoder, unet, multiplier, dim, alpha, unit=unit, apply_to_conv=apply_to_conv)


def create_network_from_weights(
    multiplier: float,
    file: Optional[PathLike],
    vae: Any,
    text_encoder: Optional[torch.nn.Module],
    unet: Optional[torch.nn.Module],
    weights_sd: Optional[Mapping[str, torch.Tensor]] = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[DyLoRANetwork, dict[str, torch.Tensor]]:
    """DyLoRA network shaped by a LoRA/DyLoRA file (ranks must be multiples of `unit`)."""

    def build(modules_dim: dict[str, int], modules_alpha: dict[str, Any]) -> DyLoRANetwork:
        unit = _parse_unit(kwargs)
        for name, rank in modules_dim.items():
            if rank % unit:
                raise UserError(f"LoRA weights {file}: module {name} has rank {rank}, not a multiple of unit {unit}")
        return DyLoRANetwork(
            text_encoder, unet, multiplier, unit=unit, modules_dim=modules_dim, modules_alpha=modules_alpha
        )

    return build_network_from_weights(file, weights_sd, build)


def dylora_rank_prefix(weights_sd: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The rank-`rank` LoRA inside DyLoRA weights: `lora_down[:rank]`, `lora_up[:, :rank]`, alpha kept.

    Modules whose rank is not larger than `rank` are kept whole.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in weights_sd.items():
        if key.endswith(".lora_down.weight"):
            value = value[:rank]
        elif key.endswith(".lora_up.weight"):
            value = value[:, :rank]
        out[key] = value.contiguous()
    return out
