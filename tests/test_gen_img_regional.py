"""gen_img_diffusers.py with regional LoRA + attention couple: `A AND B` with a two-colour mask
applies network 1 inside the red region and network 2 inside the green one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img_diffusers
from library import gen_args, gen_img
from library.gen_jobs import JobDefaults, SeedSource, jobs_for_line, parse_line
from library.gen_networks import set_multipliers
from lora_helpers import randomize_up


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory, tiny_models_v1) -> list[Path]:
    from networks import lora

    unet, vae, text_encoder = tiny_models_v1
    root = tmp_path_factory.mktemp("regional")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        network = lora.create_network(1.0, 4, 4, vae, text_encoder, unet)
        randomize_up(network, seed=seed, std=0.5)
        network.save_weights(root / f"lora{seed}.safetensors", None, {})
        paths.append(root / f"lora{seed}.safetensors")
    return paths


def region_mask(path: Path) -> Path:
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[:, :32, 0] = 255  # red: left half → part 1 / network 1
    mask[:, 32:, 1] = 255  # green: right half → part 2 / network 2
    Image.fromarray(mask).save(path)
    return path


def test_each_network_acts_inside_its_mask(tmp_path, tiny_model_files_v1, two_loras):
    """Checked on the latents: the tiny VAE's attention spreads any change over the whole image."""
    mask = region_mask(tmp_path / "mask.png")
    args = gen_args.parse_args(
        ["--ckpt", str(tiny_model_files_v1["safetensors"]), "--outdir", str(tmp_path), "--W", "64", "--H", "64",
         "--steps", "1", "--mask_path", str(mask), "--prompt", "unused",
         "--network_module", "networks.lora", "--network_weights", *map(str, two_loras)]
    )
    generator = gen_img.load_generator(args)
    sources = gen_img.ImageSources([], [mask], [])
    defaults = JobDefaults(64, 64, 1, 7.5, "ddim", None, None, 1)

    def run(multipliers: str) -> torch.Tensor:
        line = parse_line(f"a red cat AND a blue dog --am {multipliers} --d 3")
        jobs = jobs_for_line(line, defaults, SeedSource(None, False), sources.init, sources.masks, 0)
        set_multipliers(generator.networks, jobs[0].network_muls)
        return generator.batch_latents(jobs, 64, 64, 1, 0.8)[0]

    base = run("0,0")
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    for multipliers, inside in (("1,0", left), ("0,1", ~left)):
        delta = (run(multipliers) - base).abs().mean(0)
        assert delta[inside].mean() > 1e-2
        # one step: network i's U-Net part acts only inside mask i and its text-encoder part
        # only changes sub-prompt i, whose prediction is used only inside mask i
        assert delta[~inside].max() < 1e-5, delta[~inside].max()
    plain = run("1,1")
    both = (plain - base)
    torch.testing.assert_close(both, (run("1,0") - base) + (run("0,1") - base), atol=1e-5, rtol=1e-4)


def test_regional_script_run(tmp_path, tiny_model_files_v1, two_loras):
    mask = region_mask(tmp_path / "mask.png")
    argv = ["--ckpt", str(tiny_model_files_v1["safetensors"]), "--outdir", str(tmp_path), "--W", "64", "--H", "64",
            "--steps", "2", "--seed", "3", "--mask_path", str(mask), "--network_module", "networks.lora",
            "--network_weights", *map(str, two_loras), "--prompt", "a red cat AND a blue dog"]
    (written,) = gen_img_diffusers.main(argv)
    assert Image.open(written).text["prompt"] == "a red cat AND a blue dog"
