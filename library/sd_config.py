"""Model configs for SD 1.x / 2.x: inferred from LDM weights, full-size constants, scheduler.

Config inference reads only tensor *shapes* (a `{key: shape}` map), so it works on a
memory-mapped file without loading any weights. Nothing here assumes full-size numbers:
channel counts, depth and block layout all come from the weights, and the rules that the
weights cannot carry (head counts, activation) follow SD's own conventions:
v1 UNet 8 heads, v2 UNet channels // 64 heads per block, text encoder hidden // 64 heads.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from library.errors import UserError

Shapes = Mapping[str, Sequence[int]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_V1_PREFIX = "cond_stage_model.transformer."
TE_V2_PREFIX = "cond_stage_model.model."

VAE_SCALING_FACTOR = 0.18215
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
V1_PAD_TOKEN_ID = 49407
V2_PAD_TOKEN_ID = 0

# ---------------------------------------------------------------- full-size constants
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
}
# stabilityai/stable-diffusion-2-1 (768-v); the 512 base differs only in sample_size (64)
SD21_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": VAE_SCALING_FACTOR,
}
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": V1_PAD_TOKEN_ID,
}
# OpenCLIP ViT-H/14 text tower without its last block (SD2 uses the penultimate layer)
SD21_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    **SD15_TEXT_ENCODER_CONFIG,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "pad_token_id": V2_PAD_TOKEN_ID,
}

# ---------------------------------------------------------------- schedulers (SPEC 1.8)
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
# what training builds: DDPMScheduler(**DDPM_SCHEDULER_CONFIG)
DDPM_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
}


def diffusers_scheduler_config(v2: bool, v_parameterization: bool | None = None) -> tuple[str, dict[str, Any]]:
    """(class name, config) of the scheduler written into a Diffusers folder.

    Mirrors the reference repos sd-scripts copies from: PNDM for v1 (runwayml/stable-diffusion-v1-5),
    DDIM for v2 (stabilityai/stable-diffusion-2-1, v-prediction unless told otherwise).
    """
    common = {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "trained_betas": None,
    }
    if v_parameterization is None:
        v_parameterization = v2
    prediction_type = "v_prediction" if v_parameterization else "epsilon"
    if v2:
        return "DDIMScheduler", {**common, "prediction_type": prediction_type}
    return "PNDMScheduler", {**common, "skip_prk_steps": True, "prediction_type": prediction_type}


def model_index(scheduler_class: str) -> dict[str, Any]:
    """model_index.json of a StableDiffusionPipeline folder without safety checker."""
    import diffusers  # its version only: not paid by every script that infers configs

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_pipeline_support_files(
    folder: Path, v2: bool, v_parameterization: bool | None = None, tokenizer_cache_dir: str | Path | None = None
) -> None:
    """Write model_index.json, scheduler/ and tokenizer/ of a Diffusers folder (offline)."""
    import diffusers

    from library.tokenizer_util import load_tokenizer

    folder = Path(folder)
    scheduler_class, scheduler_config = diffusers_scheduler_config(v2, v_parameterization)
    scheduler_dir = folder / "scheduler"
    scheduler_dir.mkdir(parents=True, exist_ok=True)
    scheduler_json = {"_class_name": scheduler_class, "_diffusers_version": diffusers.__version__, **scheduler_config}
    (scheduler_dir / "scheduler_config.json").write_text(json.dumps(scheduler_json, indent=2), encoding="utf-8")
    load_tokenizer(v2, tokenizer_cache_dir).save_pretrained(str(folder / "tokenizer"))
    (folder / "model_index.json").write_text(json.dumps(model_index(scheduler_class), indent=2), encoding="utf-8")


# ---------------------------------------------------------------- inference from LDM shapes
def _indices(shapes: Shapes, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for key in shapes if (m := regex.match(key))}
    return sorted(found)


def _need(shapes: Shapes, key: str, what: str) -> Sequence[int]:
    if key not in shapes:
        raise UserError(f"not a Stable Diffusion {what}: key '{key}' is missing")
    return shapes[key]


def infer_unet_config(shapes: Shapes, v2: bool) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config from the shapes of an LDM UNet (`model.diffusion_model.`)."""
    p = UNET_PREFIX
    what = "UNet"
    input_ids = _indices(shapes, rf"{re.escape(p)}input_blocks\.(\d+)\.")
    op_ids = _indices(shapes, rf"{re.escape(p)}input_blocks\.(\d+)\.0\.op\.weight$")
    if not input_ids:
        raise UserError(f"not a Stable Diffusion UNet: no '{p}input_blocks.*' keys")
    num_levels = len(op_ids) + 1
    num_input_blocks = max(input_ids) + 1
    if num_input_blocks % num_levels != 0:
        raise UserError(f"unsupported UNet layout: {num_input_blocks} input blocks for {num_levels} levels")
    layers = num_input_blocks // num_levels - 1
    if layers < 1:
        raise UserError("unsupported UNet layout: no resnet per level")

    conv_in = _need(shapes, f"{p}input_blocks.0.0.weight", what)
    conv_out = _need(shapes, f"{p}out.2.weight", what)
    channels: list[int] = []
    down_types: list[str] = []
    cross_dim = None
    linear_proj = None
    depth = None
    for level in range(num_levels):
        first = (layers + 1) * level + 1
        channels.append(int(_need(shapes, f"{p}input_blocks.{first}.0.out_layers.3.weight", what)[0]))
        has_attn = f"{p}input_blocks.{first}.1.proj_in.weight" in shapes
        down_types.append("CrossAttnDownBlock2D" if has_attn else "DownBlock2D")
        if has_attn and cross_dim is None:
            attn = f"{p}input_blocks.{first}.1."
            cross_dim = int(shapes[f"{attn}transformer_blocks.0.attn2.to_k.weight"][1])
            linear_proj = len(shapes[f"{attn}proj_in.weight"]) == 2
            depth = len(_indices(shapes, rf"{re.escape(attn)}transformer_blocks\.(\d+)\."))
    up_types: list[str] = []
    for level in range(num_levels):
        first = (layers + 1) * level
        has_attn = f"{p}output_blocks.{first}.1.proj_in.weight" in shapes
        up_types.append("CrossAttnUpBlock2D" if has_attn else "UpBlock2D")
    if f"{p}middle_block.1.proj_in.weight" not in shapes or cross_dim is None:
        raise UserError("unsupported UNet layout: no cross-attention in the middle block")

    config: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": int(conv_in[1]),
        "out_channels": int(conv_out[0]),
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": [max(1, c // 64) for c in channels] if v2 else 8,
        "use_linear_projection": bool(linear_proj),
        "upcast_attention": False,
    }
    if depth and depth != 1:
        config["transformer_layers_per_block"] = depth
    time_dim = int(_need(shapes, f"{p}time_embed.0.weight", what)[0])
    if time_dim != channels[0] * 4:
        config["time_embedding_dim"] = time_dim
    return config


