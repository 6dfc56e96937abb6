"""`--fp8_base` / `--fp8_base_unet` (library/fp8_layers.py): frozen Linear / Conv2d weights stored
in fp8, the layers' values against an upcast reference, what the backward keeps, loading, and a
LoRA run on the tiny model."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
import train_db
import train_network
from library import fp8_layers, model_util, train_core
from library.errors import UserError
from library.tiny_sd import build_tiny_models

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_base")
    return {"model": th.make_tiny_model(root), "img": th.make_image_folder(root), "root": root}


def _reference(layer: nn.Module) -> nn.Module:
    """A plain copy of `layer` whose weight is the fp8-rounded weight, upcast."""
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.weight.copy_(layer.weight.to(FP8).float())
    return ref


def _forward_backward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    grad = torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)
    y.backward(grad)
    return y.detach(), x.grad


LAYERS = [
    (lambda: nn.Linear(64, 32), (2, 7, 64)),
    (lambda: nn.Conv2d(16, 8, 3, padding=1), (2, 16, 9, 9)),
    (lambda: nn.Conv2d(16, 8, 3, stride=2, padding=1), (1, 16, 8, 8)),
    (lambda: nn.Conv2d(16, 16, 1), (1, 16, 5, 5)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
def test_fp8_layer_equals_the_upcast_weight_bit_for_bit(make, shape):
    torch.manual_seed(0)
    layer = make().requires_grad_(False)
    reference = _reference(layer)
    assert fp8_layers.store_layers_in_fp8(layer) == 1
    assert layer.weight.dtype == FP8 and layer.bias.dtype == torch.float32 and not layer.weight.requires_grad
    x = torch.randn(shape)
    inputs = [x] + ([x.to(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    for item in inputs:
        out, grad = _forward_backward(layer, item)
        ref_out, ref_grad = _forward_backward(reference, item)
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
        assert grad.stride() == ref_grad.stride()
    # under autocast the layer computes in the autocast dtype, as the plain layer does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grad = _forward_backward(layer, x)
        ref_out, ref_grad = _forward_backward(reference, x)
    assert out.dtype == ref_out.dtype == torch.bfloat16 and grad.dtype == torch.float32
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)


def test_backward_keeps_the_fp8_weight_not_an_upcast_copy():
    """The point of the autograd function: what a step keeps for the backward holds no
    full-precision weight (with torch.autocast over fp8 weights it would hold one per layer)."""
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).requires_grad_(False)
    fp8_layers.store_layers_in_fp8(stack)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = stack(torch.randn(3, 256, requires_grad=True))
    assert len(saved) == 4 and all(t.dtype == FP8 and t.shape == (256, 256) for t in saved)
    weights = {layer.weight.data_ptr() for layer in stack}
    assert {t.data_ptr() for t in saved} == weights  # the layers' own storage, no copy
    y.sum().backward()


def test_store_layers_in_fp8_on_the_tiny_unet_and_text_encoder():
    unet, _, text_encoder = build_tiny_models(v2=False, seed=0)
    for model in (unet, text_encoder):
        layers = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
        assert fp8_layers.store_layers_in_fp8(model) == len(layers) > 0
        assert all(m.weight.dtype == FP8 for m in layers)
        others = [p for n, p in model.named_parameters() if p.dtype != FP8]
        assert others and all(p.dtype == torch.float32 for p in others)  # norms, embeddings, biases
        assert fp8_layers.compute_dtype(model) == torch.float32
        fp8_layers.cast_model(model, torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {FP8, torch.bfloat16}
        assert fp8_layers.compute_dtype(model) == torch.bfloat16
    embeddings = text_encoder.get_input_embeddings().weight
    assert embeddings.dtype == torch.bfloat16


@pytest.mark.parametrize("source", ["safetensors", "diffusers"])
def test_load_target_model_stores_fp8_weights_with_the_file_values(tmp_path, source):
    from library.tiny_sd import write_tiny_model

    path = write_tiny_model(tmp_path, formats=(source,), seed=0)[source]
    plain = model_util.load_target_model(path, map_token_embedding=True, map_frozen_weights="exact")
    fp8 = model_util.load_target_model(
        path, map_token_embedding=True, map_frozen_weights="exact", fp8_models=("unet", "text_encoder")
    )
    for name in ("unet", "text_encoder"):
        reference = dict(getattr(plain, name).named_parameters())
        layers = fp8_layers.layer_weight_keys(getattr(fp8, name))
        for key, tensor in getattr(fp8, name).named_parameters():
            if key in layers:
                assert tensor.dtype == FP8 and torch.equal(tensor, reference[key].to(FP8)), key
                assert ".safetensors" not in th.mapping_of(tensor), key  # read and cast, never a view of the file
            else:
                assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[key]), key
    assert fp8.vae.encoder.conv_in.weight.dtype == torch.float32  # the VAE is never fp8
    only_unet = model_util.load_target_model(path, fp8_models=("unet",))
    assert only_unet.unet.conv_in.weight.dtype == FP8
    assert {p.dtype for p in only_unet.text_encoder.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="fp8_models"):
        model_util.load_target_model(path, fp8_models=("vae",))


def _dtypes_at_start(seen: dict):
    def record(ctx):
        seen["unet"] = {p.dtype for p in ctx.models.unet.parameters()}
        seen["text_encoder"] = {p.dtype for p in ctx.models.text_encoder.parameters()}
    return train_core.TrainHooks(on_train_start=record)


def test_lora_run_with_fp8_base_trains_samples_and_saves(workspace, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog --w 64 --h 64 --d 7 --s 2\n", encoding="utf-8")
    runs, seen = {}, {}
    for name, extra in {"plain": [], "fp8": ["--fp8_base", "--sample_prompts", str(prompts), "--sample_every_n_steps", "6"]}.items():
        seen[name] = {}
        argv = th.base_argv(workspace["model"], workspace["img"], tmp_path / name, "--max_train_steps", "6", *extra)
        runs[name] = th.run_train(argv, _dtypes_at_start(seen[name])).step_losses
    assert seen["plain"] == {"unet": {torch.float32}, "text_encoder": {torch.float32}}
    assert seen["fp8"] == {"unet": {torch.float32, FP8}, "text_encoder": {torch.float32, FP8}}
    plain, fp8 = np.array(runs["plain"]), np.array(runs["fp8"])
    assert np.isfinite(fp8).all() and not np.array_equal(plain, fp8)  # fp8 rounding changes the results...
    assert np.abs(fp8 - plain).max() < 0.05 * np.abs(plain).max()  # ...a little (measured 0.8 %)
    lora = load_file(str(tmp_path / "fp8" / "lora.safetensors"))
    plain_lora = load_file(str(tmp_path / "plain" / "lora.safetensors"))
    assert lora.keys() == plain_lora.keys() and all(t.dtype == torch.float32 for t in lora.values())
    assert any(lora[k].abs().sum() > 0 for k in lora if "lora_up" in k)
    with safe_open(str(tmp_path / "fp8" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_fp8_base"] == "True" and meta["ss_fp8_base_unet"] == "False"
    samples = sorted((tmp_path / "fp8" / "sample").glob("*.png"))
    assert len(samples) == 1 and np.asarray(Image.open(samples[0])).shape == (64, 64, 3)


def test_fp8_base_unet_with_bf16_and_gradient_checkpointing(workspace, tmp_path):
    seen: dict = {}
    runs = {}
    for name, extra in {"ckpt": ["--gradient_checkpointing"], "plain": []}.items():
        seen[name] = {}
        argv = th.base_argv(
            workspace["model"], workspace["img"], tmp_path / name, "--max_train_steps", "3",
            "--fp8_base_unet", "--mixed_precision", "bf16", *extra,
        )
        runs[name] = th.run_train(argv, _dtypes_at_start(seen[name])).step_losses
    assert seen["ckpt"] == {"unet": {torch.bfloat16, FP8}, "text_encoder": {torch.bfloat16}}
    assert np.isfinite(runs["ckpt"]).all()
    # the recomputed forward casts the same fp8 weights: checkpointing does not change the losses
    assert runs["ckpt"] == runs["plain"]
    with safe_open(str(tmp_path / "ckpt" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_fp8_base"] == "False" and meta["ss_fp8_base_unet"] == "True"


def test_trainers_that_train_the_base_refuse_fp8_base(workspace, tmp_path):
    from library import train_util

    argv = ["--pretrained_model_name_or_path", str(workspace["model"]), "--train_data_dir", str(workspace["img"]),
            "--output_dir", str(tmp_path / "out"), "--fp8_base"]
    with pytest.raises(UserError, match=r"^--fp8_base .*only train_network\.py"):
        train_util.parse_args_with_config(train_db.setup_parser(), argv)


def test_every_flag_is_documented():
    text = "".join((th.REPO_ROOT / "docs" / name).read_text(encoding="utf-8") for name in ("train_network.md", "training.md"))
    documented = set(re.findall(r"--[a-z0-9_]+", text))
    flags = {o for a in train_network.setup_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert not flags - documented, sorted(flags - documented)
