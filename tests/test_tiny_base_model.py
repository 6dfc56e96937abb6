"""tools/train_tiny_base_model.py at toy sizes: reproducible, losses fall, the file loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.model_util import load_target_model
from library.sd_config import VAE_SCALING_FACTOR
from library.tiny_base_model import (
    TinyBaseConfig,
    build_models,
    encode_latents,
    make_dataset,
    rescale_latent_space,
    train_tiny_base_model,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "train_tiny_base_model.py"

# the smallest layout the loader accepts: 16 px scenes, 2x2 latents, 32-channel blocks
TOY = dict(
    resolution=16, num_images=4, vae_channels=(32, 32, 32, 32), unet_channels=(32, 32, 32, 32),
    text_hidden_size=32, text_layers=1, vae_steps=12, vae_batch_size=4, vae_crop=16, vae_learning_rate=3e-3,
    unet_steps=12, unet_batch_size=4, unet_learning_rate=2e-3, caption_dropout_rate=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy sizes: one thread is as fast and does not oversubscribe a shared CPU
    out = tmp_path_factory.mktemp("tiny_base") / "toy.safetensors"
    try:
        yield train_tiny_base_model(TinyBaseConfig(**TOY), out)
    finally:
        torch.set_num_threads(threads)


def _mean(values):
    return sum(values) / len(values)


def _denoising_loss(unet, text_encoder, latents, captions, draws: int = 16) -> float:
    """Epsilon-prediction MSE of the toy images at fixed noise and timesteps (the same draws for
    every model): a fair before/after comparison, unlike 12 training losses at random timesteps."""
    from library.samplers import get_noise_scheduler
    from library.text_encoding import encode_input_ids, tokenize_captions
    from library.tokenizer_util import load_tokenizer

    scheduler = get_noise_scheduler()
    tokenizer = load_tokenizer()
    generator = torch.Generator().manual_seed(0)
    scaled = latents * VAE_SCALING_FACTOR
    total = 0.0
    with torch.no_grad():
        states = encode_input_ids(text_encoder, tokenize_captions(tokenizer, captions), tokenizer, None, None)
        for _ in range(draws):
            noise = torch.randn(scaled.shape, generator=generator)
            timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(scaled),), generator=generator)
            prediction = unet(scheduler.add_noise(scaled, noise, timesteps), timesteps, encoder_hidden_states=states).sample
            total += float(torch.nn.functional.mse_loss(prediction, noise))
    return total / draws


def test_losses_fall(toy_run):
    # 4 images, every step sees all of them: the VAE overfits fast, the U-Net leaves its init
    assert _mean(toy_run.vae_losses[-3:]) < 0.7 * _mean(toy_run.vae_losses[:3])
    assert set(toy_run.seconds) == {"data", "vae", "latents", "unet", "save"}
    config = TinyBaseConfig(**TOY)
    trained = load_target_model(toy_run.path)
    images, captions = make_dataset(config)
    with torch.no_grad():
        latents = encode_latents(trained.vae, images)  # the saved VAE is the rescaled one
    torch.manual_seed(config.seed)  # build_models draws the same initial weights as the run did
    unet0, _, text_encoder0 = build_models(config)
    before = _denoising_loss(unet0.eval(), text_encoder0.eval(), latents, captions)
    after = _denoising_loss(trained.unet, trained.text_encoder, latents, captions)
    assert after < 0.98 * before, (before, after)  # 12 steps: 1.073 -> 1.026 measured


def test_saved_file_loads_as_sd1_in_our_loader_and_diffusers(toy_run, tmp_path):
    from safetensors import safe_open

    with safe_open(str(toy_run.path), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        metadata = f.metadata()
    assert dtypes == {torch.float16}
    assert '"resolution": 16' in metadata["tiny_base_model.config"]
    models = _load_in_ours_and_diffusers(toy_run.path, tmp_path)
    assert list(models.unet.config.block_out_channels) == [32, 32, 32, 32]
    assert models.text_encoder.config.hidden_size == 32 and models.text_encoder.config.num_hidden_layers == 1


def _load_in_ours_and_diffusers(path, tmp_path):
    """Load an SD 1.x file with load_target_model and with diffusers' from_single_file (given a
    config folder written from our load); both must hold the same weights. Returns ours."""
    from diffusers import StableDiffusionPipeline

    from library.model_util import save_diffusers_checkpoint

    models = load_target_model(path)
    assert not models.v2
    config_dir = save_diffusers_checkpoint(False, tmp_path / "cfg", models.text_encoder, models.unet, models.vae)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        ours = getattr(models, name).state_dict()
        theirs = getattr(pipe, name).state_dict()
        shared = [key for key in ours if key in theirs]
        assert len(shared) >= 0.9 * len(ours), name
        for key in shared:
            assert torch.equal(ours[key].float(), theirs[key].float()), (name, key)
    return models


def test_shipped_model_file(tmp_path):
    """models/tiny_shapes_sd.safetensors: the documented command's defaults, fp16, at most 25 MB,
    and it loads in our loader and in diffusers."""
    import json
    from dataclasses import asdict

    from safetensors import safe_open

    from library.shape_quality import SHIPPED_MODEL

    assert SHIPPED_MODEL.stat().st_size <= 25_000_000
    with safe_open(str(SHIPPED_MODEL), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        metadata = f.metadata()
    assert dtypes == {"F16"}
    assert json.loads(metadata["tiny_base_model.config"]) == json.loads(json.dumps(asdict(TinyBaseConfig())))
    models = _load_in_ours_and_diffusers(SHIPPED_MODEL, tmp_path)
    assert list(models.unet.config.block_out_channels) == list(TinyBaseConfig().unet_channels)
    assert models.unet.config.cross_attention_dim == models.text_encoder.config.hidden_size == 64


def test_rescaled_latents_fit_sd_scaling_factor(toy_run):
    models = load_target_model(toy_run.path)
    images, _ = make_dataset(TinyBaseConfig(**TOY))
    latents = encode_latents(models.vae, images) * VAE_SCALING_FACTOR
    assert latents.std().item() == pytest.approx(1.0, rel=0.05)  # fp16 rounding only


def test_rescale_keeps_reconstructions():
    torch.manual_seed(0)
    _, vae, _ = build_models(TinyBaseConfig(**TOY))
    images, _ = make_dataset(TinyBaseConfig(**TOY))
    with torch.no_grad():
        before = vae.encode(images).latent_dist
        decoded = vae.decode(before.mean).sample
        rescale_latent_space(vae, 3.0)
        after = vae.encode(images).latent_dist
        assert torch.allclose(after.mean, 3.0 * before.mean, atol=1e-5)
        assert torch.allclose(after.std, 3.0 * before.std, rtol=1e-4)
        assert torch.allclose(vae.decode(after.mean).sample, decoded, atol=1e-4)  # float rounding


def test_same_seed_same_weights(tmp_path):
    again = train_tiny_base_model(TinyBaseConfig(**{**TOY, "vae_steps": 1, "unet_steps": 1}), tmp_path / "a.safetensors")
    again2 = train_tiny_base_model(TinyBaseConfig(**{**TOY, "vae_steps": 1, "unet_steps": 1}), tmp_path / "b.safetensors")
    assert again.vae_losses == again2.vae_losses and again.unet_losses == again2.unet_losses
    from safetensors import safe_open
    from safetensors.torch import load_file

    first, second = load_file(again.path), load_file(again2.path)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # (the header's key order is not stable across writes, so the bytes are not compared)
    with safe_open(str(again.path), "pt") as f1, safe_open(str(again2.path), "pt") as f2:
        assert f1.metadata() == f2.metadata()


def test_cli_errors_are_one_line(tmp_path):
    for argv, message in (
        ([str(tmp_path / "model.bin")], "must be a .safetensors or .ckpt"),
        ([str(tmp_path / "m.safetensors"), "--vae_channels", "32,48,64,64"], "multiples of 32"),
        ([str(tmp_path / "m.safetensors"), "--unet_steps", "0"], "--unet_steps must be at least 1"),
    ):
        result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_docs_worked_example_runs(tmp_path):
    """docs/tiny_model.md's worked example, with its demo_output/ paths moved to tmp_path."""
    import json
    import shlex

    doc = (ROOT / "docs" / "tiny_model.md").read_text(encoding="utf-8")
    line = next(l for l in doc.splitlines() if l.startswith("python3 tools/train_tiny_base_model.py demo_output/"))
    argv = [a.replace("demo_output/", f"{tmp_path}/") for a in shlex.split(line)[2:]]
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    log = json.loads((tmp_path / "toy_shapes.json").read_text(encoding="utf-8"))
    assert len(log["vae_losses"]) == 3 and len(log["unet_losses"]) == 3 and log["threads"] == 1
    models = load_target_model(tmp_path / "toy_shapes.safetensors")
    assert list(models.vae.config.block_out_channels) == [32] * 4
