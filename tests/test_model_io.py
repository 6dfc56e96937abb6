"""Loading and saving SD models: tiny v1/v2 in every format, round trips, diffusers interop."""
from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.model_util import load_target_model


def _same_weights(model_a: torch.nn.Module, model_b: torch.nn.Module) -> bool:
    a, b = model_a.state_dict(), model_b.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("kind", ["diffusers", "safetensors", "ckpt"])
def test_tiny_model_files_load_exactly(kind, v2, request):
    files = request.getfixturevalue(f"tiny_model_files_v{2 if v2 else 1}")
    models = load_target_model(files[kind], v2=v2 or None)
    unet, vae, text_encoder = request.getfixturevalue(f"tiny_models_v{2 if v2 else 1}")
    assert models.v2 is v2
    assert models.is_ldm_file is (kind != "diffusers")
    assert _same_weights(models.unet, unet)
    assert _same_weights(models.vae, vae)
    assert _same_weights(models.text_encoder, text_encoder)
    assert not models.unet.training and not models.vae.training and not models.text_encoder.training
    assert models.unet.config.use_linear_projection is v2
    if kind == "ckpt":
        assert models.ldm_metadata == {"epoch": 1, "global_step": 100}
    assert models.tokenizer.pad_token_id == (0 if v2 else 49407)


# ---------------------------------------------------------------- helpers
def _read_ldm(path):
    from library.model_util import LdmFile

    with LdmFile(path) as ldm:
        return {k: ldm.get(k).clone() for k in ldm.keys()}


def _assert_same_state(a: dict, b: dict):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _outputs(models_or_tuple, v2: bool):
    """UNet, VAE and text encoder outputs on fixed inputs."""
    if isinstance(models_or_tuple, tuple):
        unet, vae, text_encoder = models_or_tuple
    else:
        unet, vae, text_encoder = models_or_tuple.unet, models_or_tuple.vae, models_or_tuple.text_encoder
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0 if v2 else 49407] * 70])
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        eps = unet(latents, 500, encoder_hidden_states=hidden).sample
        posterior = vae.encode(image).latent_dist
        decoded = vae.decode(latents).sample
    return [hidden, eps, posterior.mean, posterior.logvar, decoded]


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_ldm_diffusers_ldm_round_trip_is_bit_identical(kind, v2, tmp_path, tiny_model_files_v1, tiny_model_files_v2):
    from library.model_util import save_diffusers_checkpoint, save_stable_diffusion_checkpoint

    source = (tiny_model_files_v2 if v2 else tiny_model_files_v1)[kind]
    models = load_target_model(source)
    folder = save_diffusers_checkpoint(v2, tmp_path / "diffusers", models.text_encoder, models.unet, models.vae)
    again = load_target_model(folder)
    out = save_stable_diffusion_checkpoint(v2, tmp_path / f"again.{kind}", again.text_encoder, again.unet, again.vae)
    _assert_same_state(_read_ldm(source), _read_ldm(out))


def _realistic_ldm(tiny_file, v2: bool) -> dict:
    """A tiny single file with what real SD files also hold: DDPM buffers, EMA copies,
    position_ids (v1) and a real (not copied) last OpenCLIP block and projection (v2)."""
    sd = _read_ldm(tiny_file)
    gen = torch.Generator().manual_seed(7)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"):
        sd[name] = torch.rand(1000, generator=gen)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.randn(
        sd["model.diffusion_model.input_blocks.0.0.weight"].shape, generator=gen
    )
    if v2:
        for key in [k for k in sd if ".resblocks.3." in k] + ["cond_stage_model.model.text_projection"]:
            sd[key] = torch.randn(sd[key].shape, generator=gen)
        sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    else:
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return sd


