"""networks/resize_lora.py: per module the best rank-r approximation (= a direct SVD of ΔW),
dynamic ranks keep the stated fraction, metadata and hashes, diffusers loads the output,
and bad input fails with one line and no output."""
from __future__ import annotations

import json

import pytest
import torch

from library import lora_svd
from library.lora_modules import read_lora
from library.model_hash import addnet_hash_safetensors
from lora_tool_helpers import assert_diffusers_matches, assert_modelspec, make_lora, run_script

SCRIPT = "networks/resize_lora.py"


@pytest.fixture(scope="module")
def c3lier_file(tiny_models_v1, tmp_path_factory):
    """A rank-6 LoRA with rank-4 3x3 conv modules and a training comment."""
    path = tmp_path_factory.mktemp("resize") / "c3lier.safetensors"
    return make_lora(tiny_models_v1, path, dim=6, alpha=3.0, conv_dim=4, conv_alpha=2.0,
                     metadata={"ss_training_comment": "my comment", "modelspec.author": "someone", "modelspec.title": "old title",
                               "ss_v2": "False", "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2.0"})})


def best_rank_r(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_fixed_rank_equals_direct_svd_and_metadata(c3lier_file, tmp_path, capsys):
    out = tmp_path / "r3.safetensors"
    assert run_script(SCRIPT, ["--model", c3lier_file, "--save_to", out, "--new_rank", 3, "--new_conv_rank", 2, "--verbose"]) == 0
    before, after = read_lora(c3lier_file), read_lora(out)
    assert list(after.modules) == list(before.modules)
    assert any(m.is_conv3x3 for m in after.modules.values())
    for name, old in before.modules.items():
        new = after.modules[name]
        rank = 2 if old.is_conv3x3 else 3
        assert new.rank == rank and new.down.shape[1:] == old.down.shape[1:] and new.up.shape[0] == old.up.shape[0]
        assert new.alpha == pytest.approx(old.scale * rank)  # the scale is kept
        want = best_rank_r(old.delta2d(), rank)
        assert (new.delta2d().double() - want).abs().max() <= 1e-4 * want.abs().max()

    meta = after.metadata
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"  # 3.0/6 · 3
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}  # 2.0/4 · 2
    assert meta["ss_training_comment"] == "dimension is resized from 6 to 3; my comment"
    assert_modelspec(meta, "stable-diffusion-v1/lora", "r3")
    assert meta["modelspec.author"] == "someone"  # descriptive keys of the one input are kept
    with open(out, "rb") as stream:
        assert meta["sshs_model_hash"] == addnet_hash_safetensors(stream)
    assert meta["sshs_model_hash"] != read_lora(c3lier_file).metadata["sshs_model_hash"]
    printed = capsys.readouterr().out.splitlines()
    module_lines = [line for line in printed if line.startswith("lora_") and "Frobenius norm kept" in line]
    assert len(module_lines) == len(before.modules)
    assert "rank 6 -> 3" in module_lines[0] or "rank 4 -> 2" in module_lines[0]


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_ratio", 3.0)])
def test_dynamic_methods_keep_the_stated_fraction(c3lier_file, tmp_path, method, param):
    out = tmp_path / f"{method}.safetensors"
    assert run_script(SCRIPT, ["--model", c3lier_file, "--save_to", out, "--new_rank", 6,
                               "--dynamic_method", method, "--dynamic_param", param]) == 0
    before, after = read_lora(c3lier_file), read_lora(out)
    assert after.metadata["ss_network_dim"] == "Dynamic"
    ranks = set()
    for name, old in before.modules.items():
        s = torch.linalg.svdvals(old.delta2d().double())[: old.rank]
        rank = after.modules[name].rank
        ranks.add(rank)
        if method == "sv_fro":
            kept = lambda r: float((s[:r] ** 2).sum() / (s**2).sum()) ** 0.5  # noqa: E731
            assert kept(rank) >= param - 1e-6 and (rank == 1 or kept(rank - 1) < param)
        elif method == "sv_cumulative":
            kept = lambda r: float(s[:r].sum() / s.sum())  # noqa: E731
            assert kept(rank) >= param - 1e-6 and (rank == 1 or kept(rank - 1) < param)
        else:
            assert rank == max(1, int((s > s[0] / param).sum()))
        want = best_rank_r(old.delta2d(), rank)
        assert (after.modules[name].delta2d().double() - want).abs().max() <= 1e-4 * want.abs().max()
    assert len(ranks) > 1  # the ranks really are chosen per module


