"""Regional LoRA and Attention Couple: ` AND ` sub-prompts, colour-channel masks, per-region networks.

A prompt `A AND B AND C` has one sub-prompt per part; part i gets network i
(`--network_weights` order) and mask i from the `--mask_path` image: R for part 1, G for
part 2, B for part 3, full for later parts, and a channel that is black everywhere also
counts as full (sd-scripts' rules).

Two mechanisms, usable together:

- **Regional LoRA** (`set_regions`): every U-Net LoRA module of network i multiplies its
  output by mask i, resized to the layer's size. Convolution outputs `[B, C, h, w]` get the
  mask at `h × w`; attention linear layers `[B, h·w, C]` get it flattened along the token
  axis; the cross-attention key/value projections (`attn2.to_k` / `to_v`), whose tokens are
  text tokens, get no spatial mask. Optionally a per-batch-row weight restricts network i to
  the rows of its own sub-prompt.
- **Attention Couple** (`combine_noise_predictions`): each sub-prompt is one more block of
  rows in the U-Net batch; their noise predictions are blended with the masks. With the
  row weights above, network i then changes the step's prediction only inside mask i.

The generator's step with both, for batch size B and P parts (uncond rows first):

    masks = region_masks(mask_image, P, (latent_w, latent_h))
    set_regions(networks, masks, rows=[part_rows(i, P, B, leading_rows=B) for i in range(P)])
    eps = unet(latents.repeat(1 + P, 1, 1, 1), t, torch.cat([uncond, *part_embeddings])).sample
    cond = combine_noise_predictions(eps[B:], masks)
    eps = eps[:B] + scale * (cond - eps[:B])
    ...
    clear_regions(networks)
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.errors import UserError
from library.image_util import load_image

PROMPT_SEPARATOR = " AND "
# U-Net LoRA modules whose inputs are text tokens, not spatial positions
TEXT_TOKEN_MODULES = ("attn2_to_k", "attn2_to_v")
MASK_CHANNELS = 3  # R, G, B


def split_prompt(prompt: str) -> list[str]:
    """Sub-prompts of `A AND B AND C` (stripped; the separator is case-sensitive, as sd-scripts)."""
    return [part.strip() for part in prompt.split(PROMPT_SEPARATOR)]


def _resize(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize `[..., H, W]` masks to (h, w): area averages when shrinking (a cell's coverage,
    so a mask edge on the cell grid stays sharp), bilinear when enlarging."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    if size[0] <= mask.shape[-2] and size[1] <= mask.shape[-1]:
        out = F.interpolate(flat, size=size, mode="area")
    else:
        out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*mask.shape[:-2], *size).to(mask.dtype)


def region_masks(
    image: str | Path | np.ndarray | Image.Image, num_parts: int, size: tuple[int, int]
) -> torch.Tensor:
    """`Tensor[num_parts, h, w]` in [0, 1] from a mask image's colour channels, at `size` = (w, h)."""
    if isinstance(image, (str, Path)):
        array = load_image(image)
    elif isinstance(image, Image.Image):
        array = np.array(image.convert("RGB"))
    else:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
    channels = torch.from_numpy(array[:, :, :MASK_CHANNELS].astype(np.float32) / 255.0).permute(2, 0, 1)
    width, height = size
    channels = _resize(channels, (int(height), int(width))).clamp(0.0, 1.0)
    masks = []
    for part in range(num_parts):
        mask = channels[part] if part < MASK_CHANNELS else None
        # a part past the third, or a black channel, covers the whole image
        masks.append(torch.ones((int(height), int(width))) if mask is None or mask.max() == 0 else mask)
    return torch.stack(masks)


