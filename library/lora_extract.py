"""Extract a LoRA from two models (extract_lora_from_models.py): SVD of tuned − original.

The two models are read through `lora_model_map.ModelTargets`, one target layer of each at
a time, so memory holds two layer weights and the growing LoRA, never a model. Targets are
the network's own: LoRA-LierLa layers (text encoder and UNet transformers), plus the
C3Lier ResNet / sampler layers when `conv_dim` is given (3x3 convs at `conv_dim`, their
Linear / 1x1 layers at `dim`). Each difference is decomposed with `torch.linalg.svd` on the
chosen device and kept at its rank as up = U·S, down = Vh (alpha = rank, scale 1), with
sd-scripts' outlier clamp. The text encoder is left out when it did not change
(max |difference| below `min_diff`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from library import lora_svd
from library.errors import UserError
from library.lora_model_map import ModelTargets, TargetLocation
from library.lora_modules import LoraModuleWeights, lora_network_metadata
from library.train_metadata import base_model_version
from networks.lora_keys import KIND_CONV3X3, LORA_PREFIX_TEXT_ENCODER

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def _check_pair(org: ModelTargets, tuned: ModelTargets) -> None:
    if org.v2 != tuned.v2:
        raise UserError(f"--model_org {org.path} and --model_tuned {tuned.path} are different model types (SD 1.x vs 2.x)")
    for name, location in org.targets.items():
        other = tuned.targets.get(name)
        # Linear [o, i] and Conv 1x1 [o, i, 1, 1] are the same layer (v2 proj_in / proj_out)
        if other is None or (other.out_features, other.in_features) != (location.out_features, location.in_features):
            raise UserError(
                f"--model_tuned {tuned.path}: layer {name} is {None if other is None else other.shape} "
                f"but {location.shape} in --model_org {org.path}; the models must share one architecture"
            )


def _difference(org: ModelTargets, tuned: ModelTargets, name: str, device: Optional[str]) -> torch.Tensor:
    """tuned − org in float32, in org's layout."""
    original = org.get(name).to(device=device, dtype=torch.float32)
    return tuned.get(name).to(device=device, dtype=torch.float32).reshape(original.shape) - original


def _rank_for(location: TargetLocation, dim: int, conv_dim: Optional[int]) -> int:
    rank = conv_dim if location.kind == KIND_CONV3X3 else dim
    limit = lora_svd.max_rank_of(location.out_features, location.in_features)
    if rank is None or rank > limit:
        flag = "--conv_dim" if location.kind == KIND_CONV3X3 else "--dim"
        raise UserError(
            f"{flag} {rank} is larger than layer {location.lora_name} allows "
            f"({location.out_features}x{location.in_features}: at most {limit})"
        )
    return rank


def extract_modules(
    model_org: PathLike,
    model_tuned: PathLike,
    dim: int = 4,
    conv_dim: Optional[int] = None,
    v2: bool = False,
    clamp_quantile: float = 0.99,
    min_diff: float = 0.01,
    device: Optional[str] = None,
) -> tuple[dict[str, LoraModuleWeights], bool]:
    """(modules, is_v2) of the LoRA approximating model_tuned − model_org."""
    if dim < 1 or (conv_dim is not None and conv_dim < 1):
        raise UserError("--dim and --conv_dim must be positive integers")
    with ModelTargets.open(model_org, v2) as org, ModelTargets.open(model_tuned, v2) as tuned:
        _check_pair(org, tuned)
        names = [n for n, loc in org.targets.items() if conv_dim is not None or not loc.c3lier_only]
        te_names = [n for n in names if n.startswith(LORA_PREFIX_TEXT_ENCODER + "_")]
        # a second read of the text encoder is cheap next to keeping its differences
        te_max = max((float(_difference(org, tuned, n, device).abs().max()) for n in te_names), default=0.0)
        if te_max < min_diff:
            logger.info("text encoder unchanged (max |difference| %.3g < --min_diff %g): not extracted", te_max, min_diff)
            names = [n for n in names if n not in te_names]
        for name in names:
            _rank_for(org.targets[name], dim, conv_dim)  # refuse a bad rank before any work
        modules: dict[str, LoraModuleWeights] = {}
        for name in tqdm(names, desc="extracting", unit="module"):
            location = org.targets[name]
            rank = _rank_for(location, dim, conv_dim)
            diff = _difference(org, tuned, name, device).reshape(location.out_features, -1)
            up2d, down2d = lora_svd.svd_of_matrix(diff, device).factors(rank)
            up2d, down2d = lora_svd.clamp_factors(up2d, down2d, clamp_quantile)
            modules[name] = _module_for(location, up2d, down2d, rank)
        return modules, org.v2


def _module_for(location: TargetLocation, up2d: torch.Tensor, down2d: torch.Tensor, rank: int) -> LoraModuleWeights:
    """Layer-shaped factors: Linear [r, in] / [out, r]; conv [r, in, k, k] / [out, r, 1, 1]."""
    if len(location.shape) == 4:
        down = down2d.reshape(rank, *location.shape[1:])
        up = up2d.reshape(location.out_features, rank, 1, 1)
    else:
        down, up = down2d, up2d
    return LoraModuleWeights(down.contiguous(), up.contiguous(), float(rank))


def extract_metadata(
    modules: dict[str, LoraModuleWeights], v2: bool, model_org: PathLike, model_tuned: PathLike,
    dim: int, conv_dim: Optional[int],
) -> dict[str, str]:
    """ss_* keys describing the extracted network (sd-scripts writes module, dim and alpha)."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_v2": str(v2),
        "ss_base_model_version": base_model_version(v2, False),
        "ss_training_comment": f"extracted from {Path(model_tuned).name} minus {Path(model_org).name}",
    }
    metadata = lora_network_metadata(modules, metadata)
    # the flags as given, also when the text encoder was left out
    metadata["ss_network_dim"], metadata["ss_network_alpha"] = str(dim), str(dim)
    return metadata
