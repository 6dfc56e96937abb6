"""Runs every `bash` block of docs/gen_img.md (in process, in a scratch folder) and checks the
documented outputs."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

import gen_img_diffusers
from library.png_info import parse_a1111_parameters
from tools import canny, make_tiny_model, original_control_net

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "gen_img.md"
SCRIPTS = {
    "gen_img_diffusers.py": gen_img_diffusers.main,
    "tools/make_tiny_model.py": make_tiny_model.main,
    "tools/canny.py": canny.main,
    "tools/original_control_net.py": original_control_net.main,
}


def doc_commands() -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip():
                commands.append(shlex.split(command))
    return commands


def prepare_inputs(root: Path, tiny_models_v1) -> None:
    """Files the page says come from the other demos (LoRA and TI trainers, a ControlNet)."""
    import torch

    from library.control_net import save_control_net
    from library.embedding_files import save_embedding
    from lora_helpers import randomize_up
    from networks import lora
    from test_control_net import make_tiny_control_net

    unet, vae, text_encoder = tiny_models_v1
    torch.manual_seed(0)
    network = lora.create_network(1.0, 4, 4, vae, text_encoder, unet)
    randomize_up(network)
    (root / "demo_output" / "lora").mkdir(parents=True)
    network.save_weights(root / "demo_output" / "lora" / "demo_lora.safetensors", None, {"ss_network_dim": "4"})
    dim = text_encoder.get_input_embeddings().embedding_dim
    save_embedding(root / "demo_output" / "ti" / "mychar.safetensors", torch.randn(2, dim))
    save_control_net(make_tiny_control_net(unet), root / "demo_output" / "control_tiny.safetensors", "original")


def test_every_documented_command_runs(tmp_path, monkeypatch, tiny_models_v1):
    commands = doc_commands()
    assert len(commands) >= 10
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", open(os.devnull, encoding="utf-8"))
    for index, command in enumerate(commands):
        assert command[0] == "python3" and command[1] in SCRIPTS, command
        SCRIPTS[command[1]](command[2:])
        if index == 0:  # make_tiny_model: the other demos' files need the model first
            prepare_inputs(tmp_path, tiny_models_v1)

    (first,) = (tmp_path / "demo_output" / "gen").glob("im_*_000_42.png")
    params = parse_a1111_parameters(Image.open(first).text["parameters"])
    assert params["prompt"] == "a (red:1.3) ball on grass" and params["negative_prompt"] == "blurry"
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"], params["Size"]) == (
        "8", "Euler a", "7.5", "42", "64x64"
    )
    assert len(list((tmp_path / "demo_output" / "gen_file").glob("*.png"))) == 6
    assert [p.name[:12] for p in (tmp_path / "demo_output" / "img2img").glob("*.png")] == ["ball_00_im_2"]
    highres = sorted(Image.open(p).size for p in (tmp_path / "demo_output" / "highres").glob("*.png"))
    assert highres == [(64, 64), (128, 128)]
    for folder in ("inpaint", "lora_gen", "regional", "ti_gen", "control"):
        assert len(list((tmp_path / "demo_output" / folder).glob("*.png"))) == 1, folder


def test_every_flag_is_documented():
    text = DOC.read_text(encoding="utf-8")
    flags = [a for action in gen_img_diffusers.setup_parser()._actions for a in action.option_strings]
    missing = [f for f in flags if f.startswith("--") and f != "--help" and f not in text]
    assert not missing
