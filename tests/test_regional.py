"""Regional LoRA / Attention Couple: masks from colour channels, each network only inside its mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import networks.lora as lora_module
from library.errors import UserError
from library.regional_prompts import (
    RegionMask,
    clear_regions,
    combine_noise_predictions,
    level_sizes,
    part_rows,
    region_masks,
    set_regions,
    split_prompt,
    text_encoder_for_part,
)

LATENT = (8, 8)


def test_split_prompt():
    assert split_prompt("a cat AND a dog AND sky") == ["a cat", "a dog", "sky"]
    assert split_prompt("cats and dogs") == ["cats and dogs"]


def test_region_masks_from_colour_channels(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32, 0] = 255  # red: left half -> part 1
    image[:, 32:, 1] = 255  # green: right half -> part 2; blue is black -> part 3 full
    path = tmp_path / "mask.png"
    Image.fromarray(image).save(path)
    masks = region_masks(path, 4, (8, 8))
    assert masks.shape == (4, 8, 8)
    assert torch.equal(masks[0][:, :4], torch.ones(8, 4)) and torch.equal(masks[0][:, 4:], torch.zeros(8, 4))
    assert torch.equal(masks[1], 1 - masks[0])
    assert torch.equal(masks[2], torch.ones(8, 8)) and torch.equal(masks[3], torch.ones(8, 8))
    with pytest.raises(UserError, match="cannot read image"):
        region_masks(tmp_path / "missing.png", 2, (8, 8))


def test_level_sizes_round_up():
    assert level_sizes((9, 6))[:4] == [(9, 6), (5, 3), (3, 2), (2, 1)]


def _random_network(unet, text_encoder, seed: int):
    torch.manual_seed(seed)
    network = lora_module.create_network(1.0, 4, 4, None, text_encoder, unet, conv_dim=4, conv_alpha=4)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.normal_(0.0, 0.3)
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    return network.eval()


@pytest.fixture()
def two_networks():
    from library.tiny_sd import build_tiny_models

    unet, _, text_encoder = build_tiny_models(seed=0)
    a = _random_network(unet, text_encoder, 1)
    b = _random_network(unet, text_encoder, 2)
    yield unet, text_encoder, a, b
    b.restore()
    a.restore()


def _halves():
    left = torch.zeros(LATENT)
    left[:, :4] = 1.0
    return torch.stack([left, 1 - left])


def test_region_mask_zero_outside_for_conv_and_attention_tokens():
    masks = _halves()
    region = RegionMask(masks[0])
    conv_out = torch.ones(2, 5, 4, 4)  # a level below the latent: mask resized to 4x4
    weighted = region("lora_unet_down_blocks_1_resnets_0_conv1", conv_out)
    assert torch.equal(weighted[:, :, :, 2:], torch.zeros(2, 5, 4, 2)) and torch.equal(weighted[:, :, :, :2], torch.ones(2, 5, 4, 2))
    tokens = torch.ones(2, 16, 7)  # attention at 4x4: token axis is h*w, row-major
    weighted = region("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", tokens)
    assert torch.equal(weighted.reshape(2, 4, 4, 7)[:, :, 2:], torch.zeros(2, 4, 2, 7))
    text = torch.ones(2, 77, 7)  # cross-attention key/value see text tokens: no spatial mask
    assert torch.equal(region("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", text), text)
    rows = RegionMask(None, torch.tensor([0.0, 1.0]))
    assert torch.equal(rows("x", text)[0], torch.zeros(77, 7)) and torch.equal(rows("x", text)[1], text[1])


def _eps(unet, latents, t, ehs):
    with torch.no_grad():
        return unet(latents, t, ehs).sample


def _part_embeddings(text_encoder, networks, ids):
    """Uncond without text-encoder LoRA, then sub-prompt i with network i's text encoder part."""
    parts = []
    with torch.no_grad():
        for i in range(ids.shape[0]):
            with text_encoder_for_part(networks, i - 1 if i else len(networks)):
                parts.append(text_encoder(ids[i : i + 1])[0])
    return torch.cat(parts)


