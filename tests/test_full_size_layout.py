"""Full-size SD1.5 / SD2.1 architectures (built on the meta device, no weights) convert to
exactly the published LDM key names and shapes, and back, and the configs inferred from
those shapes are the real ones.

Expected key counts, derived from the published layout:
  UNet (same for v1 and v2): 686 tensors (diffusers UNet2DConditionModel with the SD config).
  VAE: 248 tensors.
  Text encoder v1 (HF CLIP ViT-L/14 text model, 12 layers): 2 embeddings + 12 x 16 + 2 final norm = 196,
      + `position_ids` in the real files = 197.
  Text encoder v2 (OpenCLIP ViT-H/14 text tower): token + positional embedding 2, 24 resblocks x 12,
      ln_final 2, text_projection, logit_scale = 294.
  SD1.5 single file: 686 + 248 + 197 = 1131 model tensors; with the 12 DDPM schedule buffers
      (betas, alphas_cumprod, ..., posterior_mean_coef2) that is the 1143 keys of v1-5-pruned-emaonly.
      We write 1130 (no position_ids, no DDPM buffers) when there is no source checkpoint.
  SD2.1 single file: 686 + 248 + 294 = 1228 model tensors (+12 DDPM buffers in the released files).
"""
from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from library import sd_config, sd_keys

DDPM_BUFFERS = 12


def _meta_models(v2: bool):
    unet_config = sd_config.SD21_UNET_CONFIG if v2 else sd_config.SD15_UNET_CONFIG
    te_config = sd_config.SD21_TEXT_ENCODER_CONFIG if v2 else sd_config.SD15_TEXT_ENCODER_CONFIG
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(sd_config.SD_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
    return unet, vae, text_encoder


def _to_ldm(v2: bool, unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    unet_sd, vae_sd, te_sd = unet.state_dict(), vae.state_dict(), text_encoder.state_dict()
    ldm = sd_keys.model_to_ldm(sd_keys.unet_links(unet_sd, unet.config), unet_sd, v2)
    ldm.update(sd_keys.model_to_ldm(sd_keys.vae_links(vae_sd, 4), vae_sd, v2))
    ldm.update(sd_keys.model_to_ldm(sd_keys.text_encoder_links(te_sd, v2), te_sd, v2))
    if v2:
        sd_keys.fabricate_openclip_extras(ldm, text_encoder.config.num_hidden_layers)
    return ldm


@pytest.fixture(scope="module")
def sd15():
    models = _meta_models(False)
    return models, _to_ldm(False, *models)


@pytest.fixture(scope="module")
def sd21():
    models = _meta_models(True)
    return models, _to_ldm(True, *models)


def _count(ldm, prefix):
    return sum(1 for k in ldm if k.startswith(prefix))


def test_sd15_key_counts(sd15):
    _, ldm = sd15
    assert _count(ldm, "model.diffusion_model.") == 686
    assert _count(ldm, "first_stage_model.") == 248
    assert _count(ldm, "cond_stage_model.transformer.text_model.") == 196
    assert len(ldm) == 1130
    # + position_ids + DDPM buffers = the published v1-5-pruned-emaonly key count
    assert len(ldm) + 1 + DDPM_BUFFERS == 1143


def test_sd21_key_counts(sd21):
    _, ldm = sd21
    assert _count(ldm, "model.diffusion_model.") == 686
    assert _count(ldm, "first_stage_model.") == 248
    assert _count(ldm, "cond_stage_model.model.") == 294
    assert _count(ldm, "cond_stage_model.model.transformer.resblocks.") == 24 * 12
    assert len(ldm) == 1228


SD15_SAMPLES = {
    "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
    "model.diffusion_model.time_embed.0.weight": [1280, 320],
    "model.diffusion_model.time_embed.2.weight": [1280, 1280],
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": [320, 320, 3, 3],
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": [320, 1280],
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": [320, 320, 1, 1],
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": [2560, 320],
    "model.diffusion_model.input_blocks.3.0.op.weight": [320, 320, 3, 3],
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": [640, 320, 1, 1],
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": [1280, 1280, 3, 3],
    "model.diffusion_model.middle_block.1.proj_out.weight": [1280, 1280, 1, 1],
    "model.diffusion_model.middle_block.2.in_layers.0.weight": [1280],
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": [1280, 2560, 1, 1],
    "model.diffusion_model.output_blocks.2.1.conv.weight": [1280, 1280, 3, 3],
    "model.diffusion_model.output_blocks.5.2.conv.weight": [1280, 1280, 3, 3],
    "model.diffusion_model.output_blocks.8.2.conv.weight": [640, 640, 3, 3],
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight": [320, 320],
    "model.diffusion_model.out.0.weight": [320],
    "model.diffusion_model.out.2.weight": [4, 320, 3, 3],
    "first_stage_model.encoder.conv_in.weight": [128, 3, 3, 3],
    "first_stage_model.encoder.down.0.downsample.conv.weight": [128, 128, 3, 3],
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": [256, 128, 1, 1],
    "first_stage_model.encoder.mid.attn_1.q.weight": [512, 512, 1, 1],
    "first_stage_model.encoder.mid.attn_1.norm.weight": [512],
    "first_stage_model.encoder.norm_out.weight": [512],
    "first_stage_model.encoder.conv_out.weight": [8, 512, 3, 3],
    "first_stage_model.quant_conv.weight": [8, 8, 1, 1],
    "first_stage_model.post_quant_conv.weight": [4, 4, 1, 1],
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": [512, 512, 1, 1],
    "first_stage_model.decoder.mid.block_2.conv2.weight": [512, 512, 3, 3],
    "first_stage_model.decoder.up.3.upsample.conv.weight": [512, 512, 3, 3],
    "first_stage_model.decoder.up.3.block.2.conv1.weight": [512, 512, 3, 3],
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": [256, 512, 1, 1],
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": [128, 256, 1, 1],
    "first_stage_model.decoder.conv_out.weight": [3, 128, 3, 3],
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": [77, 768],
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": [768, 768],
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": [3072, 768],
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768],
}

SD21_SAMPLES = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": [320, 320],
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024],
    "model.diffusion_model.middle_block.1.proj_out.weight": [1280, 1280],
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": [320, 320],
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": [128, 256, 1, 1],
    "cond_stage_model.model.token_embedding.weight": [49408, 1024],
    "cond_stage_model.model.positional_embedding": [77, 1024],
    "cond_stage_model.model.transformer.resblocks.0.ln_1.weight": [1024],
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": [3072, 1024],
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": [3072],
    "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight": [1024, 1024],
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": [4096, 1024],
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.weight": [1024, 4096],
    "cond_stage_model.model.transformer.resblocks.23.ln_2.bias": [1024],
    "cond_stage_model.model.ln_final.weight": [1024],
    "cond_stage_model.model.text_projection": [1024, 1024],
    "cond_stage_model.model.logit_scale": [],
}


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_sample_names_and_shapes(which, request):
    _, ldm = request.getfixturevalue(which)
    samples = SD21_SAMPLES if which == "sd21" else SD15_SAMPLES
    for key, shape in samples.items():
        assert key in ldm, key
        assert list(ldm[key].shape) == shape, key
    if which == "sd21":
        assert not any(k.startswith("cond_stage_model.transformer.") for k in ldm)
        assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in ldm


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_inferred_configs_are_the_real_ones(which, request):
    (unet, vae, text_encoder), ldm = request.getfixturevalue(which)
    v2 = which == "sd21"
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert sd_config.is_v2_ldm(shapes) is v2
    unet_config = sd_config.infer_unet_config(shapes, v2)
    expected = sd_config.SD21_UNET_CONFIG if v2 else sd_config.SD15_UNET_CONFIG
    ignore = {"sample_size", "upcast_attention"}  # not stored in weights
    assert {k: v for k, v in unet_config.items() if k not in ignore} == {
        k: v for k, v in expected.items() if k not in ignore
    }
    vae_config = sd_config.infer_vae_config(shapes)
    assert vae_config == sd_config.SD_VAE_CONFIG
    te_config = sd_config.infer_text_encoder_config(shapes, v2)
    expected_te = sd_config.SD21_TEXT_ENCODER_CONFIG if v2 else sd_config.SD15_TEXT_ENCODER_CONFIG
    assert {k: v for k, v in te_config.items() if k != "projection_dim"} == {
        k: v for k, v in expected_te.items() if k != "projection_dim"
    }


