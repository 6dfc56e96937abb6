"""networks/check_lora_weights.py: sd-scripts' per-tensor lines with real values; planted NaN,
inf and all-zero modules are flagged and make the exit status non-zero."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.cli import run_main
from lora_helpers import randomize_up
from networks import lora
from networks.check_lora_weights import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lora_file(tiny_models_v1, tmp_path_factory):
    unet, vae, text_encoder = tiny_models_v1
    torch.manual_seed(0)
    network = lora.create_network(1.0, 4, 2.0, vae, copy.deepcopy(text_encoder), copy.deepcopy(unet))
    randomize_up(network, seed=2)
    path = tmp_path_factory.mktemp("check") / "good.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora"})
    return path


def _planted(lora_file, tmp_path, name, edit):
    state = load_file(str(lora_file))
    edit(state)
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_good_file_lines_and_values(lora_file, capsys):
    assert run_main(main, [str(lora_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    state = load_file(str(lora_file))
    weight_keys = [k for k in state if "lora_up" in k or "lora_down" in k]
    assert lines[0] == f"number of LoRA modules: {len(weight_keys)}"
    rows = {line.split(",")[0]: line.split(",") for line in lines[1:-1]}
    assert set(rows) == set(weight_keys)
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    tensor = state[key].abs()
    _, shape, mean, low, high, norm = rows[key]
    assert shape == "(" + "-".join(map(str, state[key].shape)) + ")"
    assert math.isclose(float(mean), tensor.mean().item(), rel_tol=1e-6)
    assert math.isclose(float(low), tensor.min().item(), rel_tol=1e-6)
    assert math.isclose(float(high), tensor.max().item(), rel_tol=1e-6)
    assert math.isclose(float(norm), torch.linalg.vector_norm(tensor).item(), rel_tol=1e-5)
    num_modules = len({k.split(".")[0] for k in state})
    assert lines[-1] == f"all {num_modules} modules are finite and non-zero"


def test_show_all_keys_lists_alphas(lora_file, capsys):
    main([str(lora_file), "-s"])
    out = capsys.readouterr().out
    state = load_file(str(lora_file))
    assert f"number of all modules: {len(state)}" in out
    assert "lora_unet_mid_block_attentions_0_proj_in.alpha,(),2.0,2.0,2.0,2.0" in out


def test_planted_nan_module_is_flagged(lora_file, tmp_path, capsys):
    bad_module = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"

    def plant(state):
        state[f"{bad_module}.lora_down.weight"][0, 1] = float("nan")

    path = _planted(lora_file, tmp_path, "nan.safetensors", plant)
    assert run_main(main, [str(path)]) == 1
    captured = capsys.readouterr()
    assert f"{bad_module}: NaN in lora_down.weight" in captured.out
    assert "modules with problems: 1" in captured.out
    assert captured.err.count("\n") == 1 and bad_module in captured.err and "1 of" in captured.err


def test_inf_zero_and_nan_alpha(lora_file, tmp_path, capsys):
    inf_module = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    zero_module = "lora_unet_down_blocks_0_attentions_0_proj_out"
    alpha_module = "lora_unet_up_blocks_1_attentions_0_proj_in"

    def plant(state):
        state[f"{inf_module}.lora_up.weight"][2, 0] = float("-inf")
        state[f"{zero_module}.lora_up.weight"].zero_()
        state[f"{alpha_module}.alpha"] = torch.tensor(float("nan"))

    path = _planted(lora_file, tmp_path, "bad.pt", lambda s: None)
    state = load_file(str(lora_file))
    plant(state)
    torch.save(state, path)  # .pt files are read too
    assert run_main(main, [str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{inf_module}: inf in lora_up.weight" in out
    assert f"{zero_module}: all zero in lora_up.weight" in out
    assert f"{alpha_module}: NaN in alpha" in out
    assert "modules with problems: 3" in out


def test_bad_inputs(tmp_path, tiny_model_files_v1, capsys):
    assert run_main(main, [str(tmp_path / "missing.safetensors")]) == 1
    assert "not found" in capsys.readouterr().err
    assert run_main(main, [str(tiny_model_files_v1["safetensors"])]) == 1
    err = capsys.readouterr().err
    assert "not a LoRA file" in err and err.count("\n") == 1


def test_script_exit_status(lora_file, tmp_path):
    def plant(state):
        key = next(k for k in state if k.endswith("lora_up.weight"))
        state[key][0, 0] = float("nan")

    path = _planted(lora_file, tmp_path, "nan.safetensors", plant)
    script = REPO / "networks" / "check_lora_weights.py"
    good = subprocess.run([sys.executable, str(script), str(lora_file)], capture_output=True, text=True, timeout=300)
    bad = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")  # after the log lines
