"""Noise and loss helpers of the diffusion training step (sd-scripts semantics).

Noise offset, adaptive noise offset, multires (pyramid) noise, input-perturbation noise, min/max
timesteps, min-SNR-gamma weighting, zero-terminal-SNR rescaling and the epsilon / v-prediction
target. All randomness is drawn from an explicit `torch.Generator`, never from the global RNG, so
that the training core can make a run reproducible across resume.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# sd-scripts keeps the last alpha_bar slightly above 0 after the zero-terminal-SNR rescale, so that
# SNR (and min-SNR weights) stay finite at t = 999
ZERO_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08


def _randn(shape: tuple, generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device in float32, then moved next to `like`."""
    device = generator.device if generator is not None else like.device
    sample = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return sample.to(device=like.device, dtype=like.dtype)


def _rand(generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(1, generator=generator, device=device, dtype=torch.float32).to(like.device)


def prepare_scheduler_for_custom_training(noise_scheduler: Any, device: Union[str, torch.device]) -> None:
    """Precompute `noise_scheduler.all_snr[t] = ᾱ_t / (1 - ᾱ_t)` for every train timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(torch.float64)
    all_snr = alphas_cumprod / (1.0 - alphas_cumprod)
    noise_scheduler.all_snr = all_snr.to(device=device, dtype=torch.float32)


def fix_noise_scheduler_betas_for_zero_terminal_snr(noise_scheduler: Any) -> None:
    """Rescale the betas to a zero terminal SNR (Lin et al. 2023), as `--zero_terminal_snr` does.

    Uses diffusers' rescale, then keeps the last ᾱ at a tiny positive value like sd-scripts.
    """
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    betas = rescale_zero_terminal_snr(noise_scheduler.betas.to(torch.float64))
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod[-1] = ZERO_TERMINAL_ALPHA_BAR
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    noise_scheduler.betas = (1.0 - alphas).to(torch.float32)
    noise_scheduler.alphas = alphas.to(torch.float32)
    noise_scheduler.alphas_cumprod = alphas_cumprod.to(torch.float32)
    if hasattr(noise_scheduler, "all_snr"):
        prepare_scheduler_for_custom_training(noise_scheduler, noise_scheduler.all_snr.device)


def apply_snr_weight(
    loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any, gamma: float, v_prediction: bool = False
) -> torch.Tensor:
    """Min-SNR-γ weighting of per-sample losses.

    epsilon: w = min(SNR, γ) / SNR; v-prediction: w = min(SNR, γ) / (SNR + 1).
    `prepare_scheduler_for_custom_training` must have been called.
    """
    if not hasattr(noise_scheduler, "all_snr"):
        prepare_scheduler_for_custom_training(noise_scheduler, loss.device)
    snr = noise_scheduler.all_snr.to(loss.device)[timesteps.to(loss.device).long()]
    min_snr_gamma = torch.clamp(snr, max=float(gamma))
    weight = min_snr_gamma / (snr + 1.0) if v_prediction else min_snr_gamma / snr
    return loss * weight.to(loss.dtype)


def apply_noise_offset(
    latents: torch.Tensor,
    noise: torch.Tensor,
    noise_offset: Optional[Union[float, torch.Tensor]],
    adaptive_noise_scale: Optional[float],
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """noise + offset · N(0, 1)[B, C, 1, 1]; with `adaptive_noise_scale` the offset grows by
    scale · |mean of each latent channel| (clamped at 0)."""
    if noise_offset is None:
        return noise
    offset: Union[float, torch.Tensor] = noise_offset
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, min=0.0)
    channel_noise = _randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents)
    return noise + offset * channel_noise


def pyramid_noise_like(
    noise: torch.Tensor,
    device: Union[str, torch.device],
    iterations: int = 6,
    discount: float = 0.4,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Multires noise: add upsampled noise of ever smaller resolutions, scaled by discount^i,
    and renormalise to unit std (input tensor is not modified)."""
    batch, channels, height, width = noise.shape
    result = noise.clone().to(device)
    for i in range(iterations):
        r = float(_rand(generator, result)) * 2 + 2  # random resolution ratio in [2, 4)
        small_h, small_w = max(1, int(height / (r**i))), max(1, int(width / (r**i)))
        coarse = _randn((batch, channels, small_h, small_w), generator, result)
        upsampled = F.interpolate(coarse.float(), size=(height, width), mode="bilinear").to(result.dtype)
        result = result + upsampled * discount**i
        if small_h == 1 or small_w == 1:
            break
    return result / result.std()


def get_target(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
    v_parameterization: bool,
) -> torch.Tensor:
    """The training target: the noise (epsilon) or the velocity (`--v_parameterization`)."""
    if v_parameterization:
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def get_timesteps_and_noisy_latents(
    args: argparse.Namespace, noise_scheduler: Any, latents: torch.Tensor, generator: Optional[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw noise and timesteps for a batch and noise the latents; returns (noise, noisy_latents, timesteps).

    Honours --noise_offset (+ --noise_offset_random_strength, --adaptive_noise_scale),
    --multires_noise_iterations / --multires_noise_discount, --min_timestep / --max_timestep and
    --ip_noise_gamma (+ --ip_noise_gamma_random_strength). `noise` is the target noise; the input
    perturbation only enters the noisy latents.
    """
    noise = _randn(tuple(latents.shape), generator, latents)
    noise_offset = getattr(args, "noise_offset", None)
    if noise_offset:
        if getattr(args, "noise_offset_random_strength", False):
            noise_offset = _rand(generator, latents) * noise_offset
        noise = apply_noise_offset(latents, noise, noise_offset, getattr(args, "adaptive_noise_scale", None), generator)
    if getattr(args, "multires_noise_iterations", None):
        noise = pyramid_noise_like(
            noise, latents.device, args.multires_noise_iterations, getattr(args, "multires_noise_discount", 0.3),
            generator,
        )

    batch_size = latents.shape[0]
    min_timestep = getattr(args, "min_timestep", None)
    max_timestep = getattr(args, "max_timestep", None)
    min_timestep = 0 if min_timestep is None else int(min_timestep)
    max_timestep = noise_scheduler.config.num_train_timesteps if max_timestep is None else int(max_timestep)
    draw_device = generator.device if generator is not None else latents.device
    timesteps = torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator, device=draw_device)
    timesteps = timesteps.long().to(latents.device)

    ip_noise_gamma = getattr(args, "ip_noise_gamma", None)
    if ip_noise_gamma:
        strength: Union[float, torch.Tensor] = ip_noise_gamma
        if getattr(args, "ip_noise_gamma_random_strength", False):
            strength = _rand(generator, latents) * ip_noise_gamma
        perturbed = noise + strength * _randn(tuple(latents.shape), generator, latents)
        noisy_latents = noise_scheduler.add_noise(latents, perturbed, timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    return noise, noisy_latents, timesteps


def compute_loss(
    args: argparse.Namespace,
    noise_scheduler: Any,
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    loss_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """sd-scripts' loss: per-sample MSE (float32) × loss_weights (prior_loss_weight), then min-SNR, then mean."""
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.dim())))
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    gamma = getattr(args, "min_snr_gamma", None)
    if gamma:
        loss = apply_snr_weight(loss, timesteps, noise_scheduler, gamma, bool(getattr(args, "v_parameterization", False)))
    return loss.mean()
