"""ControlNet for generation: `--control_net_models/_preps/_weights/_ratios` with hint images
from `--guide_image_path` (as sd-scripts).

Loading, hint order and the per-step residuals are `library.control_net`'s
(`load_control_nets`, `make_units`, `control_net_residuals`); this module adapts them to the
generator: hints are made per batch at each stage's size (highres fix runs the ControlNet in
both stages) and handed to `library.gen_pipeline.generate_latents` as U-Net keyword arguments.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from library.control_net import ControlNetSpec, control_net_residuals, load_control_nets, make_units
from library.errors import UserError
from library.gen_pipeline import UNetKwargsFn


def load_from_args(args, unet, v2: bool, dtype: torch.dtype, device: torch.device) -> list[ControlNetSpec]:
    files = list(args.control_net_models or [])
    if not files:
        return []
    if v2:
        raise UserError("--control_net_models: ControlNet is supported for SD 1.x models only")
    for flag in ("control_net_preps", "control_net_weights", "control_net_ratios"):
        values = getattr(args, flag)
        if values and len(values) > len(files):
            raise UserError(f"--{flag} has {len(values)} values for {len(files)} --control_net_models")
    specs = load_control_nets(
        files, args.control_net_preps, args.control_net_weights, args.control_net_ratios,
        v2=False, base_unet=unet, dtype=dtype, device=device,
    )
    for spec in specs:
        spec.model.requires_grad_(False)
    return specs


def control_kwargs_fn(
    specs: Sequence[ControlNetSpec], guide_images: Sequence[Image.Image], width: int, height: int, batch_size: int
) -> UNetKwargsFn | None:
    """The per-step U-Net keyword arguments of one batch (hints at width×height), or None."""
    if not specs:
        return None
    units = make_units(specs, guide_images, width, height, batch_size)

    def kwargs(model_input, timestep, embeddings, step, num_steps) -> dict:
        return control_net_residuals(units, step, num_steps, model_input, timestep, embeddings)

    return kwargs
