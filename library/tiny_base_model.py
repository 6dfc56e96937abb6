"""Train a small SD 1.x-architecture model from scratch on procedural shape scenes.

Two stages, both on CPU from one seed: the VAE learns to reconstruct scenes (MSE plus a small
KL term), its latent space is rescaled so SD's fixed scaling factor (0.18215, which an SD file
cannot override) gives unit-variance latents, and then the U-Net and the text encoder learn
epsilon prediction on the cached latents of the scenes with their captions (some captions
dropped, so classifier-free guidance works). The result is saved as one SD-format single file
through `model_util.save_stable_diffusion_checkpoint`, so every tool loads it like SD 1.5.

The shapes obey the rules the loader uses to infer configs from weights (v1 U-Net: 8 heads;
text encoder: hidden // 64 heads; 32 normalisation groups), so the file reloads exactly.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from tqdm import tqdm

from library.sd_config import SD15_TEXT_ENCODER_CONFIG, SD_VAE_CONFIG, VAE_SCALING_FACTOR
from library.shape_scenes import BASE_SHAPES, caption, make_scenes, scenes_to_array

if TYPE_CHECKING:  # the model classes are imported in build_models: the tool's --help does without them
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

logger = logging.getLogger(__name__)


@dataclass
class TinyBaseConfig:
    """Sizes and schedule of a run. The defaults are the shipped model's."""

    resolution: int = 64
    num_images: int = 3000
    seed: int = 0
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)
    unet_channels: tuple[int, ...] = (64, 96, 128, 128)
    unet_layers_per_block: int = 1
    text_hidden_size: int = 64
    text_layers: int = 4
    vae_steps: int = 3000
    vae_batch_size: int = 8
    vae_crop: int = 32  # the VAE is convolutional: small crops teach it the same edges for 1/4 of the cost
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 2000
    unet_batch_size: int = 32
    unet_learning_rate: float = 5e-4
    text_encoder_learning_rate: float = 2e-4
    caption_dropout_rate: float = 0.1
    shapes: tuple[str, ...] = BASE_SHAPES


@dataclass
class TinyBaseResult:
    path: Path
    vae_losses: list[float] = field(default_factory=list)
    unet_losses: list[float] = field(default_factory=list)
    latent_scale: float = 1.0  # factor applied to the VAE's raw latents so they fit VAE_SCALING_FACTOR
    seconds: dict[str, float] = field(default_factory=dict)


def build_models(config: TinyBaseConfig) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Freshly initialised (unet, vae, text_encoder) for `config` (seeded by the caller)."""
    if any(c % 32 for c in (*config.vae_channels, *config.unet_channels)):
        raise ValueError("VAE and U-Net channel counts must be multiples of 32 (32 normalisation groups)")
    if len(config.vae_channels) != 4:
        raise ValueError("the VAE needs 4 levels: SD files and tools assume 8x downsampling")
    if config.resolution % 8 or config.vae_crop % 8:
        raise ValueError("resolution and VAE crop must be multiples of 8")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.resolution // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        block_out_channels=list(config.unet_channels),
        layers_per_block=config.unet_layers_per_block,
        norm_num_groups=32,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=8,  # SD v1 convention (8 heads), which the loader assumes
    )
    vae = AutoencoderKL(
        **{**SD_VAE_CONFIG, "block_out_channels": list(config.vae_channels), "layers_per_block": 1, "sample_size": config.resolution}
    )
    hidden = config.text_hidden_size
    text_config = CLIPTextConfig(
        **{
            **SD15_TEXT_ENCODER_CONFIG,
            "hidden_size": hidden,
            "intermediate_size": hidden * 4,
            "num_hidden_layers": config.text_layers,
            "num_attention_heads": max(1, hidden // 64),
            "projection_dim": hidden,
        }
    )
    return unet, vae, CLIPTextModel(text_config)


def make_dataset(config: TinyBaseConfig) -> tuple[torch.Tensor, list[str]]:
    """Images [N, 3, H, W] in [-1, 1] and their captions, from `config.seed`."""
    scenes = make_scenes(config.num_images, config.seed, config.shapes)
    pixels = torch.from_numpy(scenes_to_array(scenes, config.resolution)).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1.0, [caption(s) for s in scenes]


def _optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    losses: list[float],
    progress: tqdm,
    step: int,
    total: int,
    name: str,
    clip: float | None = None,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """Backward, optional gradient clipping, optimizer (and scheduler) step; record the loss
    and report it about 20 times per stage."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    losses.append(loss.item())
    if step % max(1, total // 20) == 0:
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        logger.info("%s step %d/%d loss %.5f", name, step + 1, total, losses[-1])


def train_vae(vae: AutoencoderKL, images: torch.Tensor, config: TinyBaseConfig, generator: torch.Generator) -> list[float]:
    """Reconstruction (MSE) + kl_weight * KL on random crops; returns the loss of every step."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    crop = min(config.vae_crop or config.resolution, config.resolution)
    losses = []
    progress = tqdm(range(config.vae_steps), desc="VAE", leave=False)
    for step in progress:
        index = torch.randint(len(images), (config.vae_batch_size,), generator=generator)
        y, x = (int(v) for v in torch.randint(config.resolution - crop + 1, (2,), generator=generator))
        batch = images[index, :, y : y + crop, x : x + crop]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + config.kl_weight * posterior.kl().mean()
        _optimizer_step(loss, optimizer, losses, progress, step, config.vae_steps, "VAE")
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Posterior means [N, 4, h, w] (unscaled)."""
    return torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])


