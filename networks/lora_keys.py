"""LoRA module naming, target discovery and block-wise arguments (SPEC 2.1-2.4).

Shared by networks.lora and networks.dylora. Module names follow kohya-ss/sd-scripts:
prefix + "_" + module path with "." replaced by "_"; text-encoder paths always use the
transformers 4.x layout (`text_model.encoder.layers.N...`) even when transformers 5.x
flattens `CLIPTextModel` and omits `text_model.`.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
TEXT_MODEL_PREFIX = "text_model."

UNET_TARGET_CLASSES = ("Transformer2DModel",)
UNET_CONV_TARGET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

NUM_OF_BLOCKS = 12  # IN00..IN11 and OUT00..OUT11 of the full-size UNet
NUM_TOTAL_BLOCKS = NUM_OF_BLOCKS * 2 + 1  # + the middle block
MID_BLOCK_INDEX = NUM_OF_BLOCKS

LR_WEIGHT_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")

_UPDOWN_RE = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")

KIND_LINEAR = "linear"
KIND_CONV1X1 = "conv1x1"
KIND_CONV3X3 = "conv3x3"


@dataclass(frozen=True)
class TargetLayer:
    """One Linear / Conv2d layer that a LoRA module wraps."""

    lora_name: str
    module: torch.nn.Module
    kind: str  # KIND_LINEAR, KIND_CONV1X1 or KIND_CONV3X3
    is_unet: bool


def is_text_encoder_target_class(class_name: str) -> bool:
    """CLIPAttention and its variants (CLIPSdpaAttention, ...) and CLIPMLP."""
    return class_name == "CLIPMLP" or (class_name.startswith("CLIP") and class_name.endswith("Attention"))


def text_encoder_module_path(path: str) -> str:
    """The transformers 4.x module path (`text_model.` prefix) for a CLIPTextModel path."""
    if path.startswith(TEXT_MODEL_PREFIX):
        return path
    return TEXT_MODEL_PREFIX + path


def make_lora_name(prefix: str, module_path: str) -> str:
    return f"{prefix}.{module_path}".replace(".", "_")


def layer_kind(module: torch.nn.Module) -> Optional[str]:
    if isinstance(module, torch.nn.Linear):
        return KIND_LINEAR
    if isinstance(module, torch.nn.Conv2d):
        return KIND_CONV1X1 if tuple(module.kernel_size) == (1, 1) else KIND_CONV3X3
    return None


def find_target_layers(
    root: torch.nn.Module,
    prefix: str,
    parent_matches: Callable[[str], bool],
    path_fixer: Callable[[str], str] = lambda p: p,
) -> list[TargetLayer]:
    """All Linear/Conv2d layers inside modules whose class name satisfies `parent_matches`."""
    layers: list[TargetLayer] = []
    seen: set[str] = set()
    is_unet = prefix == LORA_PREFIX_UNET
    for parent_path, parent in root.named_modules():
        if not parent_matches(type(parent).__name__):
            continue
        for child_path, child in parent.named_modules():
            kind = layer_kind(child)
            if kind is None:
                continue
            full_path = f"{parent_path}.{child_path}" if parent_path else child_path
            lora_name = make_lora_name(prefix, path_fixer(full_path))
            if lora_name in seen:
                continue
            seen.add(lora_name)
            layers.append(TargetLayer(lora_name, child, kind, is_unet))
    return layers


def find_text_encoder_layers(text_encoder: torch.nn.Module) -> list[TargetLayer]:
    return find_target_layers(
        text_encoder, LORA_PREFIX_TEXT_ENCODER, is_text_encoder_target_class, text_encoder_module_path
    )


def find_unet_layers(unet: torch.nn.Module, include_conv: bool) -> list[TargetLayer]:
    classes = UNET_TARGET_CLASSES + (UNET_CONV_TARGET_CLASSES if include_conv else ())
    return find_target_layers(unet, LORA_PREFIX_UNET, lambda name: name in classes)


def unet_block_index(lora_name: str) -> int:
    """Block index 0..24 of a UNet LoRA module (SPEC 2.4); -1 when it belongs to no block."""
    match = _UPDOWN_RE.search(lora_name)
    if match:
        direction, block, part, number = match.groups()
        j = 2 if part in ("upsamplers", "downsamplers") else int(number)
        idx = 3 * int(block) + j
        return 1 + idx if direction == "down" else NUM_OF_BLOCKS + 1 + idx
    if "mid_block_" in lora_name:
        return MID_BLOCK_INDEX
    return -1


# ---------------------------------------------------------------------------------------
# --network_args parsing

def parse_int_arg(name: str, value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserError(f"network_args {name}: expected an integer, got {value!r}") from None


def parse_float_arg(name: str, value: Any) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        raise UserError(f"network_args {name}: expected a number, got {value!r}") from None


def parse_optional_dropout(name: str, value: Any) -> Optional[float]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    rate = parse_float_arg(name, value)
    if not 0.0 <= rate < 1.0:
        raise UserError(f"network_args {name}: must be in [0, 1), got {value!r}")
    return rate


def _parse_list(name: str, value: Any, parse_item: Callable[[str, Any], Any], length: int) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    if len(items) != length:
        raise UserError(f"network_args {name}: expected {length} comma-separated values, got {len(items)}")
    return [parse_item(name, item) for item in items]


def _lr_weight_preset(name: str, spec: str) -> list[float]:
    preset, _, base_text = spec.partition("+")
    preset = preset.strip()
    base = parse_float_arg(name, base_text) if base_text else 0.0
    last = NUM_OF_BLOCKS - 1
    positions = range(NUM_OF_BLOCKS)
    if preset == "sine":
        values = [math.sin(math.pi / 2 * k / last) for k in positions]
    elif preset == "cosine":
        values = [math.sin(math.pi / 2 * (last - k) / last) for k in positions]
    elif preset == "linear":
        values = [k / last for k in positions]
    elif preset == "reverse_linear":
        values = [(last - k) / last for k in positions]
    elif preset == "zeros":
        values = [0.0] * NUM_OF_BLOCKS
    else:
        raise UserError(
            f"network_args {name}: unknown preset {preset!r} (use comma-separated numbers or one of "
            f"{', '.join(LR_WEIGHT_PRESETS)}, optionally with +base)"
        )
    return [v + base for v in values]


def _parse_lr_weight_list(name: str, value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        weights = [parse_float_arg(name, v) for v in value]
    else:
        text = str(value).strip()
        if text and (text[0].isalpha()):
            weights = _lr_weight_preset(name, text)
        else:
            # an empty item means 0.0, as in sd-scripts
            weights = [parse_float_arg(name, item) if item.strip() else 0.0 for item in text.split(",")]
    if len(weights) > NUM_OF_BLOCKS:
        logger.warning("%s has %d values; values after the %dth are ignored", name, len(weights), NUM_OF_BLOCKS)
        weights = weights[:NUM_OF_BLOCKS]
    elif len(weights) < NUM_OF_BLOCKS:
        logger.warning("%s has %d values; the missing ones are set to 1.0", name, len(weights))
        weights = weights + [1.0] * (NUM_OF_BLOCKS - len(weights))
    return weights


@dataclass
class BlockLrWeights:
    """Per-block learning-rate weights; None = 1.0 for that part."""

    down: Optional[list[float]] = None  # 12 values, block index 0..11
    mid: Optional[float] = None  # block index 12
    up: Optional[list[float]] = None  # 12 values, block index 13..24

    def weight_for_block(self, block_idx: int) -> float:
        if block_idx < 0:
            return 1.0
        if block_idx < NUM_OF_BLOCKS:
            return 1.0 if self.down is None else self.down[block_idx]
        if block_idx == MID_BLOCK_INDEX:
            return 1.0 if self.mid is None else self.mid
        return 1.0 if self.up is None else self.up[block_idx - NUM_OF_BLOCKS - 1]


def parse_block_lr_weights(kwargs: Mapping[str, Any]) -> Optional[BlockLrWeights]:
    """down_lr_weight / mid_lr_weight / up_lr_weight / block_lr_zero_threshold, or None if unset."""
    down_text = kwargs.get("down_lr_weight")
    mid_text = kwargs.get("mid_lr_weight")
    up_text = kwargs.get("up_lr_weight")
    if down_text is None and mid_text is None and up_text is None:
        return None
    threshold = parse_float_arg("block_lr_zero_threshold", kwargs.get("block_lr_zero_threshold", 0.0))
    weights = BlockLrWeights()
    if down_text is not None:
        weights.down = [w if w > threshold else 0.0 for w in _parse_lr_weight_list("down_lr_weight", down_text)]
    if mid_text is not None:
        # HEAD accepts a comma list (one value for SD 1.x/2.x); the first item is the mid weight
        first = str(mid_text).split(",")[0] if not isinstance(mid_text, (int, float)) else mid_text
        mid = parse_float_arg("mid_lr_weight", first)
        weights.mid = mid if mid > threshold else 0.0
    if up_text is not None:
        weights.up = [w if w > threshold else 0.0 for w in _parse_lr_weight_list("up_lr_weight", up_text)]
    logger.info("block lr weights: down=%s mid=%s up=%s", weights.down, weights.mid, weights.up)
    return weights


@dataclass
class BlockDims:
    """Per-block ranks / alphas for the UNet (index 0..24); conv lists None = no 3x3 convs."""

    dims: list[int]
    alphas: list[float]
    conv_dims: Optional[list[int]]
    conv_alphas: Optional[list[float]]


def parse_block_dims(
    kwargs: Mapping[str, Any],
    network_dim: int,
    network_alpha: float,
    conv_dim: Optional[int],
    conv_alpha: Optional[float],
    lr_weights: Optional[BlockLrWeights],
) -> BlockDims:
    """block_dims / block_alphas / conv_block_dims / conv_block_alphas with lr-0 blocks at rank 0."""
    n = NUM_TOTAL_BLOCKS
    dims = (
        _parse_list("block_dims", kwargs["block_dims"], parse_int_arg, n)
        if kwargs.get("block_dims") is not None
        else [network_dim] * n
    )
    alphas = (
        _parse_list("block_alphas", kwargs["block_alphas"], parse_float_arg, n)
        if kwargs.get("block_alphas") is not None
        else [network_alpha] * n
    )
    conv_dims: Optional[list[int]] = None
    conv_alphas: Optional[list[float]] = None
    if kwargs.get("conv_block_dims") is not None:
        conv_dims = _parse_list("conv_block_dims", kwargs["conv_block_dims"], parse_int_arg, n)
        if kwargs.get("conv_block_alphas") is not None:
            conv_alphas = _parse_list("conv_block_alphas", kwargs["conv_block_alphas"], parse_float_arg, n)
        else:
            conv_alphas = [1.0 if conv_alpha is None else conv_alpha] * n
    elif conv_dim is not None:
        conv_dims = [conv_dim] * n
        conv_alphas = [1.0 if conv_alpha is None else conv_alpha] * n
    for name, values in (("block_dims", dims), ("conv_block_dims", conv_dims)):
        if values is not None and any(v < 0 for v in values):
            raise UserError(f"network_args {name}: ranks must be >= 0")

    if lr_weights is not None:
        for idx in range(n):
            if lr_weights.weight_for_block(idx) == 0:
                dims[idx] = 0
                if conv_dims is not None:
                    conv_dims[idx] = 0
    return BlockDims(dims, alphas, conv_dims, conv_alphas)
