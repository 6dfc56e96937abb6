"""Weighted merge of SD 1.x/2.x checkpoints, streamed tensor by tensor (tools/merge_models.py).

The merged file is built key by key: for each key of the first model, the tensors of all
models are read one at a time (`library.checkpoint_tensors`), summed with their ratios and
stored in the save precision. Memory therefore holds the merged model plus the tensors of the
current key - never the input models. Inputs may be any format the loader takes; the output
is an LDM single file (`.safetensors`, or `.ckpt`).

Like sd-scripts: ratios default to 1/N each and are used as given (they need not sum to 1);
the first model's keys define the output; a key another model lacks takes the first model's
value for that model's share; keys only other models have are skipped; `unet_only` keeps the
first model's text encoder and VAE. Non-float tensors (position ids) are copied from the first
model.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from library import sd_config, sd_keys
from library.checkpoint_tensors import (
    CheckpointTensors,
    check_same_architecture,
    is_unet_key,
    open_checkpoint_tensors,
    shape_like,
)
from library.errors import UserError
from library.io_util import atomic_path

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".safetensors", ".ckpt")


def merge_output_path(output: str | Path, models: Sequence[str | Path]) -> Path:
    """`--output` with `.safetensors` added unless it ends in .safetensors / .ckpt; never an input."""
    target = Path(output)
    if target.suffix.lower() not in OUTPUT_SUFFIXES:
        target = target.with_name(target.name + ".safetensors")
    for model in models:
        if target.resolve() == Path(model).resolve():
            raise UserError(f"--output {target} is also one of --models; choose another output file")
    return target


def merge_ratios(models: Sequence[str | Path], ratios: Optional[Sequence[float]]) -> list[float]:
    if len(models) < 2:
        raise UserError(f"--models needs at least two models to merge, got {len(models)}")
    if ratios is None:
        return [1.0 / len(models)] * len(models)
    if len(ratios) != len(models):
        raise UserError(f"--ratios has {len(ratios)} values but --models has {len(models)}; give one ratio per model")
    if abs(sum(ratios) - 1.0) > 1e-6:
        logger.warning("the ratios sum to %g, not 1: the merged weights are scaled accordingly", sum(ratios))
    return list(ratios)


def _merge_key(
    key: str,
    sources: list[CheckpointTensors],
    ratios: list[float],
    unet_only: bool,
    dtype: torch.dtype,
    save_dtype: torch.dtype,
    device: torch.device,
    missing: dict[int, list[str]],
) -> torch.Tensor:
    first = sources[0]
    base = first.get(key)
    if not base.is_floating_point():
        return base.clone()  # position ids and the like are not averaged
    if unet_only and not is_unet_key(key):
        return base.to("cpu", save_dtype, copy=True)
    # models without this key contribute the first model's value
    share = ratios[0]
    for index, source in enumerate(sources[1:], start=1):
        if key not in source:
            missing.setdefault(index, []).append(key)
            share += ratios[index]
    if first.owns_tensors and base.dtype == dtype and base.device == device:
        # accumulate in the memory the tensor was read into: no second allocation per key, so the
        # kept sums pack tightly and only one other tensor at a time is transient
        total = base
    else:
        total = base.to(device, dtype, copy=True)  # never write into a memory-mapped source
    total.mul_(share)
    for source, ratio in zip(sources[1:], ratios[1:]):
        if key in source:
            value = shape_like(source.get(key), first.shapes, key)
            total.add_(value.to(device, dtype), alpha=ratio)
            del value
    return total.to("cpu", save_dtype)


def _add_openclip_extras(merged: dict[str, torch.Tensor]) -> None:
    """A v2 merge led by a Diffusers folder lacks OpenCLIP's unused last block: add it as the loaders expect."""
    pattern = re.compile(re.escape(sd_config.TE_V2_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    blocks = {int(m[1]) for k in merged if (m := pattern.match(k))}
    if blocks and f"{sd_config.TE_V2_PREFIX}text_projection" not in merged:
        sd_keys.fabricate_openclip_extras(merged, max(blocks) + 1)


def merge_checkpoints(
    models: Sequence[str | Path],
    output: str | Path,
    ratios: Optional[Sequence[float]] = None,
    unet_only: bool = False,
    dtype: torch.dtype = torch.float32,
    save_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    show_skipped: bool = False,
) -> Path:
    """Write the weighted sum of `models` to `output`; returns the written path."""
    ratio_list = merge_ratios(models, ratios)
    target = merge_output_path(output, models)
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(open_checkpoint_tensors(model)) for model in models]
        check_same_architecture(sources)
        for source, ratio in zip(sources, ratio_list):
            logger.info("%s (%s), ratio %g", source.path, "SD 2.x" if source.v2 else "SD 1.x", ratio)
        first_keys = sources[0].keys()
        for source in sources[1:]:
            skipped = [k for k in source.keys() if k not in sources[0]]
            if skipped:
                logger.info("%s: %d keys are not in the first model and are skipped", source.path, len(skipped))
                if show_skipped:
                    for key in skipped:
                        logger.info("skip: %s", key)
        missing: dict[int, list[str]] = {}
        merged: dict[str, torch.Tensor] = {}
        for key in tqdm(first_keys, desc="merging", unit="tensor"):
            merged[key] = _merge_key(key, sources, ratio_list, unet_only, dtype, save_dtype, device, missing)
        for index, keys in sorted(missing.items()):
            logger.warning(
                "%s lacks %d keys of the first model (e.g. %s); the first model's values stand in for it",
                sources[index].path, len(keys), keys[0],
            )
        if sources[0].v2:
            _add_openclip_extras(merged)
    with atomic_path(target) as tmp:
        if target.suffix.lower() == ".safetensors":
            save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp))
        else:
            torch.save({"state_dict": merged, "epoch": 0, "global_step": 0}, str(tmp))
    logger.info("saved merged model: %s (%d tensors)", target, len(merged))
    return target
