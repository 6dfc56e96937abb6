"""networks/extract_lora_from_dylora.py: each cut equals the DyLoRA evaluated at that rank, in
our LoRA network and in diffusers; bad inputs fail with one line and write nothing."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from library.cli import run_main
from library.errors import UserError
from lora_helpers import randomize_up, te_output, unet_output
from lora_tool_helpers import assert_modelspec, assert_rel_close, diffusers_lora_outputs
from networks import dylora, lora
from networks.extract_lora_from_dylora import main


@pytest.fixture(scope="module")
def dylora_file(tiny_models_v1, tmp_path_factory):
    """A C3Lier DyLoRA of rank 6, unit 2, alpha 3, with random up weights."""
    unet, vae, text_encoder = tiny_models_v1
    torch.manual_seed(0)
    network = dylora.create_network(
        1.0, 6, 3.0, vae, copy.deepcopy(text_encoder), copy.deepcopy(unet), unit="2", conv_dim="6"
    )
    randomize_up(network, seed=5)
    path = tmp_path_factory.mktemp("dylora") / "dy.safetensors"
    metadata = {
        "ss_network_module": "networks.dylora",
        "ss_network_dim": "6",
        "ss_network_alpha": "3.0",
        "ss_network_args": json.dumps({"unit": "2", "conv_dim": "6"}),
        "ss_training_comment": "tiny",
    }
    network.save_weights(path, None, metadata)
    return path


def _dylora_outputs(path, models, rank):
    unet, vae, text_encoder = (copy.deepcopy(m) for m in models)
    network, weights = dylora.create_network_from_weights(1.0, path, vae, text_encoder, unet, unit="2")
    network.apply_to(text_encoder, unet)
    network.load_state_dict(weights)
    network.eval()
    network.set_eval_rank(rank)
    return unet_output(unet), te_output(text_encoder)


def _lora_outputs(path, models):
    unet, vae, text_encoder = (copy.deepcopy(m) for m in models)
    network, weights = lora.create_network_from_weights(1.0, path, vae, text_encoder, unet)
    network.apply_to(text_encoder, unet)
    info = network.load_state_dict(weights, strict=False)
    assert not info.missing_keys and not info.unexpected_keys
    return unet_output(unet), te_output(text_encoder)


def test_cuts_equal_the_dylora_at_their_rank(dylora_file, tiny_models_v1, tmp_path):
    written = main(["--model", str(dylora_file), "--save_to", str(tmp_path / "cut.safetensors"), "--unit", "2"])
    assert [p.name for p in written] == ["cut-0002.safetensors", "cut-0004.safetensors"]
    base_u, base_t = unet_output(tiny_models_v1[0]), te_output(tiny_models_v1[2])
    for path, rank in zip(written, (2, 4)):
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            downs = [handle.get_tensor(k) for k in handle.keys() if k.endswith("lora_down.weight")]
            alphas = {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".alpha")}
        assert downs and all(d.shape[0] == rank for d in downs)
        assert alphas == {3.0}  # alpha kept, so the scale becomes alpha / rank
        assert meta["ss_network_dim"] == str(rank) and meta["ss_network_alpha"] == "3.0"
        assert meta["ss_training_comment"] == f"split from DyLoRA, rank 6 to {rank}; tiny"
        assert_modelspec(meta, "stable-diffusion-v1/lora", path.stem)
        assert len(meta["sshs_model_hash"]) == 64

        want_u, want_t = _dylora_outputs(dylora_file, tiny_models_v1, rank)
        assert (want_u - base_u).abs().max() > 1e-2 and (want_t - base_t).abs().max() > 1e-2
        got_u, got_t = _lora_outputs(path, tiny_models_v1)
        assert_rel_close(got_u, want_u)
        assert_rel_close(got_t, want_t)

        unet, vae, text_encoder = tiny_models_v1
        diff_u, diff_t, messages = diffusers_lora_outputs(path, unet, vae, text_encoder, v2=False)
        assert not [m for m in messages if "key" in m.lower()], messages
        assert_rel_close(diff_u, want_u)
        assert_rel_close(diff_t, want_t)
    # a different rank gives a different model: the cuts are not all the same file
    assert not torch.equal(_lora_outputs(written[0], tiny_models_v1)[0], _lora_outputs(written[1], tiny_models_v1)[0])


def test_pt_output_and_unit_4(dylora_file, tmp_path):
    written = main(["--model", str(dylora_file), "--save_to", str(tmp_path / "cut.pt"), "--unit", "4"])
    assert [p.name for p in written] == ["cut-0004.pt"]
    state = torch.load(written[0], weights_only=True)
    down = state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert down.shape[0] == 4 and down.dim() == 4  # C3Lier 3x3 conv cut too


@pytest.mark.parametrize(
    "args, message",
    [
        (["--unit", "6"], "not smaller than the DyLoRA's rank 6"),
        (["--unit", "3"], "not a multiple of the unit 2"),
        (["--unit", "0"], "--unit must be a positive integer"),
    ],
)
def test_bad_units(dylora_file, tmp_path, args, message, capsys):
    argv = ["--model", str(dylora_file), "--save_to", str(tmp_path / "cut.safetensors"), *args]
    assert run_main(main, argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_bad_files(dylora_file, tmp_path, tiny_model_files_v1):
    with pytest.raises(UserError, match="not found"):
        main(["--model", str(tmp_path / "missing.safetensors"), "--save_to", str(tmp_path / "o.safetensors"), "--unit", "2"])
    with pytest.raises(UserError, match="not a LoRA file"):
        main(["--model", str(tiny_model_files_v1["safetensors"]), "--save_to", str(tmp_path / "o.safetensors"), "--unit", "2"])
    with pytest.raises(UserError, match="is also an input"):
        main(["--model", str(dylora_file), "--save_to", str(dylora_file), "--unit", "2"])
    plain = tmp_path / "plain.safetensors"
    lora_sd = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 8),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, 4)}
    from safetensors.torch import save_file

    save_file(lora_sd, str(plain), {"ss_network_module": "networks.lora"})
    with pytest.raises(UserError, match="not a DyLoRA"):
        main(["--model", str(plain), "--save_to", str(tmp_path / "o.safetensors"), "--unit", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.safetensors"]


def test_failed_write_leaves_no_output(dylora_file, tmp_path, monkeypatch):
    import networks.extract_lora_from_dylora as script

    calls = []

    def failing_write(destination, state_dict, dtype, metadata, as_safetensors):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(destination, state_dict, dtype, metadata, as_safetensors)

    real_write = script.write_lora_tensors
    monkeypatch.setattr(script, "write_lora_tensors", failing_write)
    old = tmp_path / "cut-0002.safetensors"
    old.write_bytes(b"previous output")
    with pytest.raises(OSError):
        main(["--model", str(dylora_file), "--save_to", str(tmp_path / "cut.safetensors"), "--unit", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut-0002.safetensors"]
    assert old.read_bytes() == b"previous output"
