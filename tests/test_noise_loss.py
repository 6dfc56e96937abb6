"""Noise offset / adaptive / multires / input perturbation, timesteps, min-SNR weights, v-prediction target."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from library import custom_train_functions as ctf


def make_scheduler() -> DDPMScheduler:
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )
    ctf.prepare_scheduler_for_custom_training(scheduler, "cpu")
    return scheduler


def hand_alphas_cumprod() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def noise_args(**overrides) -> argparse.Namespace:
    values = dict(
        noise_offset=None, noise_offset_random_strength=False, adaptive_noise_scale=None,
        multires_noise_iterations=None, multires_noise_discount=0.3, ip_noise_gamma=None,
        ip_noise_gamma_random_strength=False, min_timestep=None, max_timestep=None,
        min_snr_gamma=None, v_parameterization=False,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_all_snr_matches_hand_computed():
    scheduler = make_scheduler()
    alpha_bar = hand_alphas_cumprod()
    snr = alpha_bar / (1 - alpha_bar)
    assert scheduler.all_snr[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)  # = 1175.47 (float32 ᾱ)
    for t in (0, 1, 250, 500, 999):
        assert scheduler.all_snr[t].item() == pytest.approx(snr[t], rel=1e-4)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_weights_against_hand_values(v_prediction):
    scheduler = make_scheduler()
    alpha_bar = hand_alphas_cumprod()
    timesteps = torch.tensor([0, 100, 300, 600, 999])
    gamma = 5.0
    weighted = ctf.apply_snr_weight(torch.ones(5), timesteps, scheduler, gamma, v_prediction)
    for value, t in zip(weighted.tolist(), timesteps.tolist()):
        snr = alpha_bar[t] / (1 - alpha_bar[t])
        expected = min(snr, gamma) / (snr + 1 if v_prediction else snr)
        assert value == pytest.approx(expected, rel=1e-4), t
    if not v_prediction:
        assert weighted[0].item() == pytest.approx(5.0 / 1175.4706, rel=1e-4)
        assert weighted[-1].item() == pytest.approx(1.0)  # SNR < gamma -> weight 1
    else:
        assert weighted[0].item() == pytest.approx(5.0 / 1176.4706, rel=1e-4)
    # the loss values are scaled, not replaced
    loss = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0])
    assert torch.allclose(ctf.apply_snr_weight(loss, timesteps, scheduler, gamma, v_prediction), loss * weighted)


def test_v_prediction_target_equals_get_velocity():
    scheduler = make_scheduler()
    latents = torch.randn(3, 4, 8, 8, generator=gen(0))
    noise = torch.randn(3, 4, 8, 8, generator=gen(1))
    timesteps = torch.tensor([10, 500, 990])
    target = ctf.get_target(scheduler, latents, noise, timesteps, v_parameterization=True)
    assert torch.allclose(target, scheduler.get_velocity(latents, noise, timesteps))
    alpha_bar = torch.tensor(hand_alphas_cumprod(), dtype=torch.float32)[timesteps].view(3, 1, 1, 1)
    assert torch.allclose(target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents, atol=1e-5)
    assert ctf.get_target(scheduler, latents, noise, timesteps, v_parameterization=False) is noise


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.randn(512, 4, 8, 8, generator=gen(0))
    noise = torch.randn(512, 4, 8, 8, generator=gen(1))
    shifted = ctf.apply_noise_offset(latents, noise, 0.1, None, gen(2))
    assert shifted.shape == noise.shape
    delta = shifted - noise
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-6)  # constant over H, W
    expected = 0.1 * torch.randn(512, 4, 1, 1, generator=gen(2))  # same draw from the same generator
    assert torch.allclose(delta[:, :, :1, :1], expected, atol=1e-6)
    assert delta[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.1)
    assert ctf.apply_noise_offset(latents, noise, None, None, gen(2)) is noise


def test_adaptive_noise_offset_scales_with_latent_mean():
    latents = torch.randn(2, 4, 8, 8, generator=gen(0)) + torch.tensor([3.0, -1.0, 0.0, 0.5]).view(1, 4, 1, 1)
    noise = torch.zeros(2, 4, 8, 8)
    out = ctf.apply_noise_offset(latents, noise, 0.1, 0.05, gen(3))
    offset = 0.1 + 0.05 * latents.mean(dim=(2, 3), keepdim=True).abs()
    assert torch.allclose(out, (offset * torch.randn(2, 4, 1, 1, generator=gen(3))).expand_as(out), atol=1e-6)
    # a negative total offset is clamped to 0
    clamped = ctf.apply_noise_offset(latents, noise, -10.0, 0.05, gen(3))
    assert torch.count_nonzero(clamped) == 0


def test_pyramid_noise_statistics_and_purity():
    noise = torch.randn(4, 4, 64, 64, generator=gen(0))
    original = noise.clone()
    pyramid = ctf.pyramid_noise_like(noise, "cpu", iterations=6, discount=0.8, generator=gen(5))
    assert pyramid.shape == noise.shape and torch.equal(noise, original)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)

    def neighbour_correlation(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert abs(neighbour_correlation(noise)) < 0.05  # white noise
    assert neighbour_correlation(pyramid) > 0.2  # low-frequency components added (about 0.3)
    again = ctf.pyramid_noise_like(noise, "cpu", iterations=6, discount=0.8, generator=gen(5))
    assert torch.equal(pyramid, again)


def test_timesteps_and_noisy_latents_reproducible_and_no_global_rng():
    scheduler = make_scheduler()
    latents = torch.randn(4, 4, 8, 8, generator=gen(0))
    args = noise_args(noise_offset=0.1, adaptive_noise_scale=0.01, ip_noise_gamma=0.1, min_timestep=100,
                      max_timestep=200, noise_offset_random_strength=True, ip_noise_gamma_random_strength=True)
    rng_state = torch.get_rng_state()
    first = ctf.get_timesteps_and_noisy_latents(args, scheduler, latents, gen(7))
    second = ctf.get_timesteps_and_noisy_latents(args, scheduler, latents, gen(7))
    third = ctf.get_timesteps_and_noisy_latents(args, scheduler, latents, gen(8))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], third[0])
    noise, noisy, timesteps = first
    assert noise.shape == noisy.shape == latents.shape and timesteps.dtype == torch.long
    assert ((timesteps >= 100) & (timesteps < 200)).all()
    # the input perturbation only enters the noisy latents, not the target noise
    assert not torch.allclose(noisy, scheduler.add_noise(latents, noise, timesteps))


def test_plain_noise_path_matches_add_noise_and_default_range():
    scheduler = make_scheduler()
    latents = torch.randn(4096, 1, 1, 1, generator=gen(0))
    noise, noisy, timesteps = ctf.get_timesteps_and_noisy_latents(noise_args(), scheduler, latents, gen(3))
    assert torch.equal(noise, torch.randn(4096, 1, 1, 1, generator=gen(3)))  # first draw is the noise
    assert torch.allclose(noisy, scheduler.add_noise(latents, noise, timesteps))
    assert timesteps.min().item() >= 0 and timesteps.max().item() <= 999
    assert timesteps.max().item() > 990 and timesteps.min().item() < 10  # U{0..999}
    multires = noise_args(multires_noise_iterations=4, multires_noise_discount=0.3)
    small = torch.randn(2, 4, 16, 16, generator=gen(1))
    noise, _, _ = ctf.get_timesteps_and_noisy_latents(multires, scheduler, small, gen(3))
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)


def test_zero_terminal_snr_rescale():
    scheduler = make_scheduler()
    first_alpha_bar = scheduler.alphas_cumprod[0].item()
    ctf.fix_noise_scheduler_betas_for_zero_terminal_snr(scheduler)
    alpha_bar = scheduler.alphas_cumprod
    assert alpha_bar[-1].item() == pytest.approx(ctf.ZERO_TERMINAL_ALPHA_BAR, rel=1e-5)
    assert alpha_bar[0].item() == pytest.approx(first_alpha_bar, rel=1e-5)
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1])
    assert torch.allclose(torch.cumprod(1 - scheduler.betas.double(), 0).float(), alpha_bar, rtol=1e-4)
    assert torch.isfinite(scheduler.all_snr).all() and scheduler.all_snr[-1].item() < 1e-7  # refreshed
    weights = ctf.apply_snr_weight(torch.ones(1), torch.tensor([999]), scheduler, 5.0, v_prediction=True)
    assert torch.isfinite(weights).all()


def test_compute_loss():
    scheduler = make_scheduler()
    target = torch.randn(2, 4, 8, 8, generator=gen(0))
    prediction = torch.zeros_like(target)
    timesteps = torch.tensor([0, 999])
    per_sample = (target**2).mean(dim=(1, 2, 3))
    assert ctf.compute_loss(noise_args(), scheduler, prediction, target, timesteps).item() == \
        pytest.approx(per_sample.mean().item(), rel=1e-6)
    weights = torch.tensor([1.0, 0.5])
    assert ctf.compute_loss(noise_args(), scheduler, prediction, target, timesteps, weights).item() == \
        pytest.approx((per_sample * weights).mean().item(), rel=1e-6)
    snr_loss = ctf.compute_loss(noise_args(min_snr_gamma=5.0), scheduler, prediction, target, timesteps)
    expected = ctf.apply_snr_weight(per_sample, timesteps, scheduler, 5.0).mean()
    assert snr_loss.item() == pytest.approx(expected.item(), rel=1e-6)
