"""NAI hypernetwork: the maths on one attention layer, UNet wiring, file layouts, and training
through train_network.py --network_module finetune.hypernetwork_nai."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune import hypernetwork_nai as hn  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.tiny_sd import build_tiny_models  # noqa: E402
from library.safe_unpickle import load_pickle_checkpoint  # noqa: E402
from tests.caption_fixtures import doc_commands  # noqa: E402
from tests.train_helpers import make_image_folder, make_tiny_model  # noqa: E402


@pytest.fixture
def unet(tiny_models_v1):
    return copy.deepcopy(tiny_models_v1[0]).eval()


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    context = torch.randn(1, 77, cross, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10]), context).sample


def randomise(network: hn.Hypernetwork, scale: float = 0.3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_sizes_follow_the_attention_layers(unet):
    network = hn.create_network(1.0, None, 1, None, None, unet)
    expected = sorted({m.to_k.in_features for m in unet.modules() if hasattr(m, "to_k")})
    assert network.sizes == expected and unet.config.cross_attention_dim in expected
    for size in network.sizes:
        k, v = network.pair(size)
        assert k.linear[0].weight.shape == (2 * size, size) and k.linear[1].weight.shape == (size, 2 * size)
        assert v.linear[0].bias.abs().max() == 0


def test_projection_maths_and_restore(unet):
    base = unet_output(unet)
    network = hn.create_network(1.0, None, 1, None, None, unet)
    randomise(network)
    layer = hn.attention_layers(unet)[0]
    size = layer.to_k.in_features
    x = torch.randn(2, 5, size)
    with torch.no_grad():
        plain_k, plain_v = layer.to_k(x), layer.to_v(x)
        network.apply_to(None, unet)
        mlp_k, mlp_v = network.pair(size)
        expected_k = torch.nn.functional.linear(x + mlp_k.linear(x), layer.to_k.weight, layer.to_k.bias)
        torch.testing.assert_close(layer.to_k(x), expected_k)
        assert not torch.allclose(layer.to_v(x), plain_v)
        changed = unet_output(unet)
        network.set_multiplier(0.0)
        torch.testing.assert_close(unet_output(unet), base)
        network.set_multiplier(1.0)
        assert (changed - base).abs().max() > 1e-3
        network.restore()
        torch.testing.assert_close(layer.to_k(x), plain_k)
        torch.testing.assert_close(unet_output(unet), base)
    assert set(unet.state_dict()) == set(copy.deepcopy(unet).state_dict())  # the UNet's keys are untouched


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, unet, suffix):
    network = hn.create_network(1.0, None, 1, None, None, unet)
    randomise(network)
    network.apply_to(None, unet)
    changed = unet_output(unet)
    network.restore()
    path = tmp_path / f"hyper{suffix}"
    network.save_weights(path, torch.float32, {"ss_network_module": hn.NETWORK_MODULE})
    if suffix == ".pt":
        raw = load_pickle_checkpoint(path)  # the NAI layout as written
        assert sorted(raw) == network.sizes and isinstance(raw[network.sizes[0]], list)
        assert sorted(raw[network.sizes[0]][1]) == ["linear.0.bias", "linear.0.weight", "linear.1.bias", "linear.1.weight"]
    else:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["ss_network_module"] == hn.NETWORK_MODULE and "sshs_model_hash" in meta
        assert f"{network.sizes[0]}_1.linear.1.bias" in load_file(str(path))
    loaded, _ = hn.create_network_from_weights(1.0, str(path), None, None, unet)
    loaded.apply_to(None, unet)
    torch.testing.assert_close(unet_output(unet), changed)


def test_a1111_style_file_with_old_layer_names(tmp_path, unet):
    size = hn.context_sizes(unet)[-1]
    g = torch.Generator().manual_seed(3)

    def mlp_state():
        return {"linear1.weight": torch.randn(2 * size, size, generator=g), "linear1.bias": torch.zeros(2 * size),
                "linear2.weight": torch.randn(size, 2 * size, generator=g), "linear2.bias": torch.zeros(size)}

    data = {size: [mlp_state(), mlp_state()], "layer_structure": [1, 2, 1], "activation_func": "linear",
            "is_layer_norm": False, "name": "test", "step": 100, "sd_checkpoint_name": "model"}
    path = tmp_path / "a1111.pt"
    torch.save(data, path)
    network, _ = hn.create_network_from_weights(0.5, str(path), None, None, unet)
    assert network.sizes == [size] and network.multiplier == 0.5
    torch.testing.assert_close(network.pair(size)[0].linear[1].weight, data[size][0]["linear2.weight"])
    data["activation_func"] = "relu"
    torch.save(data, path)
    with pytest.raises(UserError, match="activation_func"):
        hn.create_network_from_weights(1.0, str(path), None, None, unet)


def test_bad_files(tmp_path, unet):
    with pytest.raises(UserError, match="not found"):
        hn.read_hypernetwork_file(tmp_path / "missing.pt")
    torch.save({4096: [{}, {}]}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="another model type"):
        hn.create_network_from_weights(1.0, str(tmp_path / "other.pt"), None, None, unet)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="cannot read hypernetwork file"):
        hn.read_hypernetwork_file(tmp_path / "garbage.safetensors")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a hypernetwork"):
        hn.read_hypernetwork_file(tmp_path / "plain.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({320: [Evil(), {}]}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load"):
        hn.read_hypernetwork_file(tmp_path / "evil.pt")


def test_docs_example(tmp_path, monkeypatch):
    """docs/tools.md's train_network.py command: trains, writes the NAI .pt layout, which loads back."""
    import train_network

    (argv,) = doc_commands(Path(__file__).resolve().parent.parent / "docs" / "tools.md", "train_network.py")
    monkeypatch.chdir(tmp_path)
    model = make_tiny_model(tmp_path / "models")
    model.rename(tmp_path / "models" / "tiny_sd_v1.safetensors")
    make_image_folder(tmp_path / "data", count=2, repeats=1)
    train_network.main(argv[1:])
    weights = hn.read_hypernetwork_file(tmp_path / "output" / "my_hypernetwork.pt")
    # trained away from the zero-bias initialisation
    assert any(pair[0]["linear.0.bias"].abs().max() > 0 for pair in weights.values())
    unet = build_tiny_models(v2=False, seed=0)[0]
    network, _ = hn.create_network_from_weights(1.0, str(tmp_path / "output" / "my_hypernetwork.pt"), None, None, unet)
    assert network.sizes == sorted(weights) == hn.context_sizes(unet)
