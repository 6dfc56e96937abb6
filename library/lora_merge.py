"""Merging LoRAs: into an SD model (streamed), into one LoRA (sum or concatenation), by SVD.

Into a model: W' = W + Σ ratio_i · up_i·down_i·alpha_i/rank_i for every target layer, which
is exactly what applying the LoRAs at run time computes. A single-file model is rewritten
tensor by tensor (`lora_model_map` finds each target's tensor, `safetensors_stream` writes
the output), so a 4 GB model never sits in memory twice; only a `.ckpt` output (one pickle)
holds the merged model once. A Diffusers folder is loaded as a model and merged with the
network's own `merge_to`.

LoRA + LoRA: sd-scripts' element-wise sum of the up and down tensors (same ranks), or with
`concat` the factors side by side along the rank, which keeps every ΔW exactly.
SVD merge: the best rank-r approximation of Σ ratio_i·ΔW_i (`lora_svd`).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from tqdm import tqdm

from library import lora_svd, modelspec
from library.errors import UserError
from library.io_util import atomic_path
from library.lora_model_map import ModelTargets, TargetLocation
from library.lora_modules import LoraFile, LoraModuleWeights, lora_network_metadata, reshape_down, reshape_up
from library.model_util import is_safetensors, load_target_model, save_stable_diffusion_checkpoint
from library.safetensors_stream import TensorSpec, write_streaming
from networks.lora import create_network_from_weights, lora_delta_weight, normalize_alpha

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------- checks
def check_fits_model(lora: LoraFile, targets: Mapping[str, TargetLocation], model: Path) -> None:
    """Every module of the LoRA must name a layer of the model and fit its shape."""
    for name, module in lora.modules.items():
        location = targets.get(name)
        if location is None:
            raise UserError(
                f"{lora.path}: module {name} has no layer in {model} (LoRA for a different model type?)"
            )
        if module.out_features != location.out_features or module.in_features != location.in_features:
            raise UserError(
                f"{lora.path}: module {name} (up {tuple(module.up.shape)}, down {tuple(module.down.shape)}) does not fit "
                f"the layer {location.shape} of {model} (LoRA for a different model, e.g. SD 1.x vs 2.x?)"
            )


def check_same_layers(loras: Sequence[LoraFile]) -> None:
    """Modules of the same name must wrap layers of the same shape in every LoRA."""
    seen: dict[str, tuple[LoraFile, LoraModuleWeights]] = {}
    for lora in loras:
        for name, module in lora.modules.items():
            if name not in seen:
                seen[name] = (lora, module)
                continue
            first_file, first = seen[name]
            if (first.out_features, first.in_features, first.is_conv3x3) != (
                module.out_features, module.in_features, module.is_conv3x3
            ):
                raise UserError(
                    f"module {name} has layer shape {first.out_features}x{first.in_features} in {first_file.path} but "
                    f"{module.out_features}x{module.in_features} in {lora.path} (LoRAs for different model types?)"
                )


# ---------------------------------------------------------------- into a model
def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def merge_into_model(
    sd_model: PathLike,
    loras: Sequence[LoraFile],
    ratios: Sequence[float],
    save_to: PathLike,
    v2: bool = False,
    merge_dtype: torch.dtype = torch.float32,
    save_dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write `sd_model` with `ratio_i`·ΔW of each LoRA added to its layers, as a single file `save_to`.

    `merge_dtype` is the precision the additions run in; `save_dtype` casts every float
    tensor of the output (None: each tensor keeps the source's dtype).
    """
    save_to = Path(save_to)
    with ModelTargets.open(sd_model, v2) as targets:
        for lora in loras:
            check_fits_model(lora, targets.targets, targets.path)
        ldm = targets.ldm
        if ldm is None:
            targets.close()
            return _merge_into_loaded_model(Path(sd_model), loras, ratios, save_to, targets.v2, save_dtype)
        # which LoRA modules change each file tensor (q/k/v of one fused v2 tensor share it)
        per_key: dict[str, list[TargetLocation]] = {}
        for name in {n for lora in loras for n in lora.modules}:
            location = targets.targets[name]
            per_key.setdefault(location.file_key, []).append(location)

        def produce(key: str) -> torch.Tensor:
            tensor = ldm.get(key)
            if key not in per_key:
                return _cast(tensor, save_dtype)
            merged = tensor.to(merge_dtype, copy=True)
            for location in per_key[key]:
                part = merged if location.chunk is None else merged.chunk(3, dim=0)[location.chunk]
                for lora, ratio in zip(loras, ratios):
                    module = lora.modules.get(location.lora_name)
                    if module is None:
                        continue
                    delta = lora_delta_weight(module.down, module.up, module.alpha, location.shape)
                    part += (ratio * delta).reshape(part.shape).to(merge_dtype)
            return merged.to(save_dtype or tensor.dtype)

        keys = ldm.keys()
        progress = lambda items: tqdm(items, desc="merging", unit="tensor")  # noqa: E731
        if is_safetensors(save_to):
            specs = [
                TensorSpec(k, save_dtype if save_dtype is not None and ldm.dtype(k).is_floating_point else ldm.dtype(k), ldm.shapes[k])
                for k in keys
            ]
            write_streaming(save_to, specs, produce, metadata=_merged_model_metadata(ldm.metadata or {}, save_to, targets.v2, sd_model, loras), progress=progress)
        else:
            # a pickle is written in one go: the merged model is held once (owned, not mapped)
            state_dict = {k: produce(k).clone() if ldm.mapped and k not in per_key else produce(k) for k in progress(keys)}
            counters = {k: int(v) for k, v in ldm.extras.items() if k in ("epoch", "global_step") and isinstance(v, (int, float))}
            with atomic_path(save_to) as tmp:
                torch.save({"state_dict": state_dict, "epoch": counters.get("epoch", 0), "global_step": counters.get("global_step", 0)}, str(tmp))
    logger.info("merged %d LoRA file(s) into %s", len(loras), save_to)
    return save_to


