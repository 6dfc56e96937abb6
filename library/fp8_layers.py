"""Frozen Linear / Conv2d weights stored in fp8 (`--fp8_base`, `--fp8_base_unet`).

A LoRA run never trains the base model, so its layers' weights only have to be read: stored as
`float8_e4m3fn` they take a quarter of fp32's memory (half of bf16's). Each layer casts its weight
to the compute dtype (the autocast dtype, else the dtype the model was loaded in) for its own
product and drops the copy afterwards.

Why not `torch.autocast` over fp8 weights (sd-scripts' way) or diffusers' layerwise casting: in
both, the upcast copy is what the layer's backward saves (it needs the weight for the input
gradient), so during a training step every layer's full-precision copy is alive at once and the
memory saving is gone until the backward ends. Here a small autograd function saves the fp8
weight and casts it again in the backward: the only full-precision weight alive is the layer
being computed.

Norms, embeddings and biases keep the load dtype (tiny, and the token-embedding table is only
looked up). The numerics change: e4m3 keeps 3 mantissa bits (about 3 % mean relative error on
SD weights), so this is opt-in, as in sd-scripts.
"""

from __future__ import annotations

import itertools
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
_COMPUTE_ATTR = "_fp8_compute_dtype"


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def storable(module: nn.Module) -> bool:
    """Layers whose weight can be stored in fp8: Linear, and Conv2d with zero padding given as numbers."""
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    )


def layer_weight_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the weights `store_layers_in_fp8` stores in fp8 (works on a meta model)."""
    return {f"{name}.weight" if name else "weight" for name, module in model.named_modules() if storable(module)}


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its first floating parameter that is not stored in fp8."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point() and not is_fp8(tensor):
            return tensor.dtype
    for module in model.modules():
        dtype = getattr(module, _COMPUTE_ATTR, None)
        if dtype is not None:
            return dtype
    return torch.float32


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` that leaves fp8-stored weights as they are (and records the new compute dtype)."""
    if not any(is_fp8(p) for p in model.parameters()):
        model.to(dtype=dtype)  # the model's own cast (diffusers' ModelMixin hooks included)
        return
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_floating_point() or is_fp8(tensor) or tensor.dtype == dtype:
                    continue
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(dtype)  # the same Parameter object, as Module.to keeps it
                else:
                    store[name] = tensor.to(dtype)
        if hasattr(module, _COMPUTE_ATTR):
            setattr(module, _COMPUTE_ATTR, dtype)


def _layer_compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return getattr(module, _COMPUTE_ATTR)


class _Fp8Linear(torch.autograd.Function):
    """y = x Wᵀ + b with W stored in fp8; saves the fp8 W (not an upcast copy) for the input gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        ctx.save_for_backward(weight)
        ctx.compute, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.to(ctx.compute).matmul(weight.to(ctx.compute)).to(ctx.x_dtype)
        return grad_x, None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    """conv2d with the weight stored in fp8; the backward computes only the input gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                stride: tuple, padding: tuple, dilation: tuple, groups: int):
        ctx.save_for_backward(weight)
        ctx.compute, ctx.x_dtype, ctx.x_shape = dtype, x.dtype, x.shape
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                        stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            stride, padding, dilation, groups = ctx.conv
            # an uninitialised stand-in of the input's shape and layout: the input gradient does not
            # read the input's values, and the same layout picks the same kernel as autograd's own
            layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
            x_like = torch.empty(ctx.x_shape, dtype=ctx.compute, device=grad.device, memory_format=layout)
            grad_x = torch.ops.aten.convolution_backward(
                grad.to(ctx.compute), x_like, weight.to(ctx.compute), None, list(stride), list(padding),
                list(dilation), False, [0, 0], groups, [True, False, False],
            )[0].to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, None, None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _Fp8Linear.apply(x, self.weight, self.bias, _layer_compute_dtype(self, x))


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return _Fp8Conv2d.apply(x, self.weight, self.bias, _layer_compute_dtype(self, x),
                            self.stride, self.padding, self.dilation, self.groups)


def store_layers_in_fp8(model: nn.Module, compute: torch.dtype | None = None) -> int:
    """Store every Linear / Conv2d weight of `model` in fp8 (cast here unless loading did; frozen
    from then on) and route those layers through the fp8 forward; returns how many layers. `compute` is the dtype
    they compute in outside autocast (default: the model's own). Must run before a LoRA wraps the
    layers (it keeps the forward it finds)."""
    compute = compute or compute_dtype(model)
    count = 0
    for module in model.modules():
        if not storable(module):
            continue
        if not is_fp8(module.weight):
            module.weight = nn.Parameter(module.weight.detach().to(FP8_DTYPE), requires_grad=False)
        module.weight.requires_grad_(False)
        setattr(module, _COMPUTE_ATTR, compute)
        forward = _linear_forward if isinstance(module, nn.Linear) else _conv_forward
        module.forward = types.MethodType(forward, module)
        count += 1
    return count
