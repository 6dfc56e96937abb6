"""ControlNet: both file layouts load into diffusers ControlNetModel, the per-step residuals
change the UNet output and reproduce diffusers' StableDiffusionControlNetPipeline; hints and
the canny tool."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from library import sd_keys
from library.control_hint import canny_edges, get_preprocessor, prepare_hint, write_canny
from library.control_net import (
    CONTROL_PREFIX,
    ControlNetUnit,
    active_unit,
    control_net_original_state_dict,
    control_net_residuals,
    load_control_net,
    save_control_net,
)
from library.errors import UserError
from library.samplers import get_sampler
from library.sd_config import UNET_PREFIX

ROOT = Path(__file__).resolve().parent.parent


def make_tiny_control_net(unet, seed: int = 5) -> ControlNetModel:
    """ControlNetModel.from_unet with the zero-initialised layers re-drawn, so it does something."""
    net = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return net.eval()


@pytest.fixture(scope="module")
def control_net(tiny_models_v1):
    return make_tiny_control_net(tiny_models_v1[0])


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_original_layout_keys(control_net, tiny_models_v1):
    unet = tiny_models_v1[0]
    original = control_net_original_state_dict(control_net)
    assert all(k.startswith(CONTROL_PREFIX) for k in original)
    # the UNet part uses exactly the LDM names of the base UNet's encoder
    unet_ldm = {link.ldm_key[len(UNET_PREFIX):] for link in sd_keys.unet_links(unet.state_dict(), unet.config)}
    own = {k[len(CONTROL_PREFIX):] for k in original}
    extra = {k for k in own if not k.startswith(("zero_convs.", "input_hint_block.", "middle_block_out."))}
    assert extra <= unet_ldm
    assert {k for k in unet_ldm if k.startswith(("input_blocks.", "middle_block.", "time_embed."))} == extra
    # 1 + levels * (layers + 1) - 1 zero convs (conv_in, every resnet/attention, every downsampler)
    assert len({k.split(".")[1] for k in own if k.startswith("zero_convs.")}) == len(control_net.controlnet_down_blocks)
    hint = sorted({int(k.split(".")[1]) for k in own if k.startswith("input_hint_block.")})
    assert hint == list(range(0, 16, 2))
    assert original[f"{CONTROL_PREFIX}middle_block_out.0.weight"].shape == control_net.controlnet_mid_block.weight.shape


@pytest.mark.parametrize("layout,name", [("original", "cn.safetensors"), ("diffusers", "cn_diffusers"),
                                         ("diffusers", "cn_diffusers.safetensors")])
def test_save_load_round_trip(control_net, tmp_path, layout, name):
    path = save_control_net(control_net, tmp_path / name, layout)
    loaded = load_control_net(path)
    assert loaded.config.block_out_channels == control_net.config.block_out_channels
    assert list(loaded.config.conditioning_embedding_out_channels) == [16, 32, 96, 256]
    assert_same_weights(loaded, control_net)
    if layout == "original":
        assert all(k.startswith(CONTROL_PREFIX) for k in load_file(str(path)))


def test_original_ckpt_with_state_dict_wrapper(control_net, tmp_path):
    path = tmp_path / "control_sd15_tiny.pth"
    torch.save({"state_dict": control_net_original_state_dict(control_net)}, path)
    assert_same_weights(load_control_net(path), control_net)


def test_transfer_control_difference_file(control_net, tiny_models_v1, tmp_path):
    unet = tiny_models_v1[0]
    full = control_net_original_state_dict(control_net)
    base = {CONTROL_PREFIX + l.ldm_key[len(UNET_PREFIX):]: unet.state_dict()[l.model_key]
            for l in sd_keys.unet_links(unet.state_dict(), unet.config)}
    diff = {k: (v - base[k] if k in base else v) for k, v in full.items()}
    diff["difference"] = torch.tensor(1.0)
    path = tmp_path / "diff.safetensors"
    save_file({k: v.contiguous() for k, v in diff.items()}, str(path))
    loaded = load_control_net(path, base_unet=unet)
    for key, value in control_net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="base UNet"):
        load_control_net(path)


def test_not_a_control_net_is_a_user_error(tmp_path, tiny_model_files_v1):
    with pytest.raises(UserError, match="not a ControlNet"):
        load_control_net(tiny_model_files_v1["safetensors"])
    with pytest.raises(UserError, match="not found"):
        load_control_net(tmp_path / "missing.safetensors")


def test_active_unit_ratio_and_turns(control_net):
    hint = torch.zeros(1, 3, 64, 64)
    a, b = ControlNetUnit(control_net, hint, ratio=1.0), ControlNetUnit(control_net, hint, ratio=0.5)
    assert [active_unit([a], s, 4) is a for s in range(4)] == [True] * 4
    # two ControlNets take turns; the second is off once step / steps exceeds 0.5 (sd-scripts)
    names = {id(a): "a", id(b): "b", id(None): None}
    assert [names[id(active_unit([a, b], s, 10))] for s in range(10)] == ["a", "b"] * 3 + ["a", None, "a", None]


def _text_embeddings(text_encoder, tokenizer, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_residuals_change_unet_output(control_net, tiny_models_v1, tokenizer_v1):
    unet, _, text_encoder = tiny_models_v1
    ehs = _text_embeddings(text_encoder, tokenizer_v1, ["a cat", ""])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hint = prepare_hint(np.full((64, 64, 3), 200, np.uint8), None, 64, 64)
    with torch.no_grad():
        plain = unet(x, 500, ehs).sample
        extra = control_net_residuals([ControlNetUnit(control_net, hint)], 0, 10, x, 500, ehs)
        controlled = unet(x, 500, ehs, **extra).sample
        half = unet(x, 500, ehs, **control_net_residuals([ControlNetUnit(control_net, hint, weight=0.5)], 0, 10, x, 500, ehs)).sample
    assert (controlled - plain).abs().mean() > 1e-2
    assert (half - plain).abs().mean() < (controlled - plain).abs().mean()
    assert control_net_residuals([ControlNetUnit(control_net, hint, ratio=0.0)], 5, 10, x, 500, ehs) == {}


def test_matches_diffusers_controlnet_pipeline(control_net, tiny_models_v1, tokenizer_v1):
    """3 DDIM steps, guidance 7.5: the residuals in a plain loop give the pipeline's latents."""
    unet, vae, text_encoder = tiny_models_v1
    image = np.zeros((64, 64, 3), np.uint8)
    cv2.circle(image, (32, 32), 18, (255, 255, 255), -1)
    hint = prepare_hint(image, get_preprocessor("canny"), 64, 64)
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer_v1, unet=unet, controlnet=control_net,
        scheduler=get_sampler("ddim"), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    steps, scale = 3, 7.5
    reference = pipe(
        "a photo of a cat", image=Image.fromarray((hint[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)),
        num_inference_steps=steps, guidance_scale=scale, height=64, width=64,
        generator=torch.Generator().manual_seed(7), output_type="latent",
    ).images

    scheduler = get_sampler("ddim")
    scheduler.set_timesteps(steps)
    ehs = _text_embeddings(text_encoder, tokenizer_v1, ["", "a photo of a cat"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * scheduler.init_noise_sigma
    units = [ControlNetUnit(control_net, hint)]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = unet(model_input, t, ehs, **control_net_residuals(units, i, steps, model_input, t, ehs)).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + scale * (cond - uncond), t, latents).prev_sample
    torch.testing.assert_close(latents, reference, atol=1e-4, rtol=1e-4)


def test_preprocessor_names():
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 255
    assert get_preprocessor("none") is None and get_preprocessor(None) is None
    edges = get_preprocessor("canny")(image)
    np.testing.assert_array_equal(edges, cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 63, 191))
    assert edges.max() == 255 and edges[16, 16] == 0
    np.testing.assert_array_equal(get_preprocessor("canny_10_20")(image), canny_edges(image, 10, 20))
    for bad in ("depth", "canny_x", "canny_200_100"):
        with pytest.raises(UserError, match="canny|preprocessor"):
            get_preprocessor(bad)


def test_prepare_hint_shape_and_range():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 40:] = 255
    hint = prepare_hint(image, get_preprocessor("canny"), 64, 32)
    assert hint.shape == (1, 3, 32, 64) and hint.dtype == torch.float32
    assert set(torch.unique(hint).tolist()) == {0.0, 1.0}
    torch.testing.assert_close(hint[:, 0], hint[:, 2])


