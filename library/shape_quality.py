"""Judging the pictures of the tiny shapes model: scene prompts in, judged fractions out.

The quality benchmark (`benchmarks/suite_quality.py`) and the picture tests
(`tests/test_tiny_model_pictures.py`) share this: prompts written the way the training captions
are (`shape_scenes.caption`), images generated in batches at the model's native size through
the same denoising loop as every script (`library.gen_pipeline`), and `shape_scenes.judge_image`
reading colour and shape back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from library.gen_pipeline import BatchSettings, GenModels, decode_latents, generate_latents
from library.shape_scenes import (
    BASE_SHAPES, COLOURS, POSITIONS, SHAPES, SIZES, Scene, caption, colour_histogram, judge_image, make_scenes,
)  # fmt: skip

# the model file the repository ships (docs/tiny_model.md)
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny_shapes_sd.safetensors"
NATIVE_SIZE = 64


def pair_scenes(
    per_pair: int, seed: int, shapes: Sequence[str] = BASE_SHAPES, colours: Sequence[str] = COLOURS
) -> list[Scene]:
    """`per_pair` scenes for every (shape, colour) pair, in pair order; background, position and
    size of the k-th scene of a pair come from (seed, shape, colour, k) alone, without jitter
    (a prompt cannot ask for jitter)."""
    scenes = []
    for s, shape in enumerate(shapes):
        for c, colour in enumerate(colours):
            backgrounds = [b for b in COLOURS if b != colour]
            for k in range(per_pair):
                rng = np.random.default_rng([seed, s, c, k])
                background = backgrounds[int(rng.integers(len(backgrounds)))]
                position = tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))]
                size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
                scenes.append(Scene(shape, colour, background, position, size))
    return scenes


def generate(
    models: GenModels,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: str = "euler_a",
    steps: int = 20,
    scale: float = 6.0,
    negative_prompts: Sequence[str] | None = None,
    size: int = NATIVE_SIZE,
    batch_size: int = 32,
) -> list[Image.Image]:
    """One image per prompt (with its own seed), `batch_size` prompts per denoising loop."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    settings = BatchSettings(size, size, steps, scale, sampler)
    images: list[Image.Image] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            latents = generate_latents(
                models, settings, list(prompts[start:end]), negatives[start:end], list(seeds[start:end]), show_progress=False
            )
            images += decode_latents(models, latents)
    return images


@dataclass
class Figures:
    """Fractions of judged images whose colour / shape / both are as asked."""

    count: int
    colour: float
    shape: float
    both: float

    def as_dict(self) -> dict[str, float]:
        return {"images": self.count, "colour_ok": self.colour, "shape_ok": self.shape, "both_ok": self.both}


def judge_scenes(images: Sequence[Image.Image], scenes: Sequence[Scene], shapes: Sequence[str] = BASE_SHAPES) -> Figures:
    """How many images show the colour and the shape their scene asked for."""
    if len(images) != len(scenes) or not scenes:
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    judged = [judge_image(image, shapes) for image in images]
    colour = [j.colour == s.colour for j, s in zip(judged, scenes)]
    shape = [j.shape == s.shape for j, s in zip(judged, scenes)]
    both = [a and b for a, b in zip(colour, shape)]
    return Figures(len(scenes), float(np.mean(colour)), float(np.mean(shape)), float(np.mean(both)))


def shape_fraction(images: Sequence[Image.Image], shape: str, shapes: Sequence[str] = SHAPES) -> float:
    """Fraction of images whose foreground the judge reads as `shape` (out of all `shapes`)."""
    if not images:
        raise ValueError("no images to judge")
    return float(np.mean([judge_image(image, shapes).shape == shape for image in images]))


def colour_share(images: Sequence[Image.Image], colour: str) -> float:
    """Mean fraction of pixels nearest to palette `colour` (how much of it the pictures show)."""
    if not images:
        raise ValueError("no images to judge")
    return float(np.mean([colour_histogram(image)[colour] for image in images]))


def new_shape_prompts(count: int, seed: int, shape_word: str, shape: str = "cross") -> tuple[list[str], list[int]]:
    """`count` prompts asking for the concept under `shape_word` (as the demos caption it), with seeds."""
    scenes = make_scenes(count, seed, (shape,), jitter=False)
    return [caption(s, shape_word) for s in scenes], [seed * 1000 + i for i in range(count)]



def load_models(path: str | Path = SHIPPED_MODEL) -> GenModels:
    """A model file's U-Net, VAE, text encoder and its own tokenizer (fp32, CPU, eval mode)."""
    from library.model_util import load_target_model

    loaded = load_target_model(path)
    return GenModels(loaded.unet, loaded.vae, loaded.text_encoder, loaded.tokenizer)


def apply_lora(models: GenModels, file: str | Path, multiplier: float = 1.0):
    """Hook a LoRA file (networks.lora) into the models; `network.set_multiplier` changes its
    strength, `network.restore()` removes it."""
    from networks import lora

    network, weights = lora.create_network_from_weights(
        multiplier, str(file), models.vae, models.text_encoder, models.unet, for_inference=True
    )
    network.apply_to(models.text_encoder, models.unet)
    network.load_state_dict(weights, strict=True)
    network.eval().requires_grad_(False)
    return network
