"""networks/extract_lora_from_models.py: (base, base + a known low-rank difference) gives back
that difference, from single files and Diffusers folders (v1, v2); an unchanged text encoder
is left out; the output loads in diffusers; bad input fails cleanly."""
from __future__ import annotations

import copy

import pytest
import torch

from library.lora_modules import read_lora
from library.model_util import load_target_model, save_stable_diffusion_checkpoint
from lora_helpers import randomize_up
from lora_tool_helpers import assert_diffusers_matches, assert_modelspec, run_script
from networks import lora
from networks.lora_keys import find_unet_layers

SCRIPT = "networks/extract_lora_from_models.py"


def tuned_model(models_files, models, path, unet_only=False, seed=8):
    """Write base + ΔW of a rank-3 (3x3 convs rank 2) LoRA; returns (path, the LoRA state dict)."""
    loaded = load_target_model(models_files["safetensors"])
    torch.manual_seed(seed)
    network = lora.create_network(1.0, 3, 3.0, loaded.vae, copy.deepcopy(models[2]), copy.deepcopy(models[0]),
                                  conv_dim="2", conv_alpha="2")
    randomize_up(network, seed=seed, std=0.5)
    weights = network.state_dict()
    if unet_only:
        weights = {k: v for k, v in weights.items() if k.startswith("lora_unet")}
    merger, _ = lora.create_network_from_weights(1.0, None, loaded.vae, loaded.text_encoder, loaded.unet, weights_sd=weights)
    merger.merge_to(loaded.text_encoder, loaded.unet, weights)
    save_stable_diffusion_checkpoint(loaded.v2, path, loaded.text_encoder, loaded.unet, loaded.vae)
    return path, weights


def delta(weights, name):
    down, up = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"]
    return lora.lora_delta_weight(down, up, weights[f"{name}.alpha"], torch.Size([up.shape[0], down[0].numel()]))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_recovers_a_known_low_rank_difference(v2, tiny_models_v1, tiny_models_v2, tiny_model_files_v1, tiny_model_files_v2, tmp_path):
    models, files = (tiny_models_v2, tiny_model_files_v2) if v2 else (tiny_models_v1, tiny_model_files_v1)
    tuned, weights = tuned_model(files, models, tmp_path / "tuned.safetensors")
    out = tmp_path / "extracted.safetensors"
    # the original as a Diffusers folder, the tuned model as a single file: any loader format works
    argv = ["--model_org", files["diffusers"], "--model_tuned", tuned, "--save_to", out, "--dim", 3, "--conv_dim", 2,
            "--clamp_quantile", 1.0]
    assert run_script(SCRIPT, argv) == 0
    extracted = read_lora(out)
    want_names = {k.split(".")[0] for k in weights}
    assert set(extracted.modules) == want_names
    for name, module in extracted.modules.items():
        want = delta(weights, name)
        assert module.rank == (2 if module.is_conv3x3 else 3) and module.alpha == module.rank
        assert (module.delta2d() - want).abs().max() <= 2e-3 * want.abs().max(), name
    meta = extracted.metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "3"
    assert meta["ss_v2"] == str(v2) and '"conv_dim": "2"' in meta["ss_network_args"]
    assert_modelspec(meta, f"stable-diffusion-{'v2-512' if v2 else 'v1'}/lora", "extracted")
    assert meta["sshs_model_hash"]
    assert_diffusers_matches(models, out, v2)


def test_unchanged_text_encoder_is_left_out_and_lierla_only(tiny_models_v1, tiny_model_files_v1, tmp_path):
    tuned, weights = tuned_model(tiny_model_files_v1, tiny_models_v1, tmp_path / "tuned.ckpt", unet_only=True)
    out = tmp_path / "extracted.pt"
    argv = ["--model_org", tiny_model_files_v1["ckpt"], "--model_tuned", tuned, "--save_to", out, "--dim", 2,
            "--save_precision", "fp16"]
    assert run_script(SCRIPT, argv) == 0
    extracted = read_lora(out)
    assert not extracted.has_text_encoder
    assert not any(m.is_conv3x3 for m in extracted.modules.values())  # LierLa without --conv_dim
    assert set(extracted.modules) == {layer.lora_name for layer in find_unet_layers(tiny_models_v1[0], False)}
    assert all(m.rank == 2 and m.up.dtype == torch.float16 for m in extracted.modules.values())
    assert not any("resnets" in name for name in extracted.modules)


def test_bad_inputs_fail_with_one_line(tiny_model_files_v1, tiny_model_files_v2, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    v1, v2 = tiny_model_files_v1["safetensors"], tiny_model_files_v2["safetensors"]
    cases = [
        (["--model_org", v1, "--model_tuned", v2, "--save_to", out], "different model types"),
        (["--model_org", v1, "--model_tuned", v1, "--save_to", out, "--dim", 40], "--dim 40 is larger than layer"),
        (["--model_org", v1, "--model_tuned", tmp_path / "missing.safetensors", "--save_to", out], "not found"),
        (["--model_org", v1, "--model_tuned", v1, "--save_to", v1], "also an input"),
        (["--v2", "--model_org", v1, "--model_tuned", v1, "--save_to", out], "--v2 was given"),
    ]
    for argv, message in cases:
        assert run_script(SCRIPT, argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    assert not out.exists()
