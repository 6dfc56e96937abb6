"""networks/svd_merge_lora.py: two LoRAs of different ranks merge into the best rank-r
approximation of their weighted sum (error at the Eckart–Young bound), conv modules at
--new_conv_rank, the output loads in diffusers, and bad input fails cleanly."""
from __future__ import annotations

import pytest
import torch

from library.lora_modules import read_lora
from lora_tool_helpers import assert_diffusers_matches, assert_modelspec, make_lora, run_script

SCRIPT = "networks/svd_merge_lora.py"


@pytest.fixture(scope="module")
def two_loras(tiny_models_v1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("svd_merge")
    a = make_lora(tiny_models_v1, folder / "a.safetensors", dim=4, alpha=2.0, conv_dim=2, seed=6)
    b = make_lora(tiny_models_v1, folder / "b.safetensors", dim=6, alpha=6.0, conv_dim=3, seed=7)
    return a, b


def test_within_the_rank_bound(tiny_models_v1, two_loras, tmp_path):
    out = tmp_path / "svd.safetensors"
    argv = ["--models", *two_loras, "--ratios", 0.8, 0.5, "--save_to", out, "--new_rank", 5, "--new_conv_rank", 3,
            "--clamp_quantile", 1.0]
    assert run_script(SCRIPT, argv) == 0
    a, b, merged = read_lora(two_loras[0]), read_lora(two_loras[1]), read_lora(out)
    assert set(merged.modules) == set(a.modules) | set(b.modules)
    for name, module in merged.modules.items():
        target = 0.8 * a.modules[name].delta2d() + 0.5 * b.modules[name].delta2d()
        s = torch.linalg.svdvals(target.double())
        rank = 3 if module.is_conv3x3 else 5
        assert module.rank == rank and module.alpha == rank
        bound = float((s[rank:] ** 2).sum()) ** 0.5  # the best any rank-r matrix can do
        error = float(torch.linalg.matrix_norm(module.delta2d().double() - target.double()))
        assert error <= bound * (1 + 1e-3) + 1e-7
        assert error < 0.9 * float(torch.linalg.matrix_norm(target))  # and it is a real approximation
    assert merged.metadata["ss_network_dim"] == "5"
    assert_modelspec(merged.metadata, "stable-diffusion-v1/lora", "svd", "a, b")
    assert_diffusers_matches(tiny_models_v1, out)


def test_default_clamp_stays_close(two_loras, tmp_path):
    out = tmp_path / "svd_clamped.safetensors"
    assert run_script(SCRIPT, ["--models", *two_loras, "--save_to", out, "--new_rank", 10, "--save_precision", "bf16"]) == 0
    a, b, merged = read_lora(two_loras[0]), read_lora(two_loras[1]), read_lora(out)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    target = a.modules[name].delta2d() + b.modules[name].delta2d()
    got = merged.modules[name]
    assert got.down.dtype == torch.bfloat16 and got.rank == 10  # ranks 4 + 6 = 10: exact up to clamp and bf16
    assert float(torch.linalg.matrix_norm(got.delta2d() - target)) < 0.1 * float(torch.linalg.matrix_norm(target))


def test_bad_inputs_fail_with_one_line(two_loras, tiny_model_files_v1, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    cases = [
        (["--models", *two_loras, "--ratios", 1, 2, 3, "--save_to", out], "--ratios has 3"),
        (["--models", *two_loras, "--save_to", out, "--new_rank", 33], "larger than module"),
        (["--models", two_loras[0], tiny_model_files_v1["safetensors"], "--save_to", out], "not a LoRA file"),
        (["--models", two_loras[0], "--save_to", two_loras[0]], "also an input"),
        (["--models", tmp_path / "none.safetensors", "--save_to", out], "not found"),
    ]
    for argv, message in cases:
        assert run_script(SCRIPT, argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    assert not out.exists()
