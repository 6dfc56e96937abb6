"""Tiny SD-architecture models with random weights, for tests, the demo and benchmarks.

The shapes follow the real SD 1.x / 2.x layouts (same block types, key names, v2 linear
projections and per-block head counts) at a fraction of the width, so every code path of
the toolkit runs on them in seconds. The head counts obey the same rules the loader uses
to infer a config from weights (v1 UNet: 8 heads; v2 UNet: channels // 64 heads; text
encoder: hidden // 64 heads, at least 1), so a tiny single file reloads exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library.sd_config import SD15_TEXT_ENCODER_CONFIG, SD21_TEXT_ENCODER_CONFIG, SD_VAE_CONFIG

V1_TINY_TEXT_HIDDEN = 32
V2_TINY_TEXT_HIDDEN = 64


def tiny_unet_config(v2: bool = False) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config of a tiny SD v1-like or v2-like UNet."""
    block_out_channels = [32, 64, 64, 64] if v2 else [32, 32, 64, 64]
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": block_out_channels,
        "layers_per_block": 2 if v2 else 1,
        "norm_num_groups": 32,
        "cross_attention_dim": V2_TINY_TEXT_HIDDEN if v2 else V1_TINY_TEXT_HIDDEN,
        # diffusers calls the number of heads "attention_head_dim" for SD UNets
        "attention_head_dim": [max(1, c // 64) for c in block_out_channels] if v2 else 8,
        "use_linear_projection": v2,
    }


def tiny_vae_config() -> dict[str, Any]:
    """diffusers AutoencoderKL config of a tiny SD-like VAE: the SD VAE (4 levels, so 8x
    downsampling) at a fraction of its width and depth."""
    return {**SD_VAE_CONFIG, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "sample_size": 64}


def tiny_text_encoder_config(v2: bool = False) -> CLIPTextConfig:
    """CLIPTextConfig of a tiny text encoder with the full CLIP vocabulary and 77 positions."""
    hidden = V2_TINY_TEXT_HIDDEN if v2 else V1_TINY_TEXT_HIDDEN
    full_size = SD21_TEXT_ENCODER_CONFIG if v2 else SD15_TEXT_ENCODER_CONFIG  # activation, token ids
    return CLIPTextConfig(
        **{
            **full_size,
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": 3,
            "num_attention_heads": max(1, hidden // 64),
            "projection_dim": hidden,
        }
    )


def build_tiny_models(
    v2: bool = False, seed: int = 0
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Build (unet, vae, text_encoder) with random weights from a fixed seed.

    Weights are re-drawn with a wider spread than the default init so that outputs depend
    visibly on every layer (a LoRA or a conversion bug then changes results measurably).
    """
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(v2))
    vae = AutoencoderKL(**tiny_vae_config())
    text_encoder = CLIPTextModel(tiny_text_encoder_config(v2))
    for model in (unet, vae, text_encoder):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                elif name.endswith("bias"):
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
                else:
                    fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                    param.copy_(torch.randn(param.shape, generator=generator) / max(fan_in, 1) ** 0.5)
        model.eval()
    return unet, vae, text_encoder


TINY_MODEL_FORMATS = ("diffusers", "safetensors", "ckpt")


def write_tiny_model(
    out_dir: str | Path,
    v2: bool = False,
    formats: Sequence[str] = TINY_MODEL_FORMATS,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the tiny model (build_tiny_models(v2, seed)) to disk in the requested formats.

    Returns {"diffusers": <out_dir>/diffusers, "safetensors": <out_dir>/tiny_sd_v{1,2}.safetensors,
    "ckpt": <out_dir>/tiny_sd_v{1,2}.ckpt} for the formats asked for. The `.ckpt` carries
    epoch/global_step like a real training checkpoint.
    """
    from library.model_util import save_diffusers_checkpoint, save_stable_diffusion_checkpoint

    unknown = set(formats) - set(TINY_MODEL_FORMATS)
    if unknown:
        raise ValueError(f"unknown tiny model formats: {sorted(unknown)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet, vae, text_encoder = build_tiny_models(v2=v2, seed=seed)
    stem = f"tiny_sd_v{2 if v2 else 1}"
    written: dict[str, Path] = {}
    if "diffusers" in formats:
        written["diffusers"] = save_diffusers_checkpoint(
            v2, out_dir / "diffusers", text_encoder, unet, vae, use_safetensors=True, v_parameterization=False
        )
    if "safetensors" in formats:
        written["safetensors"] = save_stable_diffusion_checkpoint(
            v2, out_dir / f"{stem}.safetensors", text_encoder, unet, vae
        )
    if "ckpt" in formats:
        written["ckpt"] = save_stable_diffusion_checkpoint(
            v2, out_dir / f"{stem}.ckpt", text_encoder, unet, vae, epoch=1, global_step=100
        )
    return written
