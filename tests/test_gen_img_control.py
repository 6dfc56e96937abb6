"""gen_img_diffusers.py with ControlNet (both file layouts, canny hints) and --vae_slices."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_helpers import generate_pixels, one_line_error
from library.control_net import save_control_net
from test_control_net import make_tiny_control_net


generate = generate_pixels


@pytest.fixture(scope="module")
def guide_image(tmp_path_factory) -> Path:
    """A picture with edges: a bright square on a dark background."""
    array = np.full((64, 64, 3), 30, np.uint8)
    array[16:48, 16:48] = 220
    path = tmp_path_factory.mktemp("guide") / "square.png"
    Image.fromarray(array).save(path)
    return path


def test_control_net_both_layouts_change_the_image(tmp_path, tiny_model_files_v1, tiny_models_v1, guide_image):
    model = tiny_model_files_v1["safetensors"]
    net = make_tiny_control_net(tiny_models_v1[0])
    original = save_control_net(net, tmp_path / "control_original.safetensors", "original")
    diffusers_folder = save_control_net(net, tmp_path / "control_diffusers", "diffusers")
    base = generate(model, tmp_path / "base")
    flags = ["--guide_image_path", str(guide_image), "--control_net_preps", "canny_50_150"]
    with_original = generate(model, tmp_path / "orig", "--control_net_models", str(original), *flags)
    with_diffusers = generate(model, tmp_path / "diff", "--control_net_models", str(diffusers_folder), *flags)
    assert np.abs(with_original - base).max() > 5
    assert np.abs(with_original - with_diffusers).max() <= 1  # same weights, two layouts
    weak = generate(model, tmp_path / "weak", "--control_net_models", str(original), *flags,
                    "--control_net_weights", "0")
    assert np.array_equal(weak, base)  # weight 0 adds zero residuals
    # highres fix runs the ControlNet in both stages
    generate(model, tmp_path / "hr", "--control_net_models", str(original), *flags, "--highres_fix_scale", "0.5",
             "--highres_fix_steps", "2")


def test_control_net_flag_errors(tmp_path, capsys, tiny_model_files_v1, guide_image):
    base = ["--ckpt", str(tiny_model_files_v1["safetensors"]), "--outdir", str(tmp_path), "--prompt", "a",
            "--W", "64", "--H", "64", "--steps", "2"]
    for extra, expected in (
        (["--control_net_models", "x.safetensors"], "--guide_image_path"),
        (["--control_net_models", str(tmp_path / "none.safetensors"), "--guide_image_path", str(guide_image)], "none.safetensors"),
        (["--control_net_models", str(tiny_model_files_v1["safetensors"]), "--guide_image_path", str(guide_image)],
         "not a ControlNet"),
    ):
        assert expected in one_line_error(capsys, base + extra)


def test_vae_slices_equal_plain_decode(tmp_path, tiny_model_files_v1):
    model = tiny_model_files_v1["safetensors"]
    plain = generate(model, tmp_path / "plain", size=128)
    sliced = generate(model, tmp_path / "sliced", "--vae_slices", "4", size=128)
    assert np.abs(plain - sliced).max() <= 1