def _merge_into_loaded_model(
    sd_model: Path,
    loras: Sequence[LoraFile],
    ratios: Sequence[float],
    save_to: Path,
    v2: bool,
    save_dtype: Optional[torch.dtype],
) -> Path:
    """A Diffusers folder: load it, merge with the network's own merge_to, save as a single file."""
    models = load_target_model(sd_model, v2=v2 or None)
    for lora, ratio in zip(loras, ratios):
        network, weights_sd = create_network_from_weights(
            ratio, lora.path, models.vae, models.text_encoder, models.unet, weights_sd=_flat(lora)
        )
        network.merge_to(models.text_encoder, models.unet, weights_sd)
    save_stable_diffusion_checkpoint(
        models.v2, save_to, models.text_encoder, models.unet, models.vae, save_dtype=save_dtype,
        metadata=_merged_model_metadata({}, save_to, models.v2, sd_model, loras),
    )
    return save_to


def merged_lora_metadata(
    merged: Mapping[str, LoraModuleWeights], loras: Sequence[LoraFile], save_to: Path
) -> dict[str, str]:
    """Metadata of a LoRA merged from `loras` (merge_lora.py / svd_merge_lora.py): the network
    description and `modelspec.*` keys with `merged_from` naming the inputs."""
    return {
        **lora_network_metadata(merged, {"ss_network_module": "networks.lora"}),
        **modelspec.tool_output_metadata(
            modelspec.LORA, save_to, sources=[lora.metadata for lora in loras], merged_from=[lora.path for lora in loras]
        ),
    }


def _merged_model_metadata(
    source: Mapping[str, str], save_to: Path, v2: bool, sd_model: Union[str, os.PathLike], loras: Sequence[LoraFile]
) -> dict[str, str]:
    """The source model's metadata with fresh `modelspec.*` keys (title, date, merged_from)."""
    return modelspec.with_tool_modelspec(
        source, modelspec.MODEL, save_to, v2=v2, sources=[source], merged_from=[sd_model, *(lora.path for lora in loras)]
    )


def _flat(lora: LoraFile) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in lora.modules.items():
        out[f"{name}.lora_down.weight"] = module.down
        out[f"{name}.lora_up.weight"] = module.up
        out[f"{name}.alpha"] = torch.tensor(normalize_alpha(module.alpha, module.rank))
    return out


