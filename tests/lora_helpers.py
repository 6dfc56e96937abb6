"""Shared helpers for the LoRA / DyLoRA tests: fixed model inputs and non-zero LoRA weights."""
from __future__ import annotations

import torch

# "a photo of a cat" as SD v1 token ids, padded with EOS to 10 positions
TOKEN_IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 3])


def unet_inputs(unet: torch.nn.Module, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, timesteps, context) for one 8x8 latent at timestep 600, drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 5, unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor([600]), context


def unet_output(unet: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs(unet, seed)).sample


def te_output(text_encoder: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(TOKEN_IDS)[0]


def randomize_up(network: torch.nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Give every `lora_up` weight random values (they start at zero, which would hide a wrong layout)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def tiny_pipeline(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, v2: bool):
    """A diffusers StableDiffusionPipeline of (copies of) the given models, no safety checker."""
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from library.tokenizer_util import load_tokenizer

    return StableDiffusionPipeline(
        vae=copy.deepcopy(vae),
        text_encoder=copy.deepcopy(text_encoder),
        tokenizer=load_tokenizer(v2),
        unet=copy.deepcopy(unet),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
