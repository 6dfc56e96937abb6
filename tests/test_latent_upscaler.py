"""Latent upscaler: sd-scripts' architecture and key layout, weights loading, the 2x tool."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library import latent_upscaler as lu  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from tests.caption_fixtures import doc_commands  # noqa: E402
from tools import latent_upscaler as tool  # noqa: E402


def test_full_size_key_layout():
    model = lu.Upscaler()
    sd = model.state_dict()
    assert sd["conv1.weight"].shape == (128, 4, 3, 3) and "conv1.bias" not in sd
    assert sd["resblock20.conv2.weight"].shape == (128, 128, 3, 3) and "resblock21.conv1.weight" not in sd
    assert sd["conv2.weight"].shape == (64, 128, 3, 3) and sd["conv3.weight"].shape == (64, 64, 3, 3)
    assert sd["conv_final.weight"].shape == (4, 64, 1, 1) and sd["conv_final.bias"].shape == (4,)
    assert {"bn3.running_mean", "bn3.running_var", "bn3.num_batches_tracked"} <= set(sd)
    # 20 blocks x (2 convs + 2 BNs x 5 entries) + stem/tail: every key accounted for
    assert len(sd) == 20 * 12 + 6 + 6 + 6 + 2
    assert torch.count_nonzero(sd["conv_final.weight"]) == 0


def reference_forward(model: lu.Upscaler, x: torch.Tensor) -> torch.Tensor:
    """The forward pass written out flat, block by block, in eval mode."""
    def bn(name, t):
        m = getattr(model, name) if isinstance(name, str) else name
        return torch.nn.functional.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False)

    h = torch.relu(bn("bn1", model.conv1(x)))
    for i in range(model.num_blocks):
        if i % 4 == 0:
            skip = h
        b = getattr(model, f"resblock{i + 1}")
        h = torch.relu(bn(b.bn2, b.conv2(torch.relu(bn(b.bn1, b.conv1(h))))) + h)
        if i % 4 == 3:
            h = h + skip
    h = torch.relu(bn("bn2", model.conv2(h)))
    h = bn("bn3", model.conv3(h))
    return model.conv_final(h) + x


def small_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = lu.Upscaler(channels=8, mid_channels=6, num_blocks=8)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.2)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_loading_and_forward(tmp_path, suffix):
    weights = small_weights()
    path = tmp_path / f"up{suffix}"
    if suffix == ".safetensors":
        save_file(weights, str(path))
    else:
        torch.save(weights, path)
    model = tool.create_upscaler(weights=str(path))
    assert isinstance(model, tool.Upscaler) and model.num_blocks == 8 and not model.support_latents()
    x = torch.randn(2, 4, 6, 5)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, reference_forward(model, x))
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_bad_weights(tmp_path):
    with pytest.raises(UserError, match="not found"):
        lu.create_upscaler(weights=str(tmp_path / "none.safetensors"))
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a latent upscaler"):
        lu.create_upscaler(weights=str(tmp_path / "other.safetensors"))
    weights = small_weights()
    del weights["bn2.running_var"]
    save_file(weights, str(tmp_path / "cut.safetensors"))
    with pytest.raises(UserError, match="do not fit"):
        lu.create_upscaler(weights=str(tmp_path / "cut.safetensors"))


def test_docs_example(tmp_path, tiny_model_files_v1, monkeypatch):
    """docs/tools.md's command, checked against the same steps done by hand."""
    import shutil

    from library.model_util import load_vae

    (argv,) = doc_commands(Path(__file__).resolve().parent.parent / "docs" / "tools.md", "tools/latent_upscaler.py")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_files_v1["diffusers"], tmp_path / "models" / "tiny_sd_v1")
    save_file(small_weights(), str(tmp_path / "models" / "upscaler.safetensors"))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 34, 3), dtype=np.uint8)).save(images / "a.png")  # cropped to 32x16
    tool.main(argv[1:] + ["--seed", "1"])
    out = tmp_path / "upscaled"
    upscaled = Image.open(out / "a_upscaled.png")
    assert upscaled.size == (64, 32) and Image.open(out / "a_lanczos4.png").size == (64, 32)
    # the same numbers by hand: Lanczos 2x → VAE sample → upscaler → decode
    vae = load_vae(tiny_model_files_v1["diffusers"])
    model = lu.upscaler_from_weights(small_weights())
    low = Image.open(images / "a.png").convert("RGB").crop((0, 0, 32, 16))
    pixels = torch.from_numpy(np.array(low.resize((64, 32), Image.LANCZOS))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(1))
        decoded = vae.decode(model(latents)).sample
    expected = ((decoded[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    assert np.abs(np.asarray(upscaled).astype(int) - expected.astype(int)).max() <= 1


def test_tool_errors(tmp_path, capsys):
    assert run_main(tool.main, ["--vae_path", "x", "--weights", "y", "--image_pattern", str(tmp_path / "*.png")]) == 1
    assert "no images match" in capsys.readouterr().err
    assert run_main(tool.main, ["--weights", "y"]) == 1
    assert "--vae_path is required" in capsys.readouterr().err


def test_truncated_safetensors_is_one_error(tmp_path):
    save_file(small_weights(), str(tmp_path / "up.safetensors"))
    data = (tmp_path / "up.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read latent upscaler weights"):
        lu.create_upscaler(weights=str(tmp_path / "cut.safetensors"))