def infer_vae_config(shapes: Shapes, prefix: str = VAE_PREFIX) -> dict[str, Any]:
    """diffusers AutoencoderKL config from the shapes of an LDM VAE (keys below `prefix`)."""
    p = prefix
    what = "VAE"
    levels = _indices(shapes, rf"{re.escape(p)}encoder\.down\.(\d+)\.")
    if not levels:
        raise UserError(f"not a Stable Diffusion VAE: no '{p}encoder.down.*' keys")
    layers = len(_indices(shapes, rf"{re.escape(p)}encoder\.down\.0\.block\.(\d+)\."))
    channels = [int(_need(shapes, f"{p}encoder.down.{i}.block.0.conv2.weight", what)[0]) for i in levels]
    num_levels = len(levels)
    return {
        "in_channels": int(_need(shapes, f"{p}encoder.conv_in.weight", what)[1]),
        "out_channels": int(_need(shapes, f"{p}decoder.conv_out.weight", what)[0]),
        "down_block_types": ["DownEncoderBlock2D"] * num_levels,
        "up_block_types": ["UpDecoderBlock2D"] * num_levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": int(_need(shapes, f"{p}post_quant_conv.weight", what)[0]),
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": VAE_SCALING_FACTOR,
    }


def infer_text_encoder_config(shapes: Shapes, v2: bool) -> dict[str, Any]:
    """CLIPTextConfig kwargs from the shapes of an LDM text encoder (v1 HF CLIP or v2 OpenCLIP)."""
    what = "text encoder"
    if v2:
        p = TE_V2_PREFIX
        token = _need(shapes, f"{p}token_embedding.weight", what)
        positions = _need(shapes, f"{p}positional_embedding", what)
        blocks = _indices(shapes, rf"{re.escape(p)}transformer\.resblocks\.(\d+)\.")
        # SD2 conditions on the penultimate block: the HF model has one layer fewer
        num_layers = len(blocks) - 1
        intermediate = _need(shapes, f"{p}transformer.resblocks.0.mlp.c_fc.weight", what)[0]
    else:
        inner = f"{TE_V1_PREFIX}text_model."
        if f"{inner}embeddings.token_embedding.weight" not in shapes:  # old files lack `text_model.`
            inner = TE_V1_PREFIX
        token = _need(shapes, f"{inner}embeddings.token_embedding.weight", what)
        positions = _need(shapes, f"{inner}embeddings.position_embedding.weight", what)
        num_layers = len(_indices(shapes, rf"{re.escape(inner)}encoder\.layers\.(\d+)\."))
        intermediate = _need(shapes, f"{inner}encoder.layers.0.mlp.fc1.weight", what)[0]
    if num_layers < 1:
        raise UserError("not a Stable Diffusion text encoder: no transformer layers")
    hidden = int(token[1])
    return {
        "vocab_size": int(token[0]),
        "hidden_size": hidden,
        "intermediate_size": int(intermediate),
        "num_hidden_layers": num_layers,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": int(positions[0]),
        "hidden_act": "gelu" if v2 else "quick_gelu",
        "projection_dim": hidden,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": V2_PAD_TOKEN_ID if v2 else V1_PAD_TOKEN_ID,
    }


def is_v2_ldm(keys: Sequence[str] | Mapping[str, Any]) -> bool:
    """SD2 single files hold an OpenCLIP text encoder (`cond_stage_model.model.`)."""
    return any(k.startswith(TE_V2_PREFIX) for k in keys)