@pytest.mark.parametrize("v2", [False, True])
def test_save_with_source_ckpt_keeps_other_keys(v2, tmp_path, tiny_model_files_v1, tiny_model_files_v2):
    from library.model_util import save_diffusers_checkpoint, save_stable_diffusion_checkpoint

    files = tiny_model_files_v2 if v2 else tiny_model_files_v1
    realistic = _realistic_ldm(files["safetensors"], v2)
    source = tmp_path / "source.ckpt"
    torch.save({"state_dict": realistic, "epoch": 5, "global_step": 875000, "pytorch-lightning_version": "1.4.2"}, source)
    models = load_target_model(source)
    assert models.ldm_metadata == {"epoch": 5, "global_step": 875000}
    folder = save_diffusers_checkpoint(v2, tmp_path / "d", models.text_encoder, models.unet, models.vae)
    again = load_target_model(folder)
    out = save_stable_diffusion_checkpoint(
        v2, tmp_path / "out.ckpt", again.text_encoder, again.unet, again.vae, source_path=source, epoch=2, global_step=10
    )
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 7 and saved["global_step"] == 875010
    assert set(saved) == {"state_dict", "epoch", "global_step"}  # as sd-scripts writes it
    _assert_same_state(realistic, saved["state_dict"])
    # without a source: only UNet + VAE + TE; v1 drops position_ids, v2 fabricates the OpenCLIP extras
    bare = save_stable_diffusion_checkpoint(v2, tmp_path / "bare.safetensors", again.text_encoder, again.unet, again.vae)
    bare_sd = _read_ldm(bare)
    assert not any(k.startswith(("model_ema", "betas", "alphas")) for k in bare_sd)
    assert not any(k.endswith("position_ids") for k in bare_sd)
    if v2:
        block = "cond_stage_model.model.transformer.resblocks."
        assert torch.equal(bare_sd[f"{block}3.attn.in_proj_weight"], bare_sd[f"{block}2.attn.in_proj_weight"])
        assert torch.equal(bare_sd["cond_stage_model.model.text_projection"], torch.ones(64, 64))
        assert bare_sd["cond_stage_model.model.logit_scale"].item() == 1.0


def test_save_over_the_source_file(tmp_path, tiny_model_files_v1):
    from library.model_util import save_stable_diffusion_checkpoint

    path = tmp_path / "model.ckpt"
    path.write_bytes(tiny_model_files_v1["ckpt"].read_bytes())
    before = _read_ldm(path)
    models = load_target_model(path)
    with torch.no_grad():
        models.unet.conv_in.bias.add_(1.0)  # in-place training update must not touch the file
    assert torch.equal(_read_ldm(path)["model.diffusion_model.input_blocks.0.0.bias"], before["model.diffusion_model.input_blocks.0.0.bias"])
    save_stable_diffusion_checkpoint(False, path, models.text_encoder, models.unet, models.vae, source_path=path, epoch=1)
    after = torch.load(path, weights_only=True)
    assert after["epoch"] == 2 and after["global_step"] == 100
    key = "model.diffusion_model.input_blocks.0.0.bias"
    assert torch.equal(after["state_dict"][key], before[key] + 1.0)
    assert set(after["state_dict"]) == set(before)


