"""The default mapping of frozen weights (`library/weight_mapping.py`) by the LoRA run and the
generator: everything but the layers that can become matrix-vector products is mapped from the
file, and training and generation give bit-identical results to reading every weight, even when
the file's data is misaligned."""
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


def _random_lora(model, path):
    """A LoRA of U-Net and text encoder with random up weights (a visible change)."""
    from lora_helpers import randomize_up
    from networks import lora

    models = model_util.load_target_model(model)
    torch.manual_seed(0)
    network = lora.create_network(1.0, 4, 4, models.vae, models.text_encoder, models.unet)
    randomize_up(network, std=0.3)
    network.save_weights(path, None, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_generator_maps_what_stays_exact_and_draws_what_reading_draws(misaligned, tmp_path, monkeypatch):
    import numpy as np

    from gen_helpers import generate_pixels
    from library import gen_img

    model = misaligned["model"]
    file, original = str(model.resolve()), model.read_bytes()
    lora_flags = ["--network_module", "networks.lora", "--network_weights", str(_random_lora(model, tmp_path / "l.safetensors"))]
    runs = {"plain": [], "lora": lora_flags, "merged": [*lora_flags, "--network_merge"]}
    mapped: dict[str, set[str]] = {}
    load_generator = gen_img.load_generator

    def recording(args, sizes=None):
        generator = load_generator(args, sizes)
        models = generator.models
        mapped[args.outdir] = {
            f"{part}.{n}" for part, model_part in (("unet", models.unet), ("te", models.text_encoder))
            for n, p in model_part.named_parameters() if th.mapping_of(p) == file
        }
        return generator

    monkeypatch.setattr(gen_img, "load_generator", recording)
    drawn = {name: generate_pixels(model, tmp_path / name, *flags, size=64) for name, flags in runs.items()}
    load_target_model = gen_img.load_target_model
    monkeypatch.setattr(gen_img, "load_target_model", lambda *a, **k: load_target_model(*a, **{**k, "map_frozen_weights": "none"}))
    read = {name: generate_pixels(model, tmp_path / f"read_{name}", *flags, size=64) for name, flags in runs.items()}

    for name in runs:
        assert np.array_equal(drawn[name], read[name]), name
        assert not mapped[str(tmp_path / f"read_{name}")]
    assert not np.array_equal(drawn["plain"], drawn["lora"])  # the LoRA acts, merged or not
    assert np.abs(drawn["merged"] - drawn["lora"]).max() <= 1
    # at 64 px (latent 8) the 1x1 deepest level and the per-sample layers are read, the rest mapped
    unet_mapped = {n[len("unet."):] for n in mapped[str(tmp_path / "plain")] if n.startswith("unet.")}
    keys = [n for n, _ in model_util.load_target_model(model).unet.named_parameters()]
    assert unet_mapped == {k for k in keys if weight_mapping.maps_exactly(k, LEVELS, 8)}
    assert any(n.startswith("te.") for n in mapped[str(tmp_path / "plain")])
    assert model.read_bytes() == original  # merging into mapped weights wrote private pages only


def test_generator_sizes_known_before_loading(tmp_path):
    from library.gen_jobs import JobDefaults, planned_sizes

    defaults = JobDefaults(None, None, 20, 7.5, "ddim", None, None, 1)
    lines = ["a cat --w 768 --h 512", "", "a dog --w 65", "a bird"]
    assert planned_sizes(lines, defaults, False, None) == [(768, 512), (64, 512), (512, 512)]
    assert planned_sizes(lines[:1], defaults, False, 0.5) == [(768, 512), (384, 256)]  # highres 1st stage
    # an init image decides the size where neither the line nor --W / --H does
    assert planned_sizes(lines, defaults, True, None) is None
    assert planned_sizes(lines[:1], defaults, True, None) == [(768, 512)]
    assert planned_sizes(["a cat"], JobDefaults(96, 64, 20, 7.5, "ddim", None, None, 1), True, None) == [(96, 64)]
    # the 1st stage of a 64 px image at 1/4 is 16 px: latent side 2, so only the per-sample layers are read
    assert weight_mapping.smallest_latent_side(planned_sizes(["a dog --w 64 --h 64"], defaults, False, 0.25)) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_generator_of_unknown_sizes_maps_no_unet_layer(misaligned, tmp_path):
    from library import gen_args, gen_img

    model = misaligned["model"]
    file = str(model.resolve())
    args = gen_args.parse_args(["--ckpt", str(model), "--outdir", str(tmp_path), "--interactive"])
    generator = gen_img.load_generator(args)  # interactive: the sizes come later
    assert not any(th.mapping_of(p) == file for p in generator.models.unet.parameters())
    assert any(th.mapping_of(p) == file for p in generator.models.text_encoder.parameters())  # 77 tokens: exact
