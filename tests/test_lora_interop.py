"""Our LoRA files load in diffusers (`pipe.load_lora_weights`, kohya converter + peft) with
the same effect as our own network: proves the key names and alpha semantics that
A1111 / ComfyUI / diffusers expect."""
from __future__ import annotations

import copy

import pytest
import torch

from lora_helpers import randomize_up, te_output, tiny_pipeline, unet_output
from networks import lora


def assert_rel_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_diffusers_load_lora_weights_matches_our_network(tiny_models_v1, tiny_models_v2, tmp_path, v2):
    unet, vae, text_encoder = tiny_models_v2 if v2 else tiny_models_v1
    # C3Lier covers every LierLa module plus 3x3 convs (conv_alpha != network_alpha), time_emb_proj, conv_shortcut
    network_args = {"conv_dim": "3", "conv_alpha": "1.5"}
    our_unet, our_te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    torch.manual_seed(0)  # the down weights' init draws from the global RNG: keep the test independent of order
    network = lora.create_network(1.0, 4, 2.0, vae, our_te, our_unet, **network_args)
    randomize_up(network, seed=0)
    path = tmp_path / "interop.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora"})
    network.apply_to(our_te, our_unet)

    pipe = tiny_pipeline(unet, vae, text_encoder, v2)
    pipe.load_lora_weights(str(path), adapter_name="ours")

    base_u, base_t = unet_output(unet), te_output(text_encoder)
    diff_u, diff_t = unet_output(pipe.unet), te_output(pipe.text_encoder)
    assert (diff_u - base_u).abs().max() > 1e-2  # the LoRA does something
    assert (diff_t - base_t).abs().max() > 1e-2
    assert_rel_close(diff_u, unet_output(our_unet))
    assert_rel_close(diff_t, te_output(our_te))

    # same multiplier semantics: diffusers adapter weight == our multiplier
    pipe.set_adapters(["ours"], adapter_weights=[0.5])
    network.set_multiplier(0.5)
    assert_rel_close(unet_output(pipe.unet), unet_output(our_unet))
    assert_rel_close(te_output(pipe.text_encoder), te_output(our_te))
