"""Helpers shared by the textual-inversion and XTI tests: argv, weight snapshots, a fixed loss."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import train_helpers as th  # noqa: F401 - puts the repository root on sys.path


def ti_argv(model: Path, img: Path, out: Path, *extra: str) -> list[str]:
    """A short textual-inversion run on CPU (captions "mychar ..."); `extra` wins."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(img),
        "--caption_extension", ".txt",
        "--resolution", "64",
        "--output_dir", str(out),
        "--output_name", "emb",
        "--token_string", "mychar",
        "--init_word", "dog",
        "--learning_rate", "5e-2",
        "--optimizer_type", "AdamW",
        "--train_batch_size", "2",
        "--max_train_steps", "3",
        "--seed", "42",
        "--max_data_loader_n_workers", "0",
        "--cache_latents",
        *extra,
    ]


def make_ti_images(root: Path, count: int = 2, repeats: int = 1) -> Path:
    """The tiny image folder with captions naming the token string."""
    img = th.make_image_folder(root, count=count, repeats=repeats)
    for caption in img.glob("*/*.txt"):
        caption.write_text("a photo of mychar, " + caption.read_text(encoding="utf-8"), encoding="utf-8")
    return img


def base_text_encoder(ctx: Any):
    te = ctx.models.text_encoder
    return getattr(te, "text_encoder", te)  # XTI wraps it


def snapshot(ctx: Any) -> dict[str, dict[str, torch.Tensor]]:
    """CPU copies of every text-encoder and U-Net tensor."""
    def copy(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    return {"text_encoder": copy(base_text_encoder(ctx)), "unet": copy(ctx.models.unet)}


@torch.no_grad()
def fixed_loss(ctx: Any, caption: str | None = None, seeds: int = 12) -> float:
    """Denoising loss of the first cached batch at fixed noise and timesteps, with one caption
    for every image or (None) the batch's own training captions."""
    from library import text_encoding

    batch = ctx.dataset_group[(0, 0)]
    latents = batch["latents"] * ctx.models.vae.config.scaling_factor
    te = ctx.models.text_encoder
    captions = list(batch["captions"]) if caption is None else [caption] * latents.shape[0]
    ids = text_encoding.tokenize_captions(ctx.models.tokenizer, captions)
    states = text_encoding.encode_input_ids(te, ids, ctx.models.tokenizer, None, None)
    total = 0.0
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(100, 900, (latents.shape[0],), generator=gen)
        noisy = ctx.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = ctx.models.unet(noisy, timesteps, states).sample
        total += float(torch.nn.functional.mse_loss(pred, noise))
    return total / seeds