def test_v1_text_encoder_keys_without_text_model_level(tmp_path, tiny_model_files_v1, tiny_models_v1):
    sd = _read_ldm(tiny_model_files_v1["safetensors"])
    prefix = "cond_stage_model.transformer.text_model."
    old_style = {("cond_stage_model.transformer." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    path = tmp_path / "old_style.ckpt"
    torch.save(old_style, path)  # no state_dict wrapper either
    models = load_target_model(path)
    assert _same_weights(models.text_encoder, tiny_models_v1[2])


# ---------------------------------------------------------------- interop with diffusers
@pytest.mark.parametrize("v2", [False, True])
def test_our_single_file_loads_in_diffusers_from_single_file(v2, tiny_model_files_v1, tiny_model_files_v2):
    from diffusers import StableDiffusionPipeline

    files = tiny_model_files_v2 if v2 else tiny_model_files_v1
    pipe = StableDiffusionPipeline.from_single_file(
        str(files["safetensors"]), config=str(files["diffusers"]), local_files_only=True, safety_checker=None
    )
    ours = load_target_model(files["safetensors"])
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(pipe, name), getattr(ours, name)), name
    # same weights; CPU kernels may round differently for differently aligned buffers
    for theirs_out, our_out in zip(_outputs((pipe.unet, pipe.vae, pipe.text_encoder), v2), _outputs(ours, v2)):
        assert torch.allclose(theirs_out, our_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("v2", [False, True])
def test_diffusers_save_pretrained_folder_loads_in_ours(v2, tmp_path, request):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from library.tokenizer_util import load_tokenizer

    unet, vae, text_encoder = request.getfixturevalue(f"tiny_models_v{2 if v2 else 1}")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(v2), unet=unet,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "pipe")
    ours = load_target_model(tmp_path / "pipe")
    assert ours.v2 is v2 and not ours.is_ldm_file
    assert _same_weights(ours.unet, unet) and _same_weights(ours.vae, vae) and _same_weights(ours.text_encoder, text_encoder)
    # same weights; CPU kernels may round differently for differently aligned buffers
    for expected, got in zip(_outputs((unet, vae, text_encoder), v2), _outputs(ours, v2)):
        assert torch.allclose(expected, got, rtol=0, atol=1e-5)


@pytest.mark.parametrize("v2", [False, True])
def test_our_diffusers_folder_runs_in_diffusers_pipeline(v2, request):
    import json

    from diffusers import StableDiffusionPipeline

    folder = request.getfixturevalue(f"tiny_model_files_v{2 if v2 else 1}")["diffusers"]
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    unet, vae, text_encoder = request.getfixturevalue(f"tiny_models_v{2 if v2 else 1}")
    assert _same_weights(pipe.unet, unet) and _same_weights(pipe.vae, vae) and _same_weights(pipe.text_encoder, text_encoder)
    image = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# ---------------------------------------------------------------- precision, formats, VAE override
def test_save_precision_fp16_and_load_dtype(tmp_path, tiny_model_files_v1):
    from library.model_util import precision_to_dtype, save_stable_diffusion_checkpoint

    models = load_target_model(tiny_model_files_v1["ckpt"])
    out = save_stable_diffusion_checkpoint(
        False, tmp_path / "half.safetensors", models.text_encoder, models.unet, models.vae,
        save_dtype=precision_to_dtype("fp16"), metadata={"ss_note": "x"},
    )
    half = _read_ldm(out)
    assert all(t.dtype == torch.float16 for t in half.values() if t.is_floating_point())
    loaded = load_target_model(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.unet.parameters())
    expected = models.unet.state_dict()["conv_in.weight"].half().to(torch.bfloat16)
    assert torch.equal(loaded.unet.state_dict()["conv_in.weight"], expected)
    assert all(p.requires_grad for p in loaded.unet.parameters())  # untouched by loading
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["ss_note"] == "x"
    # models given to the saver keep their dtype
    assert models.unet.conv_in.weight.dtype == torch.float32


@pytest.mark.parametrize("save_model_as", ["ckpt", "diffusers_safetensors"])
def test_save_model_all_formats(save_model_as, tmp_path, tiny_model_files_v2):
    from library.model_util import save_model

    models = load_target_model(tiny_model_files_v2["safetensors"], v2=True)
    written = save_model(models, tmp_path / "last", save_model_as, save_dtype=torch.bfloat16)
    if save_model_as in ("ckpt", "safetensors"):
        assert written == tmp_path / f"last.{save_model_as}"
    else:
        assert written.is_dir()
        weights = "diffusion_pytorch_model.safetensors" if save_model_as.endswith("safetensors") else "diffusion_pytorch_model.bin"
        assert (written / "unet" / weights).is_file()
    again = load_target_model(written)
    assert again.v2
    expected = models.unet.state_dict()["conv_in.weight"].to(torch.bfloat16).float()
    assert torch.equal(again.unet.state_dict()["conv_in.weight"], expected)


def test_vae_override_from_every_kind_of_vae_file(tmp_path, tiny_model_files_v1, tiny_models_v1):
    from diffusers import AutoencoderKL

    from library.model_util import load_vae, save_diffusers_checkpoint
    from library.tiny_sd import tiny_vae_config

    torch.manual_seed(5)
    other_vae = AutoencoderKL(**tiny_vae_config()).eval()
    other_unet, _, other_te = tiny_models_v1
    full = _read_ldm(tiny_model_files_v1["safetensors"])
    prefix = "first_stage_model."
    from library import sd_keys

    vae_sd = other_vae.state_dict()
    ldm_vae = sd_keys.model_to_ldm(sd_keys.vae_links(vae_sd, 4), vae_sd, False)
    bare = {k[len(prefix):]: v for k, v in ldm_vae.items()}
    from safetensors.torch import save_file

    save_file(bare, str(tmp_path / "vae_bare.safetensors"))
    torch.save({"state_dict": ldm_vae}, tmp_path / "vae_wrapped.ckpt")
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, str(tmp_path / "vae_diffusers_layout.safetensors"))
    old_names = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in vae_sd.items()}
    torch.save(old_names, tmp_path / "vae_old_diffusers.bin")
    folder = save_diffusers_checkpoint(False, tmp_path / "other", other_te, other_unet, other_vae)
    full_with_other_vae = {**full, **ldm_vae}
    save_file(full_with_other_vae, str(tmp_path / "full_other.safetensors"))
    for vae_path in ("vae_bare.safetensors", "vae_wrapped.ckpt", "vae_diffusers_layout.safetensors",
                     "vae_old_diffusers.bin", "other", "other/vae", "full_other.safetensors"):
        assert _same_weights(load_vae(tmp_path / vae_path), other_vae), vae_path
    models = load_target_model(tiny_model_files_v1["ckpt"], vae=tmp_path / "vae_bare.safetensors")
    assert _same_weights(models.vae, other_vae)
    assert _same_weights(models.unet, other_unet)


