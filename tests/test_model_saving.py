"""Whole-model saving for train_db.py / fine_tune.py: every format round-trips, loads in diffusers,
keeps the input VAE bit-identical, honours --save_precision and refuses impossible targets."""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors import safe_open

from library import model_saving, modelspec
from library.errors import UserError
from library.model_util import LdmFile, load_target_model


def _state(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, dtype=None) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        expected = sa[key] if dtype is None else sa[key].to(dtype)
        assert sb[key].dtype == expected.dtype, key
        assert torch.equal(expected, sb[key]), key


def _train_a_little(models) -> None:
    """Stand-in for training: the saved UNet / text encoder must differ from the input's."""
    with torch.no_grad():
        models.unet.conv_in.bias.add_(0.5)
        dict(models.text_encoder.named_parameters())[_final_norm_bias(models.text_encoder)].add_(0.25)


def _final_norm_bias(text_encoder: torch.nn.Module) -> str:
    return next(n for n, _ in text_encoder.named_parameters() if n.endswith("final_layer_norm.bias"))


@pytest.mark.parametrize(
    ("save_model_as", "v2"),
    [("ckpt", False), ("safetensors", True), ("diffusers", False), ("diffusers_safetensors", True), ("ckpt", True)],
)
def test_each_format_round_trips(save_model_as, v2, tmp_path, request):
    files = request.getfixturevalue(f"tiny_model_files_v{2 if v2 else 1}")
    models = load_target_model(files["safetensors"])
    _train_a_little(models)
    written = model_saving.save_trained_model(models, tmp_path / "out", save_model_as, epoch=1, global_step=7)
    again = load_target_model(written)
    assert again.v2 is v2
    _assert_same(models.unet, again.unet)
    _assert_same(models.text_encoder, again.text_encoder)
    _assert_same(load_target_model(files["safetensors"]).vae, again.vae)
    if save_model_as == "ckpt":
        assert written.suffix == ".ckpt" and again.ldm_metadata == {"epoch": 1, "global_step": 7}
    if save_model_as.startswith("diffusers"):
        suffix = "safetensors" if save_model_as.endswith("safetensors") else "bin"
        assert (written / "unet" / f"diffusion_pytorch_model.{suffix}").is_file()
        assert (written / "model_index.json").is_file() and (written / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.parametrize("v2", [False, True])
def test_single_file_keeps_ldm_layout_and_loads_in_diffusers(v2, tmp_path, request):
    from diffusers import StableDiffusionPipeline

    files = request.getfixturevalue(f"tiny_model_files_v{2 if v2 else 1}")
    models = load_target_model(files["safetensors"])
    _train_a_little(models)
    args = argparse.Namespace(output_name="my_model", resolution="64", v2=v2, v_parameterization=False)
    metadata = modelspec.metadata_from_args(args, modelspec.MODEL, 1_700_000_000.0)
    written = model_saving.save_trained_model(models, tmp_path / "my_model", "safetensors", metadata=metadata)
    with LdmFile(files["safetensors"]) as source, LdmFile(written) as saved:
        assert set(saved.keys()) == set(source.keys())  # the input's LDM layout (v2: OpenCLIP text encoder)
        te_key = "cond_stage_model.model.ln_final.bias" if v2 else "cond_stage_model.transformer.text_model.final_layer_norm.bias"
        assert torch.equal(saved.get(te_key), source.get(te_key) + 0.25)
    with safe_open(str(written), "pt") as handle:
        meta = handle.metadata()
    assert meta["modelspec.architecture"] == ("stable-diffusion-v2-512" if v2 else "stable-diffusion-v1")
    assert meta["modelspec.title"] == "my_model" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.implementation"] == modelspec.IMPL_STABILITY_AI

    pipe = StableDiffusionPipeline.from_single_file(
        str(written), config=str(files["diffusers"]), local_files_only=True, safety_checker=None
    )
    _assert_same(models.unet, pipe.unet)
    _assert_same(models.text_encoder, pipe.text_encoder)


def test_diffusers_folder_runs_in_stable_diffusion_pipeline(tmp_path, tiny_model_files_v1):
    from diffusers import StableDiffusionPipeline

    models = load_target_model(tiny_model_files_v1["ckpt"])  # a single-file input: support files written offline
    _train_a_little(models)
    written = model_saving.save_trained_model(models, tmp_path / "folder", "diffusers_safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(str(written), local_files_only=True)
    _assert_same(models.unet, pipe.unet)
    _assert_same(models.text_encoder, pipe.text_encoder)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    image = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_save_precision_fp16_writes_fp16_and_vae_is_the_input_vae(tmp_path, tiny_model_files_v1):
    models = load_target_model(tiny_model_files_v1["safetensors"])
    input_vae = load_target_model(tiny_model_files_v1["safetensors"]).vae
    models.vae.to(torch.bfloat16)  # training cast the in-memory VAE: that copy must not be saved
    written = model_saving.save_trained_model(models, tmp_path / "half", "safetensors", save_dtype=torch.float16)
    with LdmFile(written) as saved:
        floats = [saved.get(k) for k in saved.keys() if saved.get(k).is_floating_point()]
        assert floats and all(t.dtype == torch.float16 for t in floats)
    _assert_same(input_vae, load_target_model(written, dtype=torch.float16).vae, dtype=torch.float16)

    full = model_saving.save_trained_model(models, tmp_path / "full", "safetensors")
    _assert_same(input_vae, load_target_model(full).vae)  # bit-identical at the input's precision


def test_vae_flag_and_fp16_stored_vae_written_bit_identical(tmp_path, tiny_model_files_v1):
    from library.tiny_sd import write_tiny_model

    other = write_tiny_model(tmp_path / "other", v2=False, formats=("diffusers",), seed=3)["diffusers"]
    other_vae = load_target_model(other).vae
    other_vae.to(torch.float16).save_pretrained(tmp_path / "vae16")  # a VAE stored in fp16
    models = load_target_model(tiny_model_files_v1["safetensors"], vae=tmp_path / "vae16")
    assert model_saving.stored_vae_dtype(tmp_path / "vae16") == torch.float16
    written = model_saving.save_trained_model(models, tmp_path / "with_vae", "ckpt", vae_path=tmp_path / "vae16")
    with LdmFile(written) as saved:
        assert saved.get("first_stage_model.encoder.conv_in.weight").dtype == torch.float16
    _assert_same(other_vae.to(torch.float16), load_target_model(written, dtype=torch.float16).vae)


def test_format_follows_the_input_and_use_safetensors(tmp_path, tiny_model_files_v1):
    resolve = model_saving.resolve_save_model_as
    assert resolve(None, False, tiny_model_files_v1["ckpt"]) == "ckpt"
    assert resolve(None, True, tiny_model_files_v1["ckpt"]) == "safetensors"
    assert resolve(None, False, tiny_model_files_v1["safetensors"]) == "safetensors"
    assert resolve(None, False, tiny_model_files_v1["diffusers"]) == "diffusers"
    assert resolve(None, True, tiny_model_files_v1["diffusers"]) == "diffusers_safetensors"
    assert resolve("ckpt", True, tiny_model_files_v1["diffusers"]) == "ckpt"
    assert model_saving.model_extension("diffusers") == "" and model_saving.model_extension("ckpt") == ".ckpt"


def test_impossible_targets_are_refused_and_keep_what_is_there(tmp_path, tiny_model_files_v1):
    existing = tmp_path / "last"
    existing.write_text("precious", encoding="utf-8")
    with pytest.raises(UserError, match="existing file"):
        model_saving.check_output_target(existing, "diffusers")
    folder = tmp_path / "last.safetensors"
    folder.mkdir()
    with pytest.raises(UserError, match="existing folder"):
        model_saving.check_output_target(folder, "safetensors")
    models = load_target_model(tiny_model_files_v1["safetensors"])
    with pytest.raises(UserError):
        model_saving.save_trained_model(models, existing, "diffusers")
    assert existing.read_text(encoding="utf-8") == "precious"


def test_diffusers_v2_input_to_single_file(tmp_path, tiny_model_files_v2):
    from diffusers import StableDiffusionPipeline

    models = load_target_model(tiny_model_files_v2["diffusers"])
    _train_a_little(models)
    written = model_saving.save_trained_model(models, tmp_path / "v2", "safetensors")
    with LdmFile(written) as saved:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in saved  # OpenCLIP layout
    again = load_target_model(written)
    assert again.v2
    _assert_same(models.unet, again.unet)
    _assert_same(models.text_encoder, again.text_encoder)
    _assert_same(load_target_model(tiny_model_files_v2["diffusers"]).vae, again.vae)
    pipe = StableDiffusionPipeline.from_single_file(
        str(written), config=str(tiny_model_files_v2["diffusers"]), local_files_only=True, safety_checker=None
    )
    _assert_same(models.unet, pipe.unet)
