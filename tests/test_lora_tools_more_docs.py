"""Every example command in docs/lora_tools_more.md runs, on the tiny model files the page names."""
from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from library.tiny_sd import write_tiny_model
from lora_helpers import randomize_up
from networks import check_lora_weights, dylora, extract_lora_from_dylora, lora, lora_interrogator
from tools import merge_models, show_metadata

DOC = Path(__file__).resolve().parent.parent / "docs" / "lora_tools_more.md"
SCRIPTS = {
    "networks/extract_lora_from_dylora.py": extract_lora_from_dylora.main,
    "networks/check_lora_weights.py": check_lora_weights.main,
    "networks/lora_interrogator.py": lora_interrogator.main,
    "tools/show_metadata.py": show_metadata.main,
    "tools/merge_models.py": merge_models.main,
}


def doc_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 ")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_files_v1, tiny_models_v1):
    folder = tmp_path_factory.mktemp("docs_examples")
    shutil.copy(tiny_model_files_v1["safetensors"], folder / "model.safetensors")
    other = write_tiny_model(tmp_path_factory.mktemp("other"), formats=("ckpt", "diffusers"), seed=1)
    shutil.copy(other["ckpt"], folder / "model_b.ckpt")
    shutil.copytree(other["diffusers"], folder / "model_c_diffusers")
    unet, vae, text_encoder = tiny_models_v1
    torch.manual_seed(0)
    network = lora.create_network(1.0, 4, 1.0, vae, copy.deepcopy(text_encoder), copy.deepcopy(unet))
    randomize_up(network)
    network.save_weights(folder / "my_lora.safetensors", None, {"ss_network_module": "networks.lora"})
    dy = dylora.create_network(1.0, 8, 4.0, vae, copy.deepcopy(text_encoder), copy.deepcopy(unet), unit="4")
    randomize_up(dy)
    meta = {"ss_network_module": "networks.dylora", "ss_network_dim": "8", "ss_network_args": json.dumps({"unit": "4"})}
    dy.save_weights(folder / "my_dylora.safetensors", None, meta)
    return folder


def test_the_page_has_an_example_for_every_script():
    used = {shlex.split(command)[1] for command in doc_commands()}
    assert used == set(SCRIPTS)


@pytest.mark.parametrize("command", doc_commands())
def test_doc_example_runs(command, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    argv = shlex.split(command)
    SCRIPTS[argv[1]](argv[2:])
    out = capsys.readouterr().out
    if argv[1] == "networks/extract_lora_from_dylora.py":
        assert (workdir / "my_lora_cut-0004.safetensors").is_file()
    elif argv[1] == "tools/merge_models.py":
        output = argv[argv.index("--output") + 1]
        assert (workdir / (output if output.endswith(".safetensors") else output + ".safetensors")).is_file()
    elif argv[1] == "tools/show_metadata.py":
        assert json.loads(out)["ss_network_module"] == "networks.lora"
    elif argv[1] == "networks/check_lora_weights.py":
        assert out.rstrip().endswith("modules are finite and non-zero")
    else:
        assert out.startswith("top 100:")
