"""The LoRA run's default mapping of frozen weights (`library/weight_mapping.py`): everything but
the layers that can become matrix-vector products is mapped from the file, and training gives
bit-identical results to reading every weight, even when the file's data is misaligned."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
from library import model_util, train_core, weight_mapping
from library.tiny_sd import tiny_unet_config

LEVELS = 4  # SD 1.x/2.x (and the tiny model): four resolution levels


@pytest.mark.parametrize(
    "key, level",
    [
        ("conv_in.weight", 0),
        ("conv_out.bias", 0),
        ("time_embedding.linear_1.weight", None),
        ("down_blocks.0.resnets.0.time_emb_proj.weight", None),
        ("up_blocks.3.resnets.2.time_emb_proj.bias", None),
        ("down_blocks.0.attentions.0.proj_in.weight", 0),
        ("down_blocks.2.resnets.1.conv1.weight", 2),
        ("down_blocks.2.downsamplers.0.conv.weight", 3),  # writes the next level
        ("down_blocks.3.resnets.0.conv2.weight", 3),
        ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", 3),
        ("up_blocks.0.resnets.2.conv_shortcut.weight", 3),
        ("up_blocks.0.upsamplers.0.conv.weight", 2),  # convolves after doubling
        ("up_blocks.1.attentions.2.proj_out.weight", 2),
        ("up_blocks.3.attentions.0.transformer_blocks.0.ff.net.2.weight", 0),
    ],
)
def test_unet_level_of_each_kind_of_key(key, level):
    assert weight_mapping.unet_level(key, LEVELS) == level


def test_smallest_latent_side_is_the_smallest_longer_side():
    assert weight_mapping.smallest_latent_side([(512, 512), (64, 128), (512, 768)]) == 16
    assert weight_mapping.smallest_latent_side([(60, 8)]) == 8  # rounds up, like the VAE's latent
    assert weight_mapping.smallest_latent_side([]) == 1  # unknown: every level may be 1x1


def _unet_keys() -> list[str]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(tiny_unet_config())
    return list(unet.state_dict())


def test_maps_exactly_reads_what_can_be_a_vector_product():
    keys = _unet_keys()
    per_sample = {k for k in keys if weight_mapping.unet_level(k, LEVELS) is None}
    assert per_sample and all("time_emb" in k for k in per_sample)
    # 512 px (latent 64, 8x8 at the deepest level): only the per-sample embedding layers are read
    assert {k for k in keys if not weight_mapping.maps_exactly(k, LEVELS, 64)} == per_sample
    # 64 px (latent 8): the deepest level is 1x1, so its layers are read as well
    deepest = {k for k in keys if weight_mapping.unet_level(k, LEVELS) == 3}
    assert {k for k in keys if not weight_mapping.maps_exactly(k, LEVELS, 8)} == per_sample | deepest
    assert any(k.startswith("mid_block.attentions.") for k in deepest)
    # a 2x2 deepest level (latent 9-16) is a matrix product again
    assert {k for k in keys if not weight_mapping.maps_exactly(k, LEVELS, 9)} == per_sample
    assert not any(weight_mapping.maps_exactly(k, LEVELS, 1) for k in keys)  # 8 px: nothing mapped


def test_load_target_model_rejects_an_unknown_mapping(tmp_path):
    with pytest.raises(ValueError, match="map_frozen_weights"):
        model_util.load_target_model(tmp_path / "missing.safetensors", map_frozen_weights="some")


@pytest.fixture(scope="module", params=[False, True], ids=["v1", "v2"])
def misaligned(request, tmp_path_factory):
    """The tiny model (SD 1.x, and 2.x with its Linear proj_in/out) with its data starting at
    24 mod 64 (as the full-size bench file does), so that mapped tensors are not 64-byte aligned;
    plus an image folder."""
    root = tmp_path_factory.mktemp("misaligned")
    source = th.make_tiny_model(root, v2=request.param)
    with safe_open(str(source), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata() or {}
    for pad in range(64):  # the header is JSON padded to 8 bytes; a metadata string shifts it
        data = save(tensors, {**metadata, "pad": "x" * pad})
        if (8 + int.from_bytes(data[:8], "little")) % 64 == 24:
            break
    else:
        raise AssertionError("no padding gives data at 24 mod 64")
    path = root / "misaligned.safetensors"
    path.write_bytes(data)
    return {"model": path, "img": th.make_image_folder(root, count=2, repeats=1), "v2": request.param}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_exact_mapping_maps_all_but_the_vector_layers(misaligned):
    path = misaligned["model"]
    file = str(path.resolve())
    models = model_util.load_target_model(path, map_frozen_weights="exact", smallest_latent_side=8)
    read = model_util.load_target_model(path)
    read_params = dict(read.unet.named_parameters())
    for name, tensor in models.unet.named_parameters():
        assert (th.mapping_of(tensor) == file) == weight_mapping.maps_exactly(name, LEVELS, 8), name
        assert torch.equal(tensor, read_params[name]), name
    # 77 tokens per sample: all of the text encoder is mapped, except what SD 2.x stores fused
    # (OpenCLIP's in_proj holds q, k and v: split tensors are read)
    fused = ("q_proj.", "k_proj.", "v_proj.") if misaligned["v2"] else ()
    for name, tensor in models.text_encoder.named_parameters():
        assert (th.mapping_of(tensor) == file) == (not any(part in name for part in fused)), name
    assert all(th.mapping_of(t) != file for t in models.vae.parameters())
    assert th.mapping_of(models.unet.time_embedding.linear_1.weight) != file
    assert th.mapping_of(models.unet.mid_block.attentions[0].proj_in.weight) != file
    assert th.mapping_of(models.unet.down_blocks[0].attentions[0].proj_in.weight) == file


def test_default_lora_run_trains_bit_identically_to_reading_every_weight(misaligned, tmp_path, monkeypatch):
    import train_network

    def run(out, *extra):
        seen = {}

        def at_start(ctx):
            seen["unaligned"] = {n for n, p in ctx.models.unet.named_parameters() if p.data_ptr() % 64}

        def at_end(ctx):
            seen["network"] = th.network_state(ctx)

        argv = th.base_argv(misaligned["model"], misaligned["img"], out, "--max_train_steps", "3", "--cache_latents", *extra)
        return th.run_train(argv, train_core.TrainHooks(on_train_start=at_start, on_train_end=at_end)), seen

    exact, exact_seen = run(tmp_path / "exact")
    everything, everything_seen = run(tmp_path / "all", "--mmap_frozen_weights")
    monkeypatch.setattr(train_network.NetworkTrainingMethod, "maps_token_embedding", False)  # read it all
    read, read_seen = run(tmp_path / "read")
    assert not read_seen["unaligned"]
    # mapped weights sit unaligned in the file; none of them is a layer that must be read
    assert exact_seen["unaligned"] and all(weight_mapping.maps_exactly(n, LEVELS, 8) for n in exact_seen["unaligned"])
    assert any(not weight_mapping.maps_exactly(n, LEVELS, 8) for n in everything_seen["unaligned"])
    assert exact.step_losses == read.step_losses
    assert exact_seen["network"].keys() == read_seen["network"].keys()
    assert all(torch.equal(exact_seen["network"][k], read_seen["network"][k]) for k in read_seen["network"])
    same = everything.step_losses == read.step_losses and all(
        torch.equal(everything_seen["network"][k], read_seen["network"][k]) for k in read_seen["network"]
    )
    if same:  # this CPU's vector kernels ignore alignment: the run above proved nothing
        pytest.skip("mapping every weight unaligned changed nothing on this CPU")