def _couple_step(two_networks, tokenizer, masks, active, latents, t):
    """(uncond, coupled cond) noise predictions of one step: rows [uncond | "a red cat" | "a blue dog"],
    network i (multiplier `active[i]`) on part i's rows and inside mask i."""
    unet, text_encoder, a, b = two_networks
    for net, multiplier in zip((a, b), active):
        net.set_multiplier(multiplier)
    ids = tokenizer(["", "a red cat", "a blue dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ehs = _part_embeddings(text_encoder, [a, b], ids)
    set_regions([a, b], masks, [part_rows(i, 2, 1, leading_rows=1) for i in range(2)])
    eps = _eps(unet, latents.repeat(3, 1, 1, 1), t, ehs)
    clear_regions([a, b])
    return eps[:1], combine_noise_predictions(eps[1:], masks)


def test_attention_couple_each_network_changes_only_its_region(two_networks, tokenizer_v1):
    """One step's combined prediction: network i changes it exactly nowhere outside mask i."""
    masks = _halves()
    latents = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(0))

    def couple(active):
        return _couple_step(two_networks, tokenizer_v1, masks, active, latents, 400)[1]

    base, only_a, only_b, both = couple((0, 0)), couple((1, 0)), couple((0, 1)), couple((1, 1))
    inside_a = masks[0].bool()
    delta_a, delta_b = (only_a - base)[0], (only_b - base)[0]
    assert delta_a[:, inside_a].abs().mean() > 1e-2 and delta_b[:, ~inside_a].abs().mean() > 1e-2
    assert delta_a[:, ~inside_a].abs().max() == 0 and delta_b[:, inside_a].abs().max() == 0
    torch.testing.assert_close(both - base, delta_a[None] + delta_b[None], atol=1e-5, rtol=1e-4)


def test_regional_generation_latents_change_inside_mask(two_networks, tokenizer_v1):
    """2 DDIM steps with regional LoRA + attention couple: each network's effect on the final
    latents sits in its own half. The second step sees latents the first changed inside the
    mask, and the U-Net mixes positions, so a little spreads across the border (the one-step
    test above shows the per-step confinement is exact; the random tiny U-Net is chaotic
    enough that more steps blur the picture, real models much less)."""
    from library.samplers import get_sampler

    masks = _halves()

    def run(active):
        scheduler = get_sampler("ddim")
        scheduler.set_timesteps(2)
        latents = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(3))
        for t in scheduler.timesteps:
            uncond, cond = _couple_step(two_networks, tokenizer_v1, masks, active, latents, t)
            latents = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
        return latents[0]

    base = run((0, 0))
    inside_a = masks[0].bool()
    for active, inside in (((1, 0), inside_a), ((0, 1), ~inside_a)):
        delta = (run(active) - base).abs().mean(0)
        assert delta[inside].mean() > 1e-2
        assert delta[inside].mean() > 10 * delta[~inside].mean()


def test_clear_regions_restores_plain_lora(two_networks, tokenizer_v1):
    unet, text_encoder, a, b = two_networks
    ids = tokenizer_v1(["x"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ehs = text_encoder(ids)[0]
    latents = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(1))
    plain = _eps(unet, latents, 100, ehs)
    set_regions([a, b], _halves())
    assert (_eps(unet, latents, 100, ehs) - plain).abs().max() > 1e-3
    clear_regions([a, b])
    assert torch.equal(_eps(unet, latents, 100, ehs), plain)


def test_text_encoder_for_part(two_networks, tokenizer_v1):
    _, text_encoder, a, b = two_networks
    ids = tokenizer_v1(["x"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        both = text_encoder(ids)[0]
        with text_encoder_for_part([a, b], 0):
            only_a = text_encoder(ids)[0]
        b.set_multiplier(0.0)
        reference = text_encoder(ids)[0]
        b.set_multiplier(1.0)
        assert torch.equal(text_encoder(ids)[0], both)  # multipliers restored
    torch.testing.assert_close(only_a, reference, rtol=0, atol=0)
    assert (only_a - both).abs().max() > 1e-4


def test_combine_noise_predictions_weights():
    masks = torch.stack([torch.full(LATENT, 0.75), torch.full(LATENT, 0.25)])
    masks[:, 0, 0] = 0.0  # no mask covers this position: equal average
    preds = torch.cat([torch.full((2, 4, *LATENT), 4.0), torch.zeros(2, 4, *LATENT)])
    out = combine_noise_predictions(preds, masks)
    assert out.shape == (2, 4, *LATENT)
    assert torch.allclose(out[:, :, 1:, :], torch.tensor(3.0)) and torch.allclose(out[:, :, 0, 0], torch.tensor(2.0))


def test_set_regions_errors(two_networks):
    _, _, a, b = two_networks
    with pytest.raises(UserError, match="masks"):
        set_regions([a, b], _halves()[:1])
    with pytest.raises(UserError, match="set_region"):
        set_regions([object()], _halves())