@torch.no_grad()
def rescale_latent_space(vae: AutoencoderKL, factor: float) -> None:
    """Make the VAE's latents `factor` times larger without changing its reconstructions.

    quant_conv's mean rows and the log-variance (by 2 ln factor) scale the posterior;
    post_quant_conv divides it back before decoding. Exact up to float rounding.
    """
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= factor
    vae.quant_conv.bias[:channels] *= factor
    vae.quant_conv.bias[channels:] += 2 * math.log(factor)
    vae.post_quant_conv.weight /= factor


def train_unet_and_text_encoder(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer,
    latents: torch.Tensor,
    captions: list[str],
    config: TinyBaseConfig,
    generator: torch.Generator,
) -> list[float]:
    """Epsilon-prediction training on scaled latents with SD's DDPM noise schedule."""
    from library.samplers import get_noise_scheduler
    from library.text_encoding import encode_input_ids, tokenize_captions

    scheduler = get_noise_scheduler()
    unet.train()
    text_encoder.train()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": config.unet_learning_rate},
            {"params": list(text_encoder.parameters()), "lr": config.text_encoder_learning_rate},
        ],
        weight_decay=0.0,
    )
    warmup = max(1, config.unet_steps // 20)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.unet_steps) / config.unet_steps))
    )
    input_ids = tokenize_captions(tokenizer, captions)
    empty_ids = tokenize_captions(tokenizer, [""])
    scaled = latents * VAE_SCALING_FACTOR
    losses = []
    progress = tqdm(range(config.unet_steps), desc="U-Net + text encoder", leave=False)
    for step in progress:
        index = torch.randint(len(scaled), (config.unet_batch_size,), generator=generator)
        ids = input_ids[index].clone()
        dropped = torch.rand(len(index), generator=generator) < config.caption_dropout_rate
        ids[dropped] = empty_ids[0]
        states = encode_input_ids(text_encoder, ids, tokenizer, None, None)
        batch = scaled[index]
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(batch, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=states).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        _optimizer_step(loss, optimizer, losses, progress, step, config.unet_steps, "U-Net", clip=1.0, lr_scheduler=lr_scheduler)
    unet.eval()
    text_encoder.eval()
    return losses


def train_tiny_base_model(
    config: TinyBaseConfig,
    output: str | Path,
    save_dtype: torch.dtype | None = torch.float16,
    on_stage: Callable[[str, float], None] | None = None,
) -> TinyBaseResult:
    """Run both stages and write the SD single file `output` (atomically). `on_stage(name,
    seconds)` is told when each stage ends (for timing estimates)."""
    from library.model_util import save_stable_diffusion_checkpoint
    from library.tokenizer_util import load_tokenizer

    output = Path(output)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def stage_done(name: str) -> None:
        nonlocal started
        seconds[name] = time.perf_counter() - started
        started = time.perf_counter()
        logger.info("%s took %.1f s", name, seconds[name])
        if on_stage is not None:
            on_stage(name, seconds[name])

    unet, vae, text_encoder = build_models(config)
    images, captions = make_dataset(config)
    stage_done("data")
    vae_losses = train_vae(vae, images, config, generator)
    stage_done("vae")
    raw = encode_latents(vae, images)
    factor = float(1.0 / (VAE_SCALING_FACTOR * raw.std()))
    rescale_latent_space(vae, factor)
    latents = encode_latents(vae, images)
    stage_done("latents")
    unet_losses = train_unet_and_text_encoder(unet, text_encoder, load_tokenizer(), latents, captions, config, generator)
    stage_done("unet")
    metadata = {
        "tiny_base_model.config": json.dumps(asdict(config)),
        "tiny_base_model.latent_scale": f"{factor:.6f}",
        "tiny_base_model.final_vae_loss": f"{float(np.mean(vae_losses[-20:])):.6f}",
        "tiny_base_model.final_unet_loss": f"{float(np.mean(unet_losses[-20:])):.6f}",
    }
    save_stable_diffusion_checkpoint(
        False, output, text_encoder, unet, vae, global_step=config.unet_steps, save_dtype=save_dtype, metadata=metadata
    )
    stage_done("save")
    return TinyBaseResult(output, vae_losses, unet_losses, factor, seconds)
