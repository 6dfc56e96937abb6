"""Regional LoRA / Attention Couple for generation: a prompt `A AND B` with `--mask_path` (and no
`--image_path`) gives sub-prompt i its own region — mask channel i (R, G, B) — and network i
(`--network_weights` order). The machinery is `library.regional_prompts`; this module builds a
batch's embeddings and the guidance step for `library.gen_pipeline.generate_latents`.

U-Net batch layout for B images and P sub-prompts: `[uncond × B | part 0 × B | … | part P-1 × B]`
(without guidance: the parts only). The uncond rows are encoded with no network's text-encoder
part, part i with network i's only; network i's U-Net modules act only on part i's rows and
inside mask i, and the parts' predictions are blended with the masks.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from library.errors import UserError
from library.gen_pipeline import GenModels, encode_prompts, latent_scale_factor
from library.regional_prompts import (
    clear_regions,
    combine_noise_predictions,
    part_rows,
    region_masks,
    set_regions,
    split_prompt,
    text_encoder_for_part,
)


def num_parts(prompt: str) -> int:
    return len(split_prompt(prompt))


def _encode(models: GenModels, texts: Sequence[str]) -> torch.Tensor:
    return encode_prompts(models, list(texts), [""] * len(texts), guided=False, negative_scale=False)


def regional_embeddings(
    models: GenModels, networks: Sequence[Any], prompts: Sequence[str], negative_prompts: Sequence[str], guided: bool
) -> torch.Tensor:
    """Embeddings in the regional batch layout (all prompts of the batch have the same part count)."""
    parts = [split_prompt(p) for p in prompts]
    count = len(parts[0])
    blocks = []
    if guided:
        with text_encoder_for_part(networks, len(networks)):
            blocks.append(_encode(models, negative_prompts))
    for index in range(count):
        with text_encoder_for_part(networks, index):
            blocks.append(_encode(models, [p[index] for p in parts]))
    if len({block.shape[1] for block in blocks}) != 1:
        raise UserError(
            "regional prompt: the sub-prompts (and negative prompt) encode to different lengths; "
            "shorten the long one or use the same --max_embeddings_multiples chunk count"
        )
    return torch.cat(blocks)


def guidance_fn(masks: torch.Tensor, batch: int, guided: bool, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """U-Net output of the regional layout → the guided noise prediction of the B images."""

    def combine(prediction: torch.Tensor) -> torch.Tensor:
        if not guided:
            return combine_noise_predictions(prediction, masks)
        uncond = prediction[:batch]
        cond = combine_noise_predictions(prediction[batch:], masks)
        return uncond + scale * (cond - uncond)

    return combine


@contextlib.contextmanager
def regions_active(networks: Sequence[Any], masks: torch.Tensor, count: int, batch: int, guided: bool) -> Iterator[None]:
    """Network i acts on part i's rows inside mask i while the batch is denoised."""
    if not networks:
        yield
        return
    leading = batch if guided else 0
    set_regions(networks, masks, [part_rows(i, count, batch, leading_rows=leading) for i in range(len(networks))])
    try:
        yield
    finally:
        clear_regions(networks)


def latent_masks(models: GenModels, mask: Image.Image, count: int, width: int, height: int) -> torch.Tensor:
    factor = latent_scale_factor(models.vae)
    return region_masks(mask, count, (width // factor, height // factor))
