"""library/diffusers_folder.py: a Diffusers folder read tensor by tensor equals what
diffusers / transformers' from_pretrained loads, maps frozen weights as single files do, and
falls back to from_pretrained for folders laid out otherwise."""
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
def test_folder_frozen_weights_are_mapped_as_single_files_are(folder):
    unet, _, text_encoder = diffusers_folder.load_folder_models(folder, torch.float32, mapping="all")
    assert all("diffusion_pytorch_model.safetensors" in th.mapping_of(p) for p in unet.parameters())
    assert all("model.safetensors" in th.mapping_of(p) for p in text_encoder.parameters())
    unet, vae, text_encoder = diffusers_folder.load_folder_models(folder, torch.float32, map_token_embedding=True)
    assert not any(".safetensors" in th.mapping_of(p) for p in [*unet.parameters(), *vae.parameters()])
    mapped = {n for n, p in text_encoder.named_parameters() if "model.safetensors" in th.mapping_of(p)}
    assert [name.split("embeddings.")[-1] for name in mapped] == ["token_embedding.weight"]


def test_folder_in_another_layout_loads_through_from_pretrained(folder, tmp_path):
    import shutil

    copy = tmp_path / "bin_folder"
    shutil.copytree(folder, copy)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    (copy / "unet" / diffusers_folder.DIFFUSERS_WEIGHTS).unlink()
    unet.save_pretrained(str(copy / "unet"), safe_serialization=False)  # diffusion_pytorch_model.bin
    loaded, _, _ = diffusers_folder.load_folder_models(copy, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))


def test_lora_run_from_a_folder_trains_as_the_same_single_file(tmp_path):
    """Read tensor by tensor, a folder gives the results of the same model's single file bit for
    bit (from_pretrained's tensors were views of the file at its offsets, which rounded some
    products differently)."""
    paths = write_tiny_model(tmp_path, formats=("diffusers", "safetensors"), seed=0)
    img = th.make_image_folder(tmp_path, count=2, repeats=1)
    runs = {}
    for name, model in paths.items():
        seen = {}
        hooks = train_core.TrainHooks(on_train_end=lambda ctx, seen=seen: seen.update(network=th.network_state(ctx)))
        argv = th.base_argv(model, img, tmp_path / name, "--max_train_steps", "3", "--train_batch_size", "1")
        runs[name] = (th.run_train(argv, hooks).step_losses, seen["network"])
    (losses, network), (file_losses, file_network) = runs["diffusers"], runs["safetensors"]
    assert losses == file_losses
    assert network.keys() == file_network.keys() and all(torch.equal(network[k], file_network[k]) for k in network)


def test_broken_config_names_the_file(folder, tmp_path):
    import shutil

    from library.errors import UserError

    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    (copy / "unet" / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"unet.config\.json"):
        model_util.load_target_model(copy)
