"""tools/convert_diffusers20_original_sd.py end to end, both directions, via main(argv)."""
from __future__ import annotations

import json

import pytest
import torch

from library.cli import run_main
from library.errors import UserError
from library.model_util import LdmFile, load_target_model
from tools.convert_diffusers20_original_sd import main


def _ldm_state(path):
    with LdmFile(path) as ldm:
        return {k: ldm.get(k).clone() for k in ldm.keys()}


def _same_weights(model_a, model_b):
    a, b = model_a.state_dict(), model_b.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_to_diffusers_and_back_v1(tmp_path, tiny_model_files_v1):
    source = tiny_model_files_v1["safetensors"]
    main([str(source), str(tmp_path / "diffusers"), "--v1", "--use_safetensors"])
    assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "diffusers" / "model_index.json").is_file()
    main([str(tmp_path / "diffusers"), str(tmp_path / "back.safetensors")])
    original, back = _ldm_state(source), _ldm_state(tmp_path / "back.safetensors")
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_v2_to_diffusers_projection_layout(tmp_path, tiny_model_files_v2, tiny_models_v2):
    source = tiny_model_files_v2["ckpt"]
    # sd-scripts default: SD2 UNet written with Conv 1x1 proj_in/out
    main([str(source), str(tmp_path / "conv"), "--v2"])
    config = json.loads((tmp_path / "conv" / "unet" / "config.json").read_text(encoding="utf-8"))
    assert config["use_linear_projection"] is False
    main([str(source), str(tmp_path / "linear"), "--v2", "--unet_use_linear_projection"])
    config = json.loads((tmp_path / "linear" / "unet" / "config.json").read_text(encoding="utf-8"))
    assert config["use_linear_projection"] is True
    conv_model = load_target_model(tmp_path / "conv")
    linear_model = load_target_model(tmp_path / "linear")
    assert conv_model.v2 and linear_model.v2
    assert conv_model.unet.state_dict()["mid_block.attentions.0.proj_in.weight"].dim() == 4
    assert _same_weights(linear_model.unet, tiny_models_v2[0])
    # both give the same UNet output, and both convert back to the same LDM file
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_conv = conv_model.unet(latents, 10, encoder_hidden_states=context).sample
        out_linear = linear_model.unet(latents, 10, encoder_hidden_states=context).sample
    assert torch.allclose(out_conv, out_linear, atol=1e-5)
    main([str(tmp_path / "conv"), str(tmp_path / "from_conv.safetensors")])
    original, back = _ldm_state(source), _ldm_state(tmp_path / "from_conv.safetensors")
    assert set(original) == set(back) and all(torch.equal(original[k], back[k]) for k in original)


def test_ckpt_to_ckpt_keeps_source_keys_and_adds_counters(tmp_path, tiny_model_files_v1):
    state = _ldm_state(tiny_model_files_v1["safetensors"])
    state["betas"] = torch.linspace(0.0, 1.0, 1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    source = tmp_path / "source.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 300}, source)
    out = tmp_path / "out.ckpt"
    main([str(source), str(out), "--epoch", "2", "--global_step", "20"])
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 5 and saved["global_step"] == 320
    assert set(saved["state_dict"]) == set(state)
    assert torch.equal(saved["state_dict"]["betas"], state["betas"])


@pytest.mark.parametrize(
    "flags, dtype",
    [(["--fp16"], torch.float16), (["--save_precision_as", "bf16"], torch.bfloat16), (["--fp16", "--float"], torch.float32)],
)
def test_precision_flags(flags, dtype, tmp_path, tiny_model_files_v1):
    out = tmp_path / "out.safetensors"
    main([str(tiny_model_files_v1["ckpt"]), str(out), *flags])
    state = _ldm_state(out)
    assert {t.dtype for k, t in state.items() if k.startswith("model.diffusion_model.")} == {dtype}


def test_diffusers_to_diffusers_with_reference_model(tmp_path, tiny_model_files_v1):
    folder = tiny_model_files_v1["diffusers"]
    reference = tmp_path / "reference"
    main([str(folder), str(reference)])
    scheduler_json = reference / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_json.read_text(encoding="utf-8"))
    config["_class_name"] = "DDIMScheduler"
    config["steps_offset"] = 7
    scheduler_json.write_text(json.dumps(config), encoding="utf-8")
    main([str(folder), str(tmp_path / "out"), "--reference_model", str(reference)])
    copied = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    assert copied["steps_offset"] == 7
    index = json.loads((tmp_path / "out" / "model_index.json").read_text(encoding="utf-8"))
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]


@pytest.mark.parametrize(
    "argv_tail, expected",
    [
        (["--v1", "--v2"], "--v1 and --v2"),
        (["--v2"], "--v2 was given"),
    ],
)
def test_flag_errors(argv_tail, expected, tmp_path, tiny_model_files_v1):
    with pytest.raises(UserError, match=expected):
        main([str(tiny_model_files_v1["safetensors"]), str(tmp_path / "out.ckpt"), *argv_tail])
    assert not (tmp_path / "out.ckpt").exists()


def test_v1_flag_on_v2_model(tmp_path, tiny_model_files_v2):
    with pytest.raises(UserError, match="--v1"):
        main([str(tiny_model_files_v2["safetensors"]), str(tmp_path / "out.ckpt"), "--v1"])


def test_run_main_prints_one_line_for_bad_input(tmp_path, capsys):
    missing = tmp_path / "missing.ckpt"
    code = run_main(main, [str(missing), str(tmp_path / "out.safetensors")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    bad_ext = run_main(main, [str(missing), str(tmp_path / "out.bin")])
    assert bad_ext == 1
