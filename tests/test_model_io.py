"""Loading and saving SD models: tiny v1/v2 in every format, round trips, diffusers interop."""
from __future__ import annotations

import pytest
import torch

from library.model_util import load_target_model
from library.tiny_sd import build_tiny_models


def _same_weights(model_a: torch.nn.Module, model_b: torch.nn.Module) -> bool:
    a, b = model_a.state_dict(), model_b.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("kind", ["diffusers", "safetensors", "ckpt"])
def test_tiny_model_files_load_exactly(kind, v2, tiny_model_files_v1, tiny_model_files_v2):
    files = tiny_model_files_v2 if v2 else tiny_model_files_v1
    models = load_target_model(files[kind], v2=v2 or None)
    unet, vae, text_encoder = build_tiny_models(v2=v2, seed=0)
    assert models.v2 is v2
    assert models.is_ldm_file is (kind != "diffusers")
    assert _same_weights(models.unet, unet)
    assert _same_weights(models.vae, vae)
    assert _same_weights(models.text_encoder, text_encoder)
    assert not models.unet.training and not models.vae.training and not models.text_encoder.training
    assert models.unet.config.use_linear_projection is v2
    if kind == "ckpt":
        assert models.ldm_metadata == {"epoch": 1, "global_step": 100}
    assert models.tokenizer.pad_token_id == (0 if v2 else 49407)
