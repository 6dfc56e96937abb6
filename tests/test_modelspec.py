"""modelspec.* metadata: architecture ids, defaults from flags, and the LoRA files that carry them."""
from __future__ import annotations

import argparse
import datetime

import pytest
from safetensors import safe_open

import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
from library import modelspec


@pytest.mark.parametrize(
    ("v2", "v_param", "kind", "arch", "impl"),
    [
        (False, False, modelspec.MODEL, "stable-diffusion-v1", modelspec.IMPL_STABILITY_AI),
        (True, False, modelspec.MODEL, "stable-diffusion-v2-512", modelspec.IMPL_STABILITY_AI),
        (True, True, modelspec.MODEL, "stable-diffusion-v2-768-v", modelspec.IMPL_STABILITY_AI),
        (False, False, modelspec.LORA, "stable-diffusion-v1/lora", "diffusers"),
        (True, True, modelspec.LORA, "stable-diffusion-v2-768-v/lora", "diffusers"),
        (False, False, modelspec.TEXTUAL_INVERSION, "stable-diffusion-v1/textual-inversion", modelspec.IMPL_STABILITY_AI),
        (True, False, modelspec.TEXTUAL_INVERSION, "stable-diffusion-v2-512/textual-inversion", modelspec.IMPL_STABILITY_AI),
    ],
)
def test_architecture_implementation_and_prediction(v2, v_param, kind, arch, impl):
    meta = modelspec.build_metadata(kind, v2, v_param, 1_700_000_000.5)
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.implementation"] == impl
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.prediction_type"] == ("v" if v_param else "epsilon")
    assert meta["modelspec.resolution"] == ("768x768" if v2 and v_param else "512x512")
    default_title = {"model": "Checkpoint", "lora": "LoRA", "textual-inversion": "TextualInversion"}[kind]
    assert meta["modelspec.title"] == f"{default_title}@1700000000.5"
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(1_700_000_000).isoformat()
    assert all(isinstance(v, str) for v in meta.values())
    assert "modelspec.timestep_range" not in meta and "modelspec.encoder_layer" not in meta


def test_metadata_from_args_uses_flags():
    parser = argparse.ArgumentParser()
    modelspec.add_metadata_arguments(parser)
    args = parser.parse_args(["--metadata_author", "me", "--metadata_tags", "a,b", "--metadata_license", "MIT"])
    args.output_name, args.resolution, args.clip_skip = "mymodel", "512,768", 2
    args.min_timestep, args.max_timestep, args.v2, args.v_parameterization = 100, None, True, False
    meta = modelspec.metadata_from_args(args, modelspec.MODEL, 0.0)
    assert meta["modelspec.title"] == "mymodel"
    assert meta["modelspec.resolution"] == "512x768"
    assert meta["modelspec.timestep_range"] == "100,1000"
    assert meta["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.author"] == "me" and meta["modelspec.tags"] == "a,b" and meta["modelspec.license"] == "MIT"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512"
    assert "modelspec.description" not in meta
    args.metadata_title = "Nice title"
    assert modelspec.metadata_from_args(args, modelspec.LORA, 0.0)["modelspec.title"] == "Nice title"


def test_resolution_strings():
    assert modelspec.resolution_string("64") == "64x64"
    assert modelspec.resolution_string((64, 32)) == "64x32"
    assert modelspec.resolution_string(96) == "96x96"
    assert modelspec.resolution_string(None, v2=True) == "512x512"
    with pytest.raises(ValueError):
        modelspec.architecture(False, False, "vae")


def test_lora_file_carries_modelspec_beside_ss_keys(tmp_path):
    model = th.make_tiny_model(tmp_path)
    img = th.make_image_folder(tmp_path, count=2, repeats=1)
    out = tmp_path / "out"
    th.run_train(th.base_argv(model, img, out, "--max_train_steps", "1", "--metadata_author", "tester"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "lora"  # --output_name
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.author"] == "tester"
    assert meta["ss_network_module"] == "networks.lora" and "sshs_model_hash" in meta


def test_tool_output_metadata_reads_the_base_model_and_carries_one_inputs_keys():
    v2_768 = {"ss_v2": "True", "ss_v_parameterization": "True", "modelspec.author": "me", "modelspec.resolution": "768x640"}
    spec = modelspec.tool_output_metadata(modelspec.LORA, "out/resized.safetensors", sources=[v2_768], timestamp=0)
    assert spec["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert spec["modelspec.prediction_type"] == "v"
    assert spec["modelspec.title"] == "resized" and spec["modelspec.author"] == "me"
    assert spec["modelspec.resolution"] == "768x640"
    # architecture from modelspec.architecture when there are no ss_* keys; merged inputs carry nothing
    from_spec = {"modelspec.architecture": "stable-diffusion-v2-512/lora", "modelspec.author": "me"}
    merged = modelspec.tool_output_metadata(
        modelspec.LORA, "m.safetensors", sources=[from_spec, {}], merged_from=["a/x.safetensors", "y.pt"], timestamp=0
    )
    assert merged["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert merged["modelspec.merged_from"] == "x, y" and "modelspec.author" not in merged
    # with_tool_modelspec replaces every old modelspec key and keeps the rest
    old = {"ss_network_dim": "4", "modelspec.title": "old", "modelspec.merged_from": "stale"}
    new = modelspec.with_tool_modelspec(old, modelspec.LORA, "new.safetensors", v2=False)
    assert new["ss_network_dim"] == "4" and new["modelspec.title"] == "new" and "modelspec.merged_from" not in new
