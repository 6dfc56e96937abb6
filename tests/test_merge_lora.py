"""networks/merge_lora.py: into a model the outputs equal the LoRAs applied at run time (v1
and v2, single file streamed, .ckpt, Diffusers folder); LoRA + LoRA with --concat equals the
sum of the products, without it sd-scripts' element-wise sum; bad input fails cleanly."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from library.lora_modules import read_lora
from library.model_util import load_target_model
from library.safetensors_stream import TensorSpec, write_streaming
from lora_helpers import te_output, unet_output
from lora_tool_helpers import apply_loras, assert_diffusers_matches, assert_modelspec, make_lora, run_script

SCRIPT = "networks/merge_lora.py"


@pytest.fixture(scope="module")
def lora_pair_v1(tiny_models_v1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge_v1")
    a = make_lora(tiny_models_v1, folder / "a.safetensors", dim=4, alpha=2.0, conv_dim=3, seed=1)
    b = make_lora(tiny_models_v1, folder / "b.safetensors", dim=4, alpha=4.0, seed=2)
    return a, b


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    assert (got - want).abs().max() <= rel * want.abs().max()


def assert_merged_model_matches(models, merged_path, files, ratios):
    merged = load_target_model(merged_path)
    unet, text_encoder = apply_loras(models, files, ratios)
    want_u, want_t = unet_output(unet), te_output(text_encoder)
    assert (want_u - unet_output(models[0])).abs().max() > 1e-2
    assert_close(unet_output(merged.unet), want_u)
    assert_close(te_output(merged.text_encoder), want_t)


def test_merge_into_single_file_equals_runtime_v1(tiny_models_v1, tiny_model_files_v1, lora_pair_v1, tmp_path):
    out = tmp_path / "merged.safetensors"
    argv = ["--sd_model", tiny_model_files_v1["safetensors"], "--save_to", out, "--models", *lora_pair_v1, "--ratios", 0.7, -0.4]
    assert run_script(SCRIPT, argv) == 0
    assert_merged_model_matches(tiny_models_v1, out, lora_pair_v1, [0.7, -0.4])
    # every source key is kept, untouched ones bit for bit
    with safe_open(str(out), "pt") as merged, safe_open(str(tiny_model_files_v1["safetensors"]), "pt") as source:
        assert set(merged.keys()) == set(source.keys())
        key = "first_stage_model.decoder.conv_out.weight"
        assert torch.equal(merged.get_tensor(key), source.get_tensor(key))
        assert_modelspec(merged.metadata(), "stable-diffusion-v1", "merged", f"{tiny_model_files_v1['safetensors'].stem}, a, b")


def test_merge_into_v2_ckpt_fused_qkv(tiny_models_v2, tiny_model_files_v2, tmp_path):
    lora_file = make_lora(tiny_models_v2, tmp_path / "v2.safetensors", dim=4, alpha=4.0, conv_dim=2, seed=3)
    out = tmp_path / "merged_v2.ckpt"
    assert run_script(SCRIPT, ["--v2", "--sd_model", tiny_model_files_v2["ckpt"], "--save_to", out, "--models", lora_file]) == 0
    assert_merged_model_matches(tiny_models_v2, out, [lora_file], [1.0])


def test_merge_into_diffusers_folder_and_save_precision(tiny_models_v1, tiny_model_files_v1, lora_pair_v1, tmp_path):
    out = tmp_path / "merged_from_folder.safetensors"
    argv = ["--sd_model", tiny_model_files_v1["diffusers"], "--save_to", out, "--models", lora_pair_v1[0], "--ratios", 0.5]
    assert run_script(SCRIPT, argv) == 0
    assert_merged_model_matches(tiny_models_v1, out, lora_pair_v1[:1], [0.5])
    half = tmp_path / "merged_fp16.safetensors"
    argv = ["--sd_model", tiny_model_files_v1["safetensors"], "--save_to", half, "--models", lora_pair_v1[0], "--save_precision", "fp16"]
    assert run_script(SCRIPT, argv) == 0
    with safe_open(str(half), "pt") as merged:
        assert merged.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16


def test_lora_plus_lora_concat_is_sum_of_products(tiny_models_v1, lora_pair_v1, tmp_path):
    out = tmp_path / "concat.safetensors"
    assert run_script(SCRIPT, ["--save_to", out, "--models", *lora_pair_v1, "--ratios", 0.6, -1.2, "--concat"]) == 0
    a, b, merged = read_lora(lora_pair_v1[0]), read_lora(lora_pair_v1[1]), read_lora(out)
    assert set(merged.modules) == set(a.modules) | set(b.modules)
    for name, module in merged.modules.items():
        want = sum(ratio * f.modules[name].delta2d() for f, ratio in ((a, 0.6), (b, -1.2)) if name in f.modules)
        assert_close(module.delta2d(), want)
        assert module.rank == sum(f.modules[name].rank for f in (a, b) if name in f.modules)
    assert merged.metadata["ss_network_module"] == "networks.lora"
    assert_modelspec(merged.metadata, "stable-diffusion-v1/lora", "concat", "a, b")
    assert_diffusers_matches(tiny_models_v1, out)


def test_lora_plus_lora_elementwise_as_sd_scripts(lora_pair_v1, tmp_path):
    out = tmp_path / "sum.pt"
    assert run_script(SCRIPT, ["--save_to", out, "--models", *lora_pair_v1, "--ratios", 0.5, 2.0]) == 0
    a, b, merged = read_lora(lora_pair_v1[0]), read_lora(lora_pair_v1[1]), read_lora(out)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    base_alpha = a.modules[name].alpha
    scale_b = (b.modules[name].alpha / base_alpha) ** 0.5 * 2.0
    assert torch.allclose(merged.modules[name].up, a.modules[name].up * 0.5 + b.modules[name].up * scale_b)
    assert torch.allclose(merged.modules[name].down, a.modules[name].down * 0.5 + b.modules[name].down * scale_b)
    assert merged.modules[name].alpha == base_alpha


def test_streaming_writer_matches_safetensors(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).half(), "s": torch.tensor(1.5)}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    calls = []
    out = write_streaming(tmp_path / "x.safetensors", specs, lambda k: calls.append(k) or tensors[k], {"m": "1"})
    assert calls == list(tensors)  # one tensor produced at a time, in order
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"m": "1"}
        for key, value in tensors.items():
            assert torch.equal(f.get_tensor(key), value)
    with pytest.raises(ValueError):
        write_streaming(tmp_path / "y.safetensors", specs, lambda k: tensors[k].float())
    assert not (tmp_path / "y.safetensors").exists() and not list(tmp_path.glob(".y*"))


def test_bad_inputs_fail_with_one_line(tiny_models_v2, tiny_model_files_v1, lora_pair_v1, tmp_path, capsys):
    v2_lora = make_lora(tiny_models_v2, tmp_path / "v2.safetensors", seed=4)
    low_rank = make_lora(tiny_models_v2, tmp_path / "v2r2.safetensors", dim=2, seed=5)
    out = tmp_path / "out.safetensors"
    model = tiny_model_files_v1["safetensors"]
    cases = [
        (["--sd_model", model, "--save_to", out, "--models", v2_lora], "does not fit"),
        (["--sd_model", model, "--save_to", out, "--models", *lora_pair_v1, "--ratios", 1.0], "--ratios has 1"),
        (["--sd_model", model, "--save_to", out, "--models", tmp_path / "missing.safetensors"], "not found"),
        (["--sd_model", model, "--save_to", out, "--models", model], "not a LoRA file"),
        (["--sd_model", model, "--save_to", model, "--models", lora_pair_v1[0]], "also an input"),
        (["--save_to", lora_pair_v1[1], "--models", *lora_pair_v1], "also an input"),
        (["--save_to", out, "--models", v2_lora, low_rank], "use --concat"),
        (["--save_to", out, "--models", lora_pair_v1[0], v2_lora, "--concat"], "different model types"),
        (["--sd_model", tmp_path / "nope.safetensors", "--save_to", out, "--models", lora_pair_v1[0]], "not found"),
    ]
    for argv, message in cases:
        assert run_script(SCRIPT, argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