def test_canny_tool_writes_edge_png(tmp_path):
    image = np.zeros((48, 48, 3), np.uint8)
    cv2.rectangle(image, (10, 10), (38, 38), (255, 128, 0), -1)
    source = tmp_path / "in.png"
    Image.fromarray(image).save(source)
    out = tmp_path / "edges.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "canny.py"), "--input", str(source), "--output", str(out), "--low", "50", "--high", "150"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    written = np.array(Image.open(out))
    np.testing.assert_array_equal(written, canny_edges(image, 50, 150))
    assert written.max() == 255
    from library.cli import run_main
    from tools import canny

    assert run_main(canny.main, ["--input", str(tmp_path / "nope.png"), "--output", str(out)]) == 1
    np.testing.assert_array_equal(np.array(Image.open(out)), written)  # the old output survives


def test_write_canny_in_process(tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))[:, :, None].repeat(3, 2)).save(source)
    assert write_canny(source, tmp_path / "e.png", 1, 2).is_file()


def _guide_blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "control_net.md").read_text(encoding="utf-8")
    blocks, inside, current = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if inside is None:
                inside, current = line[3:].strip(), []
            else:
                if inside == language:
                    blocks.append("\n".join(current))
                inside = None
        elif inside is not None:
            current.append(line)
    return blocks


