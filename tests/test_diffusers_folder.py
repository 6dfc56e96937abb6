"""library/diffusers_folder.py: a Diffusers folder read tensor by tensor equals what
diffusers / transformers' from_pretrained loads (values, mappings, training results), casts fp8
weights as read, and falls back to from_pretrained for folders laid out otherwise."""
from __future__ import annotations

import sys

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
from library import diffusers_folder, model_util, train_core
from library.tiny_sd import write_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("folder"), formats=("diffusers",), seed=0)["diffusers"]


def _reference(folder, dtype=torch.float32):
    return {
        "unet": UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=dtype),
        "vae": AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtype),
        "text_encoder": CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", dtype=dtype),
    }


def _no_from_pretrained(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_folder_models_equal_from_pretrained(folder, monkeypatch, dtype):
    reference = _reference(folder, dtype)
    _no_from_pretrained(monkeypatch)
    unet, vae, text_encoder = diffusers_folder.load_folder_models(folder, dtype)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        ours, theirs = model.state_dict(), reference[name].state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours), name
    assert dict(unet.config) == dict(reference["unet"].config) and dict(vae.config) == dict(reference["vae"].config)
    assert text_encoder.config.to_dict() == reference["text_encoder"].config.to_dict()
    assert diffusers_folder.load_folder_models(folder, dtype, with_vae=False)[1] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_folder_tensors_are_mapped_as_from_pretrained_maps_them(folder):
    unet, vae, text_encoder = diffusers_folder.load_folder_models(folder, torch.float32)
    for model in (unet, vae, text_encoder):
        assert all(".safetensors" in th.mapping_of(p) for p in model.parameters())
    # cast tensors are read: fp16 copies, fp8 layers
    unet, _, _ = diffusers_folder.load_folder_models(folder, torch.float16, with_vae=False)
    assert not any(".safetensors" in th.mapping_of(p) for p in unet.parameters())
    unet, _, _ = diffusers_folder.load_folder_models(folder, torch.float32, with_vae=False, fp8_models=("unet",))
    for name, param in unet.named_parameters():
        assert (".safetensors" in th.mapping_of(param)) == (param.dtype == torch.float32), name


def test_folder_in_another_layout_loads_through_from_pretrained(folder, tmp_path):
    import shutil

    copy = tmp_path / "bin_folder"
    shutil.copytree(folder, copy)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    (copy / "unet" / diffusers_folder.DIFFUSERS_WEIGHTS).unlink()
    unet.save_pretrained(str(copy / "unet"), safe_serialization=False)  # diffusion_pytorch_model.bin
    loaded, _, _ = diffusers_folder.load_folder_models(copy, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))


def test_lora_run_from_a_folder_trains_as_from_pretrained_did(folder, tmp_path, monkeypatch):
    img = th.make_image_folder(tmp_path, count=2, repeats=1)
    runs = {}
    for name in ("read", "from_pretrained"):
        if name == "from_pretrained":  # the loading before this module: every part through from_pretrained
            def through_from_pretrained(path, dtype, with_vae=True, **options):
                parts = {p: diffusers_folder._from_pretrained(path, p, dtype) for p in diffusers_folder.PARTS}
                return parts["unet"], parts["vae"] if with_vae else None, parts["text_encoder"]

            monkeypatch.setattr(diffusers_folder, "load_folder_models", through_from_pretrained)
        seen = {}
        hooks = train_core.TrainHooks(on_train_end=lambda ctx, seen=seen: seen.update(network=th.network_state(ctx)))
        argv = th.base_argv(folder, img, tmp_path / name, "--max_train_steps", "3", "--train_batch_size", "1")
        runs[name] = (th.run_train(argv, hooks).step_losses, seen["network"])
    (losses, network), (ref_losses, ref_network) = runs["read"], runs["from_pretrained"]
    assert losses == ref_losses
    assert network.keys() == ref_network.keys() and all(torch.equal(network[k], ref_network[k]) for k in network)


def test_broken_config_names_the_file(folder, tmp_path):
    import shutil

    from library.errors import UserError

    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    (copy / "unet" / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"unet.config\.json"):
        model_util.load_target_model(copy)
