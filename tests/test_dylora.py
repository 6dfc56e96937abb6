"""networks.dylora: file layout, rank-prefix training, prefixes loadable as LoRA files."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from lora_helpers import randomize_up, unet_inputs, unet_output
from networks import dylora, lora

RANK = 4
UNIT = 2


def train_steps(network, unet, steps: int) -> list[float]:
    """A few AdamW steps pulling the UNet output towards a fixed target (training mode)."""
    sample, timesteps, context = unet_inputs(unet)
    target = torch.randn(sample.shape, generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.AdamW(network.prepare_optimizer_params(None, 1e-2, 1e-2), lr=1e-2)
    network.on_epoch_start(None, unet)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(unet(sample, timesteps, context).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    network.eval()
    return losses


@pytest.fixture(params=[False, True], ids=["v1", "v2"])
def models(request, tiny_models_v1, tiny_models_v2):
    unet, vae, te = tiny_models_v2 if request.param else tiny_models_v1
    return copy.deepcopy(unet), vae, copy.deepcopy(te)


def test_dylora_file_layout_matches_lora(models, tmp_path):
    unet, vae, te = models
    network = dylora.create_network(1.0, RANK, 2.0, vae, te, unet, unit=str(UNIT), conv_dim=str(RANK))
    reference = lora.create_network(1.0, RANK, 2.0, vae, te, unet, conv_dim=str(RANK), conv_alpha="2.0")
    network.apply_to(te, unet)
    path = tmp_path / "dy.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.dylora", "ss_network_args": '{"unit": "2"}'})
    sd = load_file(str(path))
    ref_sd = reference.state_dict()
    assert set(sd) == set(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert all(float(sd[k]) == 2.0 for k in sd if k.endswith(".alpha"))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.dylora"
    # parameters are per-unit blocks, the file is the concatenation
    first = network.unet_loras[0]
    assert len(list(first.parameters())) == 2 * RANK // UNIT
    assert torch.equal(sd[f"{first.lora_name}.lora_down.weight"], first.full_weights()[0])


def test_training_trains_one_unit_block_per_module(tiny_models_v1):
    unet, vae, te = copy.deepcopy(tiny_models_v1[0]), tiny_models_v1[1], copy.deepcopy(tiny_models_v1[2])
    network = dylora.create_network(1.0, RANK, 1.0, vae, te, unet, unit=str(UNIT))
    network.apply_to(te, unet, apply_text_encoder=False)
    network.train()
    torch.manual_seed(0)
    loss = unet(*unet_inputs(unet)).sample.square().mean()
    loss.backward()
    for module in network.unet_loras:
        with_grad = [name for name, p in module.named_parameters() if p.grad is not None]
        # exactly one unit block (down and up) gets a gradient
        assert len(with_grad) == 2 and with_grad[0].split("_")[-1] == with_grad[1].split("_")[-1]


def test_rank_prefixes_load_as_lora_files(models, tmp_path):
    unet, vae, te = models
    base = unet_output(unet)
    # U-Net only (with 3x3 convs) keeps the test fast; the text encoder path is the same module code
    network = dylora.create_network(1.0, RANK, 2.0, vae, None, unet, unit=str(UNIT), conv_dim=str(RANK))
    network.apply_to(None, unet)
    losses = train_steps(network, unet, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    full = unet_output(unet)
    assert (full - base).abs().max() > 1e-3
    path = tmp_path / "dy.safetensors"
    network.save_weights(path, None, None)
    sd = load_file(str(path))

    for rank in range(UNIT, RANK + 1, UNIT):
        sliced = {}
        for key, value in sd.items():
            if key.endswith("lora_down.weight"):
                sliced[key] = value[:rank].contiguous()
            elif key.endswith("lora_up.weight"):
                sliced[key] = value[:, :rank].contiguous()
            else:
                sliced[key] = value  # alpha unchanged
        sliced_path = tmp_path / f"dy-{rank:04d}.safetensors"
        save_file(sliced, str(sliced_path))

        network.set_eval_rank(rank)
        expected = unet_output(unet)
        network.restore()  # copy the bare base model, not the hooked one
        target_unet = copy.deepcopy(unet)
        as_lora, _ = lora.create_network_from_weights(1.0, sliced_path, vae, te, target_unet)
        network.apply_to(None, unet)
        assert all(m.lora_dim == rank for m in as_lora.unet_loras)
        as_lora.apply_to(te, target_unet)
        as_lora.load_weights(sliced_path)
        got = unet_output(target_unet)
        assert torch.isfinite(got).all()
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        if rank == RANK:
            assert (got - full).abs().max() <= 1e-5 * full.abs().max()
    network.set_eval_rank(None)


def test_dylora_reload_and_merge(tiny_models_v1, tmp_path):
    unet, vae, te = copy.deepcopy(tiny_models_v1[0]), tiny_models_v1[1], copy.deepcopy(tiny_models_v1[2])
    network = dylora.create_network(0.5, RANK, 4.0, vae, te, unet, unit="1")
    randomize_up(network, seed=0)
    path = tmp_path / "dy.pt"
    network.save_weights(path, None, None)
    unet2, te2 = copy.deepcopy(unet), copy.deepcopy(te)
    network.apply_to(te, unet)
    network.eval()
    expected = unet_output(unet)

    loaded, _ = dylora.create_network_from_weights(0.5, path, vae, te2, unet2)
    loaded.apply_to(te2, unet2)
    info = loaded.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    loaded.eval()
    assert torch.equal(unet_output(unet2), expected)
    loaded.restore()
    loaded.merge_to(te2, unet2, torch.load(path, weights_only=True))
    got = unet_output(unet2)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_unit_and_conv_dim_validation(tiny_models_v1):
    unet, vae, te = tiny_models_v1
    with pytest.raises(UserError, match="unit"):
        dylora.create_network(1.0, 4, 1.0, vae, te, unet, unit="3")
    with pytest.raises(UserError, match="unit"):
        dylora.create_network(1.0, 4, 1.0, vae, te, unet, unit="0")
    with pytest.raises(UserError, match="unit"):
        dylora.create_network(1.0, 4, 1.0, vae, te, unet, unit="two")
    with pytest.raises(UserError, match="conv_dim"):
        dylora.create_network(1.0, 4, 1.0, vae, te, unet, conv_dim="8")
    network = dylora.create_network(1.0, 4, 1.0, vae, te, unet, unit="2")
    with pytest.raises(UserError, match="rank 3"):
        network.set_eval_rank(3)
