"""gen_img_diffusers.py with networks: a LoRA from train_network.py changes the image; multiplier 0,
--network_merge and --network_pre_calc give the expected images; wrong files are one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gen_helpers import generate_pixels, one_line_error
from lora_helpers import randomize_up
from train_helpers import base_argv, make_image_folder, run_train

# merged / pre-computed weights are W + ΔW rounded once, hooked ones add up(down(x)) per call:
# fp32 differences far below one 8-bit level; allow one level for rounding at the boundary
MERGE_TOLERANCE = 1


generate = generate_pixels


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, tiny_model_files_v1) -> Path:
    root = tmp_path_factory.mktemp("gen_lora")
    images = make_image_folder(root, count=2, repeats=2)
    run_train(base_argv(tiny_model_files_v1["safetensors"], images, root / "out", "--learning_rate", "1e-2"))
    return root / "out" / "lora.safetensors"


@pytest.fixture(scope="module")
def strong_lora(tmp_path_factory, tiny_models_v1) -> Path:
    """A LoRA-C3Lier with random up weights (visible effect on U-Net and text encoder)."""
    import torch

    from networks import lora

    unet, vae, text_encoder = tiny_models_v1
    torch.manual_seed(0)
    network = lora.create_network(1.0, 4, 4, vae, text_encoder, unet, conv_dim=2, conv_alpha=2)
    randomize_up(network, std=0.3)
    path = tmp_path_factory.mktemp("strong_lora") / "strong.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


def lora_flags(path: Path, *extra: str) -> list[str]:
    return ["--network_module", "networks.lora", "--network_weights", str(path), *extra]


def test_trained_lora_changes_the_image_and_mul_0_is_base(tmp_path, tiny_model_files_v1, trained_lora):
    model = tiny_model_files_v1["safetensors"]
    base = generate(model, tmp_path / "base")
    with_lora = generate(model, tmp_path / "lora", *lora_flags(trained_lora))
    assert np.abs(with_lora - base).max() > 0
    assert np.array_equal(generate(model, tmp_path / "mul0", *lora_flags(trained_lora, "--network_mul", "0")), base)
    # per-prompt multiplier --am 0 turns the network off for that prompt only
    assert np.array_equal(generate(model, tmp_path / "am0", *lora_flags(trained_lora), prompt="a cat --am 0"), base)


def test_merge_and_pre_calc_equal_unmerged(tmp_path, tiny_model_files_v1, strong_lora):
    model = tiny_model_files_v1["safetensors"]
    base = generate(model, tmp_path / "base")
    hooked = generate(model, tmp_path / "hooked", *lora_flags(strong_lora, "--network_mul", "0.7"))
    merged = generate(model, tmp_path / "merged", *lora_flags(strong_lora, "--network_mul", "0.7", "--network_merge"))
    pre_calc = generate(model, tmp_path / "pre", *lora_flags(strong_lora, "--network_mul", "0.7", "--network_pre_calc"))
    assert np.abs(hooked - base).max() > 10  # the network matters
    assert np.abs(merged - hooked).max() <= MERGE_TOLERANCE
    assert np.abs(pre_calc - hooked).max() <= MERGE_TOLERANCE


def test_two_networks_and_show_meta(tmp_path, tiny_model_files_v1, trained_lora, strong_lora, capsys):
    model = tiny_model_files_v1["safetensors"]
    both = generate(
        model, tmp_path / "both", "--network_module", "networks.lora",
        "--network_weights", str(trained_lora), str(strong_lora), "--network_mul", "1", "0.5", "--network_show_meta",
    )
    out = capsys.readouterr().out
    assert f"metadata of {strong_lora}:" in out and "ss_network_dim: 4" in out
    only_first = generate(
        model, tmp_path / "first", "--network_module", "networks.lora",
        "--network_weights", str(trained_lora), str(strong_lora), "--network_mul", "1", "0.5", prompt="a cat --am 1,0",
    )
    single = generate(model, tmp_path / "single", *lora_flags(trained_lora))
    assert np.array_equal(only_first, single)
    assert np.abs(both - single).max() > 0


error_of = one_line_error


def test_wrong_networks_are_one_line_errors(tmp_path, capsys, tiny_model_files_v1, tiny_models_v2):
    from networks import lora

    unet, vae, text_encoder = tiny_models_v2
    v2_lora = tmp_path / "v2.safetensors"
    lora.create_network(1.0, 4, 4, vae, text_encoder, unet).save_weights(v2_lora, None, {})
    base = ["--ckpt", str(tiny_model_files_v1["safetensors"]), "--outdir", str(tmp_path / "o"), "--prompt", "a",
            "--W", "64", "--H", "64", "--steps", "2"]
    message = error_of(capsys, base + lora_flags(v2_lora))
    assert "v2.safetensors" in message and "different model" in message
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "corrupt.safetensors" in error_of(capsys, base + lora_flags(corrupt))
    assert "--network_module" in error_of(capsys, base + ["--network_weights", str(v2_lora)])
    assert "--network_mul" in error_of(
        capsys, base + lora_flags(v2_lora, "--network_mul", "1", "2", "3")
    )


def test_merge_and_pre_calc_write_into_the_weights_in_place(tiny_models_v1, strong_lora):
    """No second copy of a weight: merged / pre-computed layers keep their storage, hold exactly
    W + multiplier·ΔW rounded once, and pre-computed layers run their own forward again."""
    import copy

    import torch
    from safetensors.torch import load_file

    from library.gen_networks import pre_calculate
    from networks import lora

    unet, vae, text_encoder = tiny_models_v1
    weights_sd = load_file(strong_lora)

    def expected_weights(network):
        return {
            m.lora_name: m.org_module.weight.float() + 0.7 * lora.lora_delta_weight(
                weights_sd[f"{m.lora_name}.lora_down.weight"], weights_sd[f"{m.lora_name}.lora_up.weight"],
                weights_sd[f"{m.lora_name}.alpha"], m.org_module.weight.shape)
            for m in network.text_encoder_loras + network.unet_loras
        }

    for mode in ("merge", "pre_calc"):
        te, un = copy.deepcopy(text_encoder), copy.deepcopy(unet)
        network, _ = lora.create_network_from_weights(0.7, str(strong_lora), vae, te, un, for_inference=True)
        modules = network.text_encoder_loras + network.unet_loras
        expected = expected_weights(network)
        storage = {m.lora_name: m.org_module.weight.data_ptr() for m in modules}
        if mode == "merge":
            network.merge_to(te, un, weights_sd)
        else:
            network.apply_to(te, un)
            network.load_state_dict(weights_sd)
            pre_calculate(network, strong_lora)
        assert len(modules) > 50
        for m in modules:
            layer = m.org_module
            assert layer.weight.data_ptr() == storage[m.lora_name], (mode, m.lora_name)
            assert torch.equal(layer.weight, expected[m.lora_name]), (mode, m.lora_name)
            assert "forward" not in layer.__dict__, (mode, m.lora_name)
