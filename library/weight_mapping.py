"""Which frozen U-Net weights a run may map from a `.safetensors` file without changing a result.

A mapped tensor (`SafetensorsReader.map_tensor`) is only as aligned as its offset in the file,
while tensors read into memory are 64-byte aligned. Matrix products of two or more rows pack
their operands first and give bit-identical results either way, and so do convolutions,
element-wise ops and row look-ups. A matrix-vector product does not: the vector kernel's result
depends on where its rows start (benchmarks/RESULTS.md, LoRA optimisation #8, lists the full-size
layers measured). In an SD U-Net such a product comes from

- the layers that see one vector per sample at any image size: the timestep-embedding MLP and
  each ResNet's projection of it (`time_emb_proj`), at batch 1;
- every layer of a resolution level whose feature map is 1x1, at batch 1: at 64 px the deepest
  level (latent 8x8 halved three times), at 512 px none.

`maps_exactly` keeps those read and lets everything else be mapped; the text encoder always sees
77 tokens per sample, so none of its layers is a vector product.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

MAPPINGS = ("none", "exact", "all")

_PER_SAMPLE = re.compile(r"^(time_embedding|add_embedding|class_embedding)\.|\.time_emb_proj\.")
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(\w+)\.")


def unet_level(key: str, num_levels: int) -> int | None:
    """The resolution level a diffusers U-Net parameter computes at (0: the latent's own size,
    `num_levels - 1`: the smallest); None for the per-sample embedding layers, which have none.
    A down block's downsampler writes the next level; an up block's upsampler convolves after
    doubling, so at the level above its block's."""
    if _PER_SAMPLE.search(key):
        return None
    if key.startswith("mid_block."):
        return num_levels - 1
    match = _BLOCK.match(key)
    if match is None:  # conv_in, conv_norm_out, conv_out
        return 0
    kind, index, part = match.group(1), int(match.group(2)), match.group(3)
    if kind == "down_blocks":
        return index + 1 if part == "downsamplers" else index
    level = num_levels - 1 - index
    return level - 1 if part == "upsamplers" else level


def smallest_latent_side(sizes: Iterable[tuple[int, int]], latent_scale: int = 8) -> int:
    """Of the image sizes (width, height) a run computes on, the smallest longer side in latent
    pixels (1 when no size is known: every level may then be 1x1)."""
    sides = [max(math.ceil(w / latent_scale), math.ceil(h / latent_scale)) for w, h in sizes]
    return max(1, min(sides)) if sides else 1


def maps_exactly(key: str, num_levels: int, latent_side: int) -> bool:
    """Whether U-Net weight `key` may be mapped, unaligned, with bit-identical results, when no
    batch is smaller than one image of longer latent side `latent_side`: its layer never becomes
    a matrix-vector product (each halving of the U-Net rounds up, so a level of side s/2^k)."""
    level = unet_level(key, num_levels)
    return level is not None and math.ceil(latent_side / 2**level) > 1