# ---------------------------------------------------------------- bad input
def _one_line_user_error(call, must_name):
    from library.errors import UserError

    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert str(must_name) in message
    return message


def test_bad_inputs_are_one_line_user_errors(tmp_path, tiny_model_files_v1, tiny_model_files_v2):
    from safetensors.torch import save_file

    from library.model_util import load_vae

    missing = tmp_path / "missing.safetensors"
    _one_line_user_error(lambda: load_target_model(missing), missing)

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4)}, str(sdxl))
    assert "SDXL" in _one_line_user_error(lambda: load_target_model(sdxl), sdxl)

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    msg = _one_line_user_error(lambda: load_target_model(lora), lora)
    assert "not a Stable Diffusion" in msg

    good = tiny_model_files_v1["safetensors"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    _one_line_user_error(lambda: load_target_model(truncated), truncated)

    truncated_ckpt = tmp_path / "truncated.ckpt"
    truncated_ckpt.write_bytes(tiny_model_files_v1["ckpt"].read_bytes()[:5000])
    _one_line_user_error(lambda: load_target_model(truncated_ckpt), truncated_ckpt)

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    _one_line_user_error(lambda: load_target_model(garbage), garbage)

    msg = _one_line_user_error(lambda: load_target_model(tiny_model_files_v1["ckpt"], v2=True), tiny_model_files_v1["ckpt"])
    assert "--v2" in msg
    _one_line_user_error(lambda: load_target_model(tiny_model_files_v1["diffusers"], v2=True), tiny_model_files_v1["diffusers"])
    # v2=False is sd-scripts' "flag not given": a v2 model is detected, not refused
    assert load_target_model(tiny_model_files_v2["safetensors"], v2=False).v2

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    _one_line_user_error(lambda: load_target_model(empty_dir), empty_dir)
    _one_line_user_error(lambda: load_vae(lora), lora)

    incomplete = tmp_path / "no_vae.safetensors"
    sd = {k: v for k, v in _read_ldm(tiny_model_files_v1["safetensors"]).items() if not k.startswith("first_stage_model.")}
    save_file(sd, str(incomplete))
    _one_line_user_error(lambda: load_target_model(incomplete), incomplete)
    # ...but with --vae it loads
    assert load_target_model(incomplete, vae=tiny_model_files_v1["diffusers"]).vae is not None


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    msg = _one_line_user_error(lambda: load_target_model(path), path)
    assert "open" in msg
    assert not marker.exists()


def test_models_are_built_empty_and_weights_assigned(monkeypatch, tiny_model_files_v2):
    """Loading never materialises a second (randomly initialised) copy of the weights."""
    from library import model_util

    seen = []
    original = model_util.assign_weights

    def recording(model, state_dict, source, what):
        seen.append((what, all(p.is_meta for p in model.parameters())))
        original(model, state_dict, source, what)
        # the model now holds exactly the converted tensors, not copies of them
        params = dict(model.named_parameters())
        assert all(params[k] is not None and params[k].data_ptr() == v.data_ptr() for k, v in state_dict.items() if k in params)

    monkeypatch.setattr(model_util, "assign_weights", recording)
    model_util.load_target_model(tiny_model_files_v2["ckpt"])
    assert sorted(seen) == [("UNet", True), ("VAE", True), ("text encoder", True)]


@pytest.mark.parametrize("v2", [False, True])
def test_inferred_configs_equal_the_tiny_configs(v2, request):
    from library import sd_config
    from library.tiny_sd import tiny_text_encoder_config, tiny_unet_config, tiny_vae_config

    files = request.getfixturevalue(f"tiny_model_files_v{2 if v2 else 1}")
    shapes = {k: tuple(v.shape) for k, v in _read_ldm(files["safetensors"]).items()}
    unet_config = sd_config.infer_unet_config(shapes, v2)
    expected = tiny_unet_config(v2)
    for key, value in expected.items():
        if key != "sample_size":  # not stored in the weights
            assert unet_config[key] == value, key
    vae_config = sd_config.infer_vae_config(shapes)
    assert {k: v for k, v in vae_config.items() if k != "sample_size"} == {
        k: v for k, v in tiny_vae_config().items() if k != "sample_size"
    }
    te_expected = tiny_text_encoder_config(v2).to_dict()
    for key, value in sd_config.infer_text_encoder_config(shapes, v2).items():
        assert te_expected[key] == value, key


def test_scheduler_configs():
    from diffusers import DDPMScheduler

    from library import sd_config

    scheduler = DDPMScheduler(**sd_config.DDPM_SCHEDULER_CONFIG)
    expected = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    assert torch.allclose(scheduler.betas, expected)
    assert scheduler.config.clip_sample is False and scheduler.config.prediction_type == "epsilon"
    assert sd_config.diffusers_scheduler_config(False)[0] == "PNDMScheduler"
    name, config = sd_config.diffusers_scheduler_config(True)
    assert name == "DDIMScheduler" and config["prediction_type"] == "v_prediction"
    assert sd_config.diffusers_scheduler_config(True, v_parameterization=False)[1]["prediction_type"] == "epsilon"


def test_safetensors_reader_matches_the_safetensors_library(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from library.model_util import SafetensorsReader

    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2, 3).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(0.5),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False, True]),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"note": "x"})
    reader = SafetensorsReader(path)
    expected = load_file(str(path))
    assert reader.metadata == {"note": "x"}
    assert reader.shapes == {k: tuple(v.shape) for k, v in expected.items()}
    for key, value in expected.items():
        got = reader.get_tensor(key)
        assert got.dtype == value.dtype and torch.equal(got, value), key
    reader.close()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        SafetensorsReader(truncated)
