"""The worked example of docs/lora_tools.md runs as written (in-process, in a temporary folder)
and produces the files the page lists; every flag of the four scripts is documented."""
from __future__ import annotations

import re
import shlex

import pytest
import torch

from library.lora_modules import read_lora
from library.model_util import load_target_model
from lora_tool_helpers import ROOT, load_script, run_script

DOC = ROOT / "docs" / "lora_tools.md"
SCRIPTS = ["networks/resize_lora.py", "networks/merge_lora.py", "networks/svd_merge_lora.py", "networks/extract_lora_from_models.py"]


def example_commands() -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Worked example", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_worked_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = example_commands()
    assert len(commands) == 8
    for command in commands:
        assert command[0] == "python3", command
        assert run_script(command[1], command[2:]) == 0, command
    out = tmp_path / "demo_output"
    extracted = read_lora(out / "lora" / "extracted.safetensors")
    assert {m.rank for m in extracted.modules.values()} == {8, 4}
    assert {m.rank for m in read_lora(out / "lora" / "extracted_r4.safetensors").modules.values()} == {4, 2}
    assert read_lora(out / "lora" / "extracted_dynamic.safetensors").metadata["ss_network_dim"] == "Dynamic"
    assert {m.rank for m in read_lora(out / "lora" / "svd_merged.safetensors").modules.values()} == {4}
    assert read_lora(out / "lora" / "concat_merged.safetensors").metadata["sshs_model_hash"]
    merged = load_target_model(out / "tiny_sd_v1_merged.safetensors")
    base = load_target_model(out / "tiny_sd_v1.safetensors")
    layer = lambda m: m.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight  # noqa: E731
    assert not torch.equal(layer(merged), layer(base))
    assert torch.equal(merged.unet.conv_in.weight, base.unet.conv_in.weight)  # not a LoRA target

@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_documented(script):
    text = DOC.read_text(encoding="utf-8")
    section = text.split(f"## `{script}`", 1)[1].split("\n## ", 1)[0]
    parser = load_script(script).setup_parser()
    flags = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--") and opt != "--help"]
    assert flags
    for flag in flags:
        assert f"`{flag}`" in section, f"{flag} of {script} is not in docs/lora_tools.md"