@pytest.mark.parametrize("which", ["sd15", "sd21"])
def test_back_to_diffusers_names_and_shapes(which, request):
    (unet, vae, text_encoder), ldm = request.getfixturevalue(which)
    v2 = which == "sd21"
    for model, links in (
        (unet, sd_keys.unet_links(unet.state_dict(), unet.config)),
        (vae, sd_keys.vae_links(vae.state_dict(), 4)),
        (text_encoder, sd_keys.text_encoder_links(text_encoder.state_dict(), v2)),
    ):
        target = {k: v.shape for k, v in model.state_dict().items()}
        back = sd_keys.ldm_to_model(links, ldm.__getitem__, target, "meta")
        assert set(back) == set(target)
        assert all(back[k].shape == target[k] for k in target)
    # every LDM key is used by exactly the links (nothing orphaned except v2's unused extras)
    used = {link.ldm_key for link in sd_keys.unet_links(unet.state_dict(), unet.config)}
    used |= {link.ldm_key for link in sd_keys.vae_links(vae.state_dict(), 4)}
    used |= {link.ldm_key for link in sd_keys.text_encoder_links(text_encoder.state_dict(), v2)}
    unused = set(ldm) - used
    if v2:
        assert all(k.startswith("cond_stage_model.model.transformer.resblocks.23.") for k in unused - {
            "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"})
        assert len(unused) == 12 + 2
    else:
        assert unused == set()
