"""networks/lora_interrogator.py: the ranking equals a direct computation of each token's
text-encoder change, clip_skip is honoured, and LoRAs it cannot use fail with one line."""
from __future__ import annotations

import copy

import pytest
import torch

from library.cli import run_main
from library.text_encoding import run_text_encoder
from lora_helpers import randomize_up
from networks import lora
from networks.lora_interrogator import main


@pytest.fixture(scope="module")
def te_lora(tiny_models_v1, tmp_path_factory):
    """A LoRA whose text-encoder modules change the output (plus U-Net modules, ignored here)."""
    unet, vae, text_encoder = tiny_models_v1
    torch.manual_seed(0)
    network = lora.create_network(1.0, 4, 4.0, vae, copy.deepcopy(text_encoder), copy.deepcopy(unet))
    randomize_up(network, seed=7, std=0.5)
    path = tmp_path_factory.mktemp("interrogate") / "te.safetensors"
    network.save_weights(path, None, {})
    return path


def _direct_change(path, text_encoder, token_id, clip_skip=None):
    ids = torch.tensor([[49406, token_id, 49407]])
    te = copy.deepcopy(text_encoder)
    with torch.no_grad():
        before = run_text_encoder(te, ids, clip_skip)
        network, weights = lora.create_network_from_weights(1.0, path, None, te, None)
        network.apply_to(te, None)
        network.load_state_dict(weights, strict=False)
        after = run_text_encoder(te, ids, clip_skip)
    return (after - before).abs().mean().item()


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_ranking_matches_direct_computation(te_lora, tiny_model_files_v1, tiny_models_v1, capsys, clip_skip):
    argv = ["--sd_model", str(tiny_model_files_v1["safetensors"]), "--model", str(te_lora), "--batch_size", "4096"]
    if clip_skip:
        argv += ["--clip_skip", str(clip_skip)]
    ranked = main(argv)
    out = capsys.readouterr().out.splitlines()
    assert len(ranked) == 49408 and sorted(t for t, _ in ranked) == list(range(49408))
    diffs = [d for _, d in ranked]
    assert diffs == sorted(diffs, reverse=True) and diffs[0] > 1e-3
    assert out[0] == "top 100:" and len(out) == 101
    top_id, top_diff = ranked[0]
    assert out[1].startswith(f"[  0]: {top_id:5d} ")
    text_encoder = tiny_models_v1[2]
    by_id = dict(ranked)
    for token in (top_id, 320, ranked[-1][0]):
        assert by_id[token] == pytest.approx(_direct_change(te_lora, text_encoder, token, clip_skip), rel=1e-4, abs=1e-7)
    if clip_skip:  # the penultimate layer really is a different measurement
        assert by_id[320] != pytest.approx(_direct_change(te_lora, text_encoder, 320), rel=1e-3)


def test_unusable_loras(tmp_path, tiny_models_v1, tiny_models_v2, tiny_model_files_v1, capsys):
    unet, vae, text_encoder = tiny_models_v1
    unet_only = lora.create_network(1.0, 4, 1.0, vae, None, copy.deepcopy(unet))
    unet_only.save_weights(tmp_path / "unet_only.safetensors", None, {})
    unet2, vae2, te2 = tiny_models_v2
    v2 = lora.create_network(1.0, 4, 1.0, vae2, copy.deepcopy(te2), None)
    v2.save_weights(tmp_path / "v2.safetensors", None, {})
    model = str(tiny_model_files_v1["safetensors"])
    for name, message in (
        ("unet_only.safetensors", "no text-encoder modules"),
        ("v2.safetensors", "different model"),
        ("missing.safetensors", "not found"),
    ):
        assert run_main(main, ["--sd_model", model, "--model", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert run_main(main, ["--sd_model", model, "--model", str(tmp_path / "v2.safetensors"), "--batch_size", "0"]) == 1
    assert "--batch_size" in capsys.readouterr().err