# ---------------------------------------------------------------- LoRA + LoRA
def merge_lora_modules(
    loras: Sequence[LoraFile], ratios: Sequence[float], concat: bool = False
) -> dict[str, LoraModuleWeights]:
    """One LoRA from several.

    concat=False (sd-scripts): per module, up and down are each summed element-wise, scaled by
    √(alpha_i/alpha_base)·ratio_i (the sign of a negative ratio goes to down only); alpha_base
    is the first file's alpha of the module. Ranks must be equal. This is not the sum of the
    ΔW_i: a single file's ΔW scales by ratio²·alpha_i/alpha_base and two files add cross terms.
    concat=True: the factors are concatenated along the rank so that ΔW = Σ ratio_i·ΔW_i
    exactly; the new rank is the sum of the ranks and alpha = rank (scale 1).
    """
    check_same_layers(loras)
    names: list[str] = []
    for lora in loras:
        names.extend(n for n in lora.modules if n not in names)
    merged: dict[str, LoraModuleWeights] = {}
    for name in names:
        present = [(lora, ratio) for lora, ratio in zip(loras, ratios) if name in lora.modules]
        merged[name] = _concat_module(name, present) if concat else _sum_module(name, present)
    return merged


def _concat_module(name: str, present: Sequence[tuple[LoraFile, float]]) -> LoraModuleWeights:
    ups, downs = [], []
    for lora, ratio in present:
        module = lora.modules[name]
        # split |ratio|·scale evenly between the factors; the sign rides on down
        factor = math.sqrt(abs(ratio) * module.scale)
        ups.append(module.up2d() * factor)
        downs.append(module.down2d() * (factor if ratio >= 0 else -factor))
    first = present[0][0].modules[name]
    up2d, down2d = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    return first.with_factors(up2d, down2d, float(down2d.shape[0]))


def _sum_module(name: str, present: Sequence[tuple[LoraFile, float]]) -> LoraModuleWeights:
    base_file = present[0][0]
    base = base_file.modules[name]
    base_alpha = normalize_alpha(base.alpha, base.rank)
    up = torch.zeros_like(base.up, dtype=torch.float32)
    down = torch.zeros_like(base.down, dtype=torch.float32)
    for lora, ratio in present:
        module = lora.modules[name]
        if module.rank != base.rank:
            raise UserError(
                f"module {name} has rank {module.rank} in {lora.path} but {base.rank} in {base_file.path}; "
                "use --concat, or svd_merge_lora.py, to merge LoRAs of different ranks"
            )
        scale = math.sqrt(normalize_alpha(module.alpha, module.rank) / base_alpha) * ratio
        up += module.up.float() * abs(scale)
        down += module.down.float() * scale
    return LoraModuleWeights(down, up, base_alpha)


# ---------------------------------------------------------------- SVD merge
def svd_merge_modules(
    loras: Sequence[LoraFile],
    ratios: Sequence[float],
    new_rank: int,
    new_conv_rank: Optional[int] = None,
    clamp_quantile: float = 0.99,
    device: Optional[str] = None,
) -> dict[str, LoraModuleWeights]:
    """Per module the best rank-`new_rank` (3x3 convs: `new_conv_rank`) approximation of
    Σ ratio_i·ΔW_i, found exactly from the concatenated factors; alpha = rank (scale 1)."""
    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    exact = merge_lora_modules(loras, ratios, concat=True)
    for name, module in exact.items():  # refuse a bad rank before any work
        rank = conv_rank if module.is_conv3x3 else new_rank
        limit = lora_svd.max_rank_of(module.out_features, module.in_features)
        if rank > limit:
            raise UserError(
                f"{'--new_conv_rank' if module.is_conv3x3 and new_conv_rank is not None else '--new_rank'} {rank} "
                f"is larger than module {name} allows ({module.out_features}x{module.in_features}: at most {limit})"
            )
    merged: dict[str, LoraModuleWeights] = {}
    for name, module in tqdm(exact.items(), desc="svd merge", unit="module"):
        rank = conv_rank if module.is_conv3x3 else new_rank
        decomposition = lora_svd.svd_of_product(module.up2d().to(device or "cpu"), module.down2d().to(device or "cpu"))
        up2d, down2d = decomposition.factors(rank)
        if up2d.shape[1] < rank:
            # Σ ranks < new_rank: pad with zero components so every module has the asked rank
            pad = rank - up2d.shape[1]
            up2d = torch.cat([up2d, up2d.new_zeros(up2d.shape[0], pad)], dim=1)
            down2d = torch.cat([down2d, down2d.new_zeros(pad, down2d.shape[1])], dim=0)
        up2d, down2d = lora_svd.clamp_factors(up2d.cpu(), down2d.cpu(), clamp_quantile)
        merged[name] = LoraModuleWeights(reshape_down(down2d, module.down.shape), reshape_up(up2d, module.up.shape), float(rank))
    return merged
