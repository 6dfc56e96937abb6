"""library.slicing_vae: sliced decode / encode equal the plain diffusers VAE."""
from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.slicing_vae import decode_sliced, encode_sliced, row_bands, set_vae_slices


def test_row_bands_cover_rows_once():
    for height, n in [(8, 3), (7, 7), (4, 16), (64, 5)]:
        bands = row_bands(height, n)
        rows = [r for start, end in bands for r in range(start, end)]
        assert rows == list(range(height))
        assert len(bands) <= min(n, height)


@pytest.mark.parametrize("num_slices", [2, 5, 80])  # 80: one-row bands at every level
def test_decode_sliced_matches_plain_decode(tiny_models_v1, num_slices):
    _, vae, _ = tiny_models_v1
    # 10x6 latents -> 80x48 pixels: odd band sizes, a band per few rows at every level
    latents = torch.randn(2, 4, 10, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = vae.decode(latents).sample
    sliced = decode_sliced(vae, latents, num_slices)
    assert sliced.shape == plain.shape == (2, 3, 80, 48)
    assert plain.std() > 0.05
    torch.testing.assert_close(sliced, plain, atol=2e-5, rtol=1e-4)


def test_encode_sliced_matches_plain_encode(tiny_models_v1):
    _, vae, _ = tiny_models_v1
    images = torch.rand(1, 3, 56, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        plain = vae.encode(images).latent_dist
    sliced = encode_sliced(vae, images, 4)
    assert sliced.mean.shape == plain.mean.shape == (1, 4, 7, 5)
    torch.testing.assert_close(sliced.mean, plain.mean, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sliced.logvar, plain.logvar, atol=2e-5, rtol=1e-4)


def test_set_vae_slices_patches_only_this_instance(tiny_models_v1):
    from library.tiny_sd import build_tiny_models

    _, vae, _ = build_tiny_models(seed=0)
    _, reference, _ = tiny_models_v1
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert set_vae_slices(vae, 3) is vae
    assert "_decode" in vae.__dict__ and "_decode" not in reference.__dict__
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(latents).sample, reference.decode(latents).sample, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(
            vae.encode(images).latent_dist.mean, reference.encode(images).latent_dist.mean, atol=2e-5, rtol=1e-4
        )
    set_vae_slices(vae, 1)
    assert "_decode" not in vae.__dict__ and "_encode" not in vae.__dict__


def test_unsupported_layout_is_a_user_error():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=[32], layers_per_block=1, norm_num_groups=32, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"], mid_block_add_attention=False,
    ).eval()
    # replace a 'same' conv by a strided one: slicing cannot reproduce it and must say so
    vae.decoder.conv_out = torch.nn.Conv2d(32, 3, 3, stride=2, padding=1)
    with pytest.raises(UserError, match="--vae_slices"):
        decode_sliced(vae, torch.randn(1, 4, 8, 8), 2)