def level_sizes(latent_size: tuple[int, int], levels: int = 8) -> list[tuple[int, int]]:
    """(h, w) of each U-Net level: stride-2 convolutions with padding 1 halve and round up."""
    sizes = [tuple(int(s) for s in latent_size)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        if h == 1 and w == 1:
            break
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


class RegionMask:
    """What a LoRA module calls on its output: `region(lora_name, output) -> weighted output`.

    `mask` is `[h, w]` at latent resolution; `rows` (optional) is `[batch]`, a weight per
    row of the U-Net batch (e.g. 1 for this network's sub-prompt rows, 0 elsewhere).
    """

    def __init__(self, mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> None:
        self.mask = None if mask is None else mask.detach().float().reshape(mask.shape[-2:])
        self.rows = None if rows is None else rows.detach().float().reshape(-1)
        self._areas = {} if self.mask is None else {h * w: (h, w) for h, w in level_sizes(tuple(self.mask.shape))}
        self._cache: dict[tuple, torch.Tensor] = {}

    def _spatial(self, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        key = (size, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = _resize(self.mask, size).to(like.device, like.dtype)
        return self._cache[key]

    def factor(self, lora_name: str, out: torch.Tensor) -> torch.Tensor | None:
        """The weight broadcast over `out`, or None when nothing applies."""
        factor = None
        if self.mask is not None and out.dim() == 4:
            factor = self._spatial(tuple(out.shape[2:]), out)[None, None]
        elif self.mask is not None and out.dim() == 3 and not any(m in lora_name for m in TEXT_TOKEN_MODULES):
            tokens = out.shape[1]
            if tokens not in self._areas:
                raise ValueError(f"regional LoRA: {lora_name} has {tokens} tokens, no U-Net level of the mask has that area")
            factor = self._spatial(self._areas[tokens], out).reshape(1, tokens, 1)
        if self.rows is not None:
            if self.rows.numel() != out.shape[0]:
                raise ValueError(f"regional LoRA: {self.rows.numel()} row weights for a batch of {out.shape[0]}")
            rows = self.rows.to(out.device, out.dtype).reshape(-1, *([1] * (out.dim() - 1)))
            factor = rows if factor is None else factor * rows
        return factor

    def __call__(self, lora_name: str, out: torch.Tensor) -> torch.Tensor:
        factor = self.factor(lora_name, out)
        return out if factor is None else out * factor


def _check_networks(networks: Sequence[object]) -> None:
    for network in networks:
        if not hasattr(network, "set_region"):
            raise UserError(f"regional LoRA needs networks.lora networks; {type(network).__module__} has no set_region")


def set_regions(
    networks: Sequence[object],
    masks: torch.Tensor,
    rows: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """Give network i mask i (`masks`: `[P, h, w]` at latent size) and optionally row weights i."""
    _check_networks(networks)
    if len(masks) < len(networks):
        raise UserError(f"regional LoRA: {len(networks)} networks but only {len(masks)} masks")
    for i, network in enumerate(networks):
        network.set_region(RegionMask(masks[i], None if rows is None else rows[i]))


def clear_regions(networks: Sequence[object]) -> None:
    _check_networks(networks)
    for network in networks:
        network.set_region(None)


def part_rows(part: int, num_parts: int, batch_size: int, leading_rows: int = 0) -> torch.Tensor:
    """Row weights selecting sub-prompt `part` in a batch laid out as
    `[leading_rows (e.g. uncond) | part 0 × batch_size | part 1 × batch_size | ...]`."""
    rows = torch.zeros(leading_rows + num_parts * batch_size)
    start = leading_rows + part * batch_size
    rows[start : start + batch_size] = 1.0
    return rows


def combine_noise_predictions(part_predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Attention Couple: blend `[P·B, C, h, w]` (part-major) predictions with `[P, h', w']` masks.

    Each position is the mask-weighted mean over the parts; where every mask is 0 the parts
    are averaged equally.
    """
    num_parts = masks.shape[0]
    if part_predictions.shape[0] % num_parts:
        raise ValueError(f"{part_predictions.shape[0]} predictions for {num_parts} parts")
    batch = part_predictions.shape[0] // num_parts
    preds = part_predictions.reshape(num_parts, batch, *part_predictions.shape[1:])
    weights = _resize(masks.to(preds.device, torch.float32), tuple(preds.shape[-2:]))
    total = weights.sum(0, keepdim=True)
    weights = torch.where(total > 0, weights / total.clamp_min(1e-12), torch.full_like(weights, 1.0 / num_parts))
    return (preds.float() * weights[:, None, None]).sum(0).to(part_predictions.dtype)


@contextlib.contextmanager
def text_encoder_for_part(networks: Sequence[object], part: int) -> Iterator[None]:
    """While encoding sub-prompt `part`, only network `part`'s text-encoder modules are active
    (a `part` that names no network, e.g. `len(networks)` for the negative prompt, turns them all off)."""
    saved = []
    try:
        for i, network in enumerate(networks):
            if i == part:
                continue
            for lora in getattr(network, "text_encoder_loras", []):
                saved.append((lora, lora.multiplier))
                lora.multiplier = 0.0
        yield
    finally:
        for lora, multiplier in saved:
            lora.multiplier = multiplier
