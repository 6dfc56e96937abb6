"""ControlNet for generation: `--control_net_models/_preps/_weights/_ratios` with hint images
from `--guide_image_path` (as sd-scripts).

Models load through `library.control_net` (original and diffusers layouts); hints are made by
`library.control_hint` at each stage's size (highres fix runs the ControlNet in both stages).
Several ControlNets take turns step by step, each active for the first `ratio` of the steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from library.control_hint import Preprocessor, get_preprocessor, prepare_hint
from library.control_net import ControlNetUnit, control_net_residuals, load_control_net
from library.errors import UserError
from library.gen_pipeline import UNetKwargsFn


@dataclass
class ControlNetSpec:
    model: Any
    preprocessor: Preprocessor | None
    weight: float
    ratio: float


def _per_model(values: Sequence[Any] | None, count: int, default: Any, flag: str) -> list[Any]:
    if not values:
        return [default] * count
    if len(values) != count:
        raise UserError(f"{flag} has {len(values)} values for {count} --control_net_models")
    return list(values)


def load_control_nets(args, unet, v2: bool, dtype: torch.dtype, device: torch.device) -> list[ControlNetSpec]:
    files = list(args.control_net_models or [])
    if not files:
        return []
    if v2:
        raise UserError("--control_net_models: ControlNet is supported for SD 1.x models only")
    preps = _per_model(args.control_net_preps, len(files), None, "--control_net_preps")
    weights = _per_model(args.control_net_weights, len(files), 1.0, "--control_net_weights")
    ratios = _per_model(args.control_net_ratios, len(files), 1.0, "--control_net_ratios")
    specs = []
    for file, prep, weight, ratio in zip(files, preps, weights, ratios):
        model = load_control_net(Path(file), v2=False, dtype=dtype, device=device, base_unet=unet)
        model.requires_grad_(False)
        specs.append(ControlNetSpec(model, get_preprocessor(prep), float(weight), float(ratio)))
    return specs


def control_kwargs_fn(
    specs: Sequence[ControlNetSpec], guide_images: Sequence[Image.Image] | None, width: int, height: int
) -> UNetKwargsFn | None:
    """The per-step U-Net keyword arguments of one batch (hints at width×height), or None."""
    if not specs or not guide_images:
        return None
    units = []
    for spec in specs:
        hints = torch.cat([prepare_hint(image, spec.preprocessor, width, height) for image in guide_images])
        units.append(ControlNetUnit(spec.model, hints, spec.weight, spec.ratio))

    def kwargs(model_input, timestep, embeddings, step, num_steps) -> dict:
        return control_net_residuals(units, step, num_steps, model_input, timestep, embeddings)

    return kwargs