def test_guide_commands_run(tmp_path, monkeypatch):
    """Every `python3 tools/...` line of docs/control_net.md, run in-process (same argv)."""
    import importlib
    import shlex

    from library.cli import run_main

    monkeypatch.chdir(tmp_path)
    photo = np.zeros((64, 64, 3), np.uint8)
    cv2.circle(photo, (32, 32), 20, (250, 200, 30), -1)
    Path("demo_output").mkdir()
    Image.fromarray(photo).save("demo_output/photo.png")
    commands = [line for block in _guide_blocks("bash") for line in block.splitlines() if line.startswith("python3 tools/")]
    assert len(commands) == 4
    for command in commands:
        script, *argv = shlex.split(command)[1:]
        module = importlib.import_module(script[:-3].replace("/", "."))
        assert run_main(module.main, argv) == 0, command
    original = load_control_net("demo_output/control_tiny.safetensors")
    assert all(k.startswith(CONTROL_PREFIX) for k in load_file("demo_output/control_tiny.safetensors"))
    assert_same_weights(load_control_net("demo_output/control_tiny_diffusers"), original)
    np.testing.assert_array_equal(np.array(Image.open("demo_output/photo_canny.png")), canny_edges(photo, 100, 200))


def test_guide_python_example_runs():
    (block,) = _guide_blocks("python")
    exec(compile(block, "docs/control_net.md", "exec"), {})


def test_load_control_nets_and_make_units(control_net, tmp_path):
    from library.control_net import load_control_nets, make_units

    first = save_control_net(control_net, tmp_path / "a.safetensors")
    second = save_control_net(control_net, tmp_path / "b", "diffusers")
    specs = load_control_nets([first, second], preps=["canny_10_20"], weights=[0.5], ratios=[0.25, 0.75])
    assert [(s.weight, s.ratio) for s in specs] == [(0.5, 0.25), (1.0, 0.75)]
    assert specs[0].preprocessor is not None and specs[1].preprocessor is None
    images = [np.full((32, 32, 3), v, np.uint8) for v in (0, 85, 170)]
    images[0][8:24, 8:24] = 255
    units = make_units(specs, images, 48, 40, batch_size=2)
    assert [u.hint.shape for u in units] == [(2, 3, 40, 48)] * 2
    # item b of ControlNet i uses image (b * 2 + i) % 3: net 0 -> images 0, 2; net 1 -> images 1, 0
    torch.testing.assert_close(units[0].hint[1], prepare_hint(images[2], specs[0].preprocessor, 48, 40)[0])
    torch.testing.assert_close(units[1].hint[0], torch.full((3, 40, 48), 85 / 255))
    assert units[0].hint[0].max() == 1.0  # canny edges of the square
    single = make_units(specs, images[:1], 48, 40, batch_size=4)
    assert single[1].hint.shape == (1, 3, 40, 48)
    with pytest.raises(UserError, match="guide_image_path"):
        make_units(specs, [], 48, 40)