def test_dynamic_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    assert lora_svd.dynamic_rank(s, "sv_ratio", 3.0, 4) == 2  # 4/3 = 1.33: keeps 4 and 2
    assert lora_svd.dynamic_rank(s, "sv_cumulative", 0.8, 4) == 2  # 6/7.5 = 0.8
    assert lora_svd.dynamic_rank(s, "sv_fro", 0.99, 4) == 3
    assert lora_svd.dynamic_rank(s, "sv_fro", 0.99, 2) == 2  # capped
    assert lora_svd.dynamic_rank(torch.zeros(4), "sv_fro", 0.5, 4) == 1
    decomposition = lora_svd.svd_of_product(torch.randn(30, 5), torch.randn(5, 40))
    direct = torch.linalg.svdvals(decomposition.u @ torch.diag(decomposition.s) @ decomposition.vh)
    assert torch.allclose(decomposition.s, direct[:5], rtol=1e-4)
    assert decomposition.kept_fro_fraction(5) == pytest.approx(1.0)


def test_output_loads_in_diffusers(tiny_models_v1, c3lier_file, tmp_path):
    out = tmp_path / "r2.safetensors"
    assert run_script(SCRIPT, ["--model", c3lier_file, "--save_to", out, "--new_rank", 2, "--save_precision", "float"]) == 0
    assert_diffusers_matches(tiny_models_v1, out)


def test_pt_output_and_fp16(c3lier_file, tmp_path):
    out = tmp_path / "r2.pt"
    assert run_script(SCRIPT, ["--model", c3lier_file, "--save_to", out, "--new_rank", 2, "--save_precision", "fp16"]) == 0
    resized = read_lora(out)
    assert all(m.down.dtype == torch.float16 for m in resized.modules.values())


def test_bad_inputs_fail_with_one_line(c3lier_file, tiny_model_files_v1, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    cases = [
        (["--model", tmp_path / "missing.safetensors", "--save_to", out], "not found"),
        (["--model", tiny_model_files_v1["safetensors"], "--save_to", out], "not a LoRA file"),
        (["--model", c3lier_file, "--save_to", c3lier_file], "also an input"),
        (["--model", c3lier_file, "--save_to", out, "--dynamic_method", "sv_fro"], "--dynamic_param"),
        (["--model", c3lier_file, "--save_to", out, "--dynamic_method", "sv_fro", "--dynamic_param", "2"], "fraction"),
        (["--model", c3lier_file, "--save_to", tmp_path / "out.bin"], "must end in"),
    ]
    original = c3lier_file.read_bytes()
    for argv, message in cases:
        assert run_script(SCRIPT, argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert c3lier_file.read_bytes() == original


@pytest.mark.parametrize("shape", [(12, 90), (90, 12), (16, 16)], ids=["wide", "tall", "square"])
def test_svd_of_matrix_is_the_thin_svd_for_every_shape(shape):
    # wide matrices are decomposed through their transpose (faster in LAPACK): same factors' product
    torch.manual_seed(3)
    matrix = torch.randn(*shape)
    decomposition = lora_svd.svd_of_matrix(matrix)
    k = min(shape)
    assert decomposition.u.shape == (shape[0], k) and decomposition.vh.shape == (k, shape[1])
    assert torch.allclose(decomposition.s.double(), torch.linalg.svdvals(matrix.double()), rtol=1e-5, atol=1e-5)
    assert torch.allclose((decomposition.u * decomposition.s) @ decomposition.vh, matrix, atol=1e-4)
    eye = torch.eye(k)
    assert torch.allclose(decomposition.u.T @ decomposition.u, eye, atol=1e-4)
    assert torch.allclose(decomposition.vh @ decomposition.vh.T, eye, atol=1e-4)
