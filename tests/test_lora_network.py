"""networks.lora: targets, file layout, block dims / lr weights, reload, merge, errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.tiny_sd import tiny_text_encoder_config, tiny_unet_config
from lora_helpers import randomize_up, te_output, unet_output
from networks import lora
from networks.lora_keys import NUM_TOTAL_BLOCKS, unet_block_index

TE_SUFFIXES = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
TRANSFORMER_SUFFIXES = ["proj_in", "proj_out"] + [
    f"transformer_blocks_0_{part}"
    for part in [
        *(f"attn{a}_{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")),
        "ff_net_0_proj",
        "ff_net_2",
    ]
]


# ---------------------------------------------------------------------------------------
# expectations derived from a UNet / text-encoder config (the way SPEC 2.2 derives 192/278/72)

def transformer_paths(config: dict) -> list[str]:
    layers = config["layers_per_block"]
    paths = []
    for i, kind in enumerate(config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            paths += [f"down_blocks_{i}_attentions_{j}" for j in range(layers)]
    paths.append("mid_block_attentions_0")
    for i, kind in enumerate(config["up_block_types"]):
        if kind.startswith("CrossAttn"):
            paths += [f"up_blocks_{i}_attentions_{j}" for j in range(layers + 1)]
    return paths


def expected_lierla_names(config: dict) -> set[str]:
    return {f"lora_unet_{p}_{s}" for p in transformer_paths(config) for s in TRANSFORMER_SUFFIXES}


def expected_c3lier_extra(config: dict) -> dict[str, int]:
    """Counts of conv3x3 / time_emb_proj / conv_shortcut modules from the channel plan."""
    channels = config["block_out_channels"]
    layers = config["layers_per_block"]
    n_blocks = len(channels)
    resnets = shortcuts = 0
    in_ch = channels[0]
    for out_ch in channels:  # down path
        for j in range(layers):
            resnets += 1
            shortcuts += int((in_ch if j == 0 else out_ch) != out_ch)
        in_ch = out_ch
    resnets += 2  # mid block, channels unchanged
    # up path: every resnet gets the skip connection concatenated, so in != out always
    up_resnets = n_blocks * (layers + 1)
    resnets += up_resnets
    shortcuts += up_resnets
    samplers = 2 * (n_blocks - 1)
    return {"conv3x3": 2 * resnets + samplers, "time_emb_proj": resnets, "conv_shortcut": shortcuts}


def expected_te_names(num_layers: int) -> set[str]:
    return {f"lora_te_text_model_encoder_layers_{i}_{s}" for i in range(num_layers) for s in TE_SUFFIXES}


def fresh_models(models):
    unet, vae, text_encoder = models
    return copy.deepcopy(unet), vae, copy.deepcopy(text_encoder)


@pytest.fixture(params=[False, True], ids=["v1", "v2"])
def models(request, tiny_models_v1, tiny_models_v2):
    return fresh_models(tiny_models_v2 if request.param else tiny_models_v1), request.param


# ---------------------------------------------------------------------------------------
# targets

def test_lierla_and_c3lier_targets_match_config(models):
    (unet, vae, te), v2 = models
    config = tiny_unet_config(v2)
    network = lora.create_network(1.0, 4, 1.0, vae, te, unet)
    unet_names = {m.lora_name for m in network.unet_loras}
    assert unet_names == expected_lierla_names(config)
    assert len(unet_names) == 12 * len(transformer_paths(config))
    assert {m.lora_name for m in network.text_encoder_loras} == expected_te_names(
        tiny_text_encoder_config(v2).num_hidden_layers
    )

    c3 = lora.create_network(1.0, 4, 1.0, vae, te, unet, conv_dim="3", conv_alpha="2")
    extra = [m for m in c3.unet_loras if m.lora_name not in unet_names]
    counts = {
        "conv3x3": sum(m.kind == "conv3x3" for m in extra),
        "time_emb_proj": sum(m.lora_name.endswith("time_emb_proj") for m in extra),
        "conv_shortcut": sum(m.lora_name.endswith("conv_shortcut") for m in extra),
    }
    assert counts == expected_c3lier_extra(config)
    assert len(extra) == sum(counts.values())
    for m in extra:
        if m.kind == "conv3x3":
            assert (m.lora_dim, float(m.alpha)) == (3, 2.0)
        else:  # time_emb_proj and conv_shortcut use network_dim / network_alpha
            assert (m.lora_dim, float(m.alpha)) == (4, 1.0)


def test_full_size_module_counts_on_meta_device():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd15_unet = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        block_out_channels=[320, 640, 1280, 1280],
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    with init_empty_weights():
        unet = UNet2DConditionModel(**sd15_unet)
        te_l = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
        te_h = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu",
            )
        )
    assert next(unet.parameters()).is_meta
    lierla = lora.create_network(1.0, 4, 1.0, None, te_l, unet)
    c3lier = lora.create_network(1.0, 4, 1.0, None, None, unet, conv_dim="4")
    v2_te = lora.create_network(1.0, 4, 1.0, None, te_h, None)
    assert len(lierla.unet_loras) == 192
    assert len(c3lier.unet_loras) == 278
    assert len(lierla.text_encoder_loras) == 72
    assert len(v2_te.text_encoder_loras) == 138
    assert {m.lora_name for m in lierla.unet_loras} == expected_lierla_names(sd15_unet)
    assert {m.lora_name for m in lierla.text_encoder_loras} == expected_te_names(12)
    extra = expected_c3lier_extra(sd15_unet)
    assert extra == {"conv3x3": 50, "time_emb_proj": 22, "conv_shortcut": 14}


# ---------------------------------------------------------------------------------------
# file layout

def test_saved_file_keys_shapes_alphas_and_metadata(models, tmp_path):
    (unet, vae, te), v2 = models
    network = lora.create_network(1.0, 4, 2.0, vae, te, unet, conv_dim="2", conv_alpha="0.5")
    network.apply_to(te, unet)
    out = tmp_path / "lora.safetensors"
    network.save_weights(out, torch.float16, {"ss_network_module": "networks.lora", "my_key": "x"})
    sd = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["my_key"] == "x"
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8

    modules = {m.lora_name: m for m in network.text_encoder_loras + network.unet_loras}
    assert len(sd) == 3 * len(modules)
    for name, module in modules.items():
        assert name.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_"))
        down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
        assert down.dtype == up.dtype == alpha.dtype == torch.float16
        assert alpha.dim() == 0
        org = module.org_module
        if isinstance(org, torch.nn.Linear):
            assert down.shape == (4, org.in_features) and up.shape == (org.out_features, 4)
            assert float(alpha) == 2.0
        elif org.kernel_size == (1, 1):
            assert down.shape == (4, org.in_channels, 1, 1) and up.shape == (org.out_channels, 4, 1, 1)
            assert float(alpha) == 2.0
        else:
            assert down.shape == (2, org.in_channels, 3, 3) and up.shape == (org.out_channels, 2, 1, 1)
            assert float(alpha) == 0.5
    proj_in = sd[[k for k in sd if k.endswith("down_blocks_0_attentions_0_proj_in.lora_down.weight")][0]]
    assert proj_in.dim() == (2 if v2 else 4)  # v2 tiny UNet uses linear projections

    pt = tmp_path / "lora.pt"
    network.save_weights(pt, None, None)
    pt_sd = torch.load(pt, weights_only=True)
    assert set(pt_sd) == set(sd)
    assert all(v.dtype == torch.float32 for v in pt_sd.values())
    assert torch.equal(pt_sd[next(iter(sd))].half(), sd[next(iter(sd))])


def test_alpha_zero_or_none_means_rank(tiny_models_v1):
    unet, vae, te = fresh_models(tiny_models_v1)
    for alpha in (0, None):
        network = lora.create_network(1.0, 8, alpha, vae, te, unet)
        if alpha is None:  # sd-scripts default --network_alpha 1
            assert all(float(m.alpha) == 1.0 for m in network.unet_loras)
            continue
        assert all(float(m.alpha) == 8.0 and m.scale == 1.0 for m in network.unet_loras)
        assert network.state_dict()[f"{network.unet_loras[0].lora_name}.alpha"].dtype == torch.float32


def test_train_unet_only_and_te_only_files(tiny_models_v1, tmp_path):
    unet, vae, te = fresh_models(tiny_models_v1)
    network = lora.create_network(1.0, 4, 1.0, vae, te, unet)
    network.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    network.save_weights(tmp_path / "u.safetensors", None, None)
    keys = load_file(str(tmp_path / "u.safetensors")).keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    network = lora.create_network(1.0, 4, 1.0, vae, te, unet)
    network.apply_to(te, unet, apply_text_encoder=True, apply_unet=False)
    assert all(k.startswith("lora_te_") for k in network.state_dict())


# ---------------------------------------------------------------------------------------
# forward maths

def test_module_forward_formula_and_multiplier():
    layer = torch.nn.Linear(6, 5)
    module = lora.LoRAModule("lora_te_x", layer, multiplier=0.7, lora_dim=3, alpha=1.5)
    torch.nn.init.normal_(module.lora_up.weight)
    x = torch.randn(2, 4, 6)
    base = layer(x)
    module.apply_to()
    expected = base + (x @ module.lora_down.weight.T @ module.lora_up.weight.T) * 0.7 * 0.5
    torch.testing.assert_close(layer(x), expected)
    module.multiplier = 0.0
    torch.testing.assert_close(layer(x), base)
    module.restore()
    assert "forward" not in layer.__dict__

    # two adapters on one layer (e.g. two LoRAs at generation time) chain and unwind
    module.multiplier = 1.0
    second = lora.LoRAModule("lora_te_x", layer, multiplier=1.0, lora_dim=2, alpha=2)
    torch.nn.init.normal_(second.lora_up.weight)
    module.apply_to()
    second.apply_to()
    torch.testing.assert_close(layer(x), base + module.lora_output(x) + second.lora_output(x))
    second.restore()
    module.restore()
    torch.testing.assert_close(layer(x), base)
    assert "forward" not in layer.__dict__

    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    cmod = lora.LoRAModule("lora_unet_c", conv, lora_dim=2, alpha=4)
    torch.nn.init.normal_(cmod.lora_up.weight)
    x = torch.randn(1, 4, 8, 8)
    base = conv(x)
    cmod.apply_to()
    delta = lora.lora_delta_weight(cmod.lora_down.weight, cmod.lora_up.weight, cmod.alpha, conv.weight.shape)
    torch.testing.assert_close(conv(x), base + torch.nn.functional.conv2d(x, delta, stride=2, padding=1))


def test_applied_network_changes_output_and_restores(models):
    (unet, vae, te), _ = models
    base_u, base_t = unet_output(unet), te_output(te)
    network = lora.create_network(1.0, 4, 4.0, vae, te, unet, conv_dim="4", conv_alpha="4")
    network.apply_to(te, unet)
    torch.testing.assert_close(unet_output(unet), base_u)  # lora_up starts at zero
    randomize_up(network)
    assert (unet_output(unet) - base_u).abs().max() > 1e-3
    assert (te_output(te) - base_t).abs().max() > 1e-3
    network.set_multiplier(0.0)
    torch.testing.assert_close(unet_output(unet), base_u)
    network.restore()
    network.set_multiplier(1.0)
    torch.testing.assert_close(unet_output(unet), base_u)
    assert set(unet.state_dict()) == set(copy.deepcopy(models[0][0]).state_dict())


def test_dropouts_only_in_training(tiny_models_v1):
    unet, vae, te = fresh_models(tiny_models_v1)
    network = lora.create_network(1.0, 4, 4.0, vae, te, unet, neuron_dropout=0.3, rank_dropout="0.3", module_dropout="0.2")
    assert network.unet_loras[0].dropout == 0.3 and network.unet_loras[0].rank_dropout == 0.3
    network.apply_to(te, unet)
    randomize_up(network)
    network.eval()
    first, second = te_output(te), te_output(te)
    torch.testing.assert_close(first, second)
    network.train()
    torch.manual_seed(0)
    assert (te_output(te) - first).abs().max() > 1e-4

    # rank dropout masks for conv (4-D) and time_emb_proj (2-D) activations too
    c3 = lora.create_network(1.0, 4, 4.0, vae, None, unet, conv_dim="2", rank_dropout="0.5")
    c3.apply_to(None, unet)
    randomize_up(c3)
    c3.eval()
    eval_out = unet_output(unet)
    c3.train()
    train_out = unet_output(unet)
    assert torch.isfinite(train_out).all() and (train_out - eval_out).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------
# block dims and block learning rates (SPEC 2.3 / 2.4)

BLOCK_OF_NAME = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": 1,
    "lora_unet_down_blocks_0_resnets_1_conv1": 2,
    "lora_unet_down_blocks_0_downsamplers_0_conv": 3,
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": 5,
    "lora_unet_down_blocks_1_downsamplers_0_conv": 6,
    "lora_unet_down_blocks_3_resnets_1_conv2": 11,
    "lora_unet_mid_block_resnets_1_time_emb_proj": 12,
    "lora_unet_mid_block_attentions_0_proj_out": 12,
    "lora_unet_up_blocks_0_resnets_0_conv1": 13,
    "lora_unet_up_blocks_0_upsamplers_0_conv": 15,
    "lora_unet_up_blocks_1_attentions_2_proj_in": 18,
    "lora_unet_up_blocks_2_resnets_0_conv_shortcut": 19,
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": 24,
    "lora_te_text_model_encoder_layers_0_mlp_fc1": -1,
}


def test_block_index_table():
    for name, idx in BLOCK_OF_NAME.items():
        assert unet_block_index(name) == idx, name


def test_lr_weight_presets():
    from networks.lora_keys import parse_block_lr_weights

    w = parse_block_lr_weights({"down_lr_weight": "sine", "up_lr_weight": "cosine+0.5", "mid_lr_weight": "2"})
    assert w.down[0] == 0.0 and w.down[11] == pytest.approx(1.0)
    assert w.down[5] == pytest.approx(math.sin(math.pi / 2 * 5 / 11))
    assert w.up[0] == pytest.approx(1.5) and w.up[11] == pytest.approx(0.5)
    assert w.mid == 2.0
    w = parse_block_lr_weights({"down_lr_weight": "linear", "up_lr_weight": "reverse_linear"})
    assert w.down[3] == pytest.approx(3 / 11) and w.up[3] == pytest.approx(8 / 11) and w.mid is None
    w = parse_block_lr_weights({"down_lr_weight": "zeros+0.25"})
    assert w.down == [0.25] * 12
    # short lists are padded with 1.0, empty items are 0.0, threshold zeroes small weights
    w = parse_block_lr_weights({"up_lr_weight": "0.5,,0.05,2", "block_lr_zero_threshold": "0.1"})
    assert w.up == [0.5, 0.0, 0.0, 2.0] + [1.0] * 8
    assert len(parse_block_lr_weights({"down_lr_weight": ",".join(["1"] * 14)}).down) == 12


def test_block_dims_and_block_lr(tiny_models_v2, tmp_path):
    unet, vae, te = fresh_models(tiny_models_v2)
    block_dims = [2] * NUM_TOTAL_BLOCKS
    block_dims[1], block_dims[12], block_dims[24] = 5, 3, 6
    block_alphas = [float(i) + 1 for i in range(NUM_TOTAL_BLOCKS)]
    conv_block_dims = [1] * NUM_TOTAL_BLOCKS
    conv_block_dims[13] = 7
    down = [1.0] * 12
    down[4] = 0.0  # block 4 (down_blocks.1 layer 0) removed
    down[7] = 0.5
    network = lora.create_network(
        1.0, 4, 1.0, vae, te, unet,
        block_dims=",".join(map(str, block_dims)),
        block_alphas=",".join(map(str, block_alphas)),
        conv_dim="2",
        conv_block_dims=",".join(map(str, conv_block_dims)),
        down_lr_weight=",".join(map(str, down)),
        mid_lr_weight="0.25",
        up_lr_weight="2,1,1,1,1,1,1,1,1,1,1,0",
    )
    expected_rank = {  # block -> (linear/1x1 rank, 3x3 rank); lr 0 => absent
        1: (5, 1), 2: (2, 1), 3: (None, 1), 4: (None, None), 7: (2, 1), 12: (3, 1), 13: (2, 7), 24: (None, None),
    }
    by_block: dict[int, list] = {}
    for m in network.unet_loras:
        by_block.setdefault(unet_block_index(m.lora_name), []).append(m)
    assert 4 not in by_block and 24 not in by_block
    for block, (rank, conv_rank) in expected_rank.items():
        for m in by_block.get(block, []):
            want = conv_rank if m.kind == "conv3x3" else rank
            assert m.lora_dim == want, m.lora_name
            if m.kind != "conv3x3":
                assert float(m.alpha) == block_alphas[block]
            else:
                assert float(m.alpha) == 1.0  # conv_alpha default
    assert all(m.lora_dim == 4 and float(m.alpha) == 1.0 for m in network.text_encoder_loras)

    groups = network.prepare_optimizer_params(1e-5, 1e-3, 1e-4)
    names = network.optimizer_group_names
    assert len(names) == len(groups)
    lr_of = dict(zip(names, [g["lr"] for g in groups]))
    assert lr_of["textencoder"] == 1e-5
    assert lr_of["unet_block07"] == pytest.approx(5e-4)
    assert lr_of["unet_block12"] == pytest.approx(2.5e-4)
    assert lr_of["unet_block13"] == pytest.approx(2e-3)
    assert lr_of["unet_block01"] == pytest.approx(1e-3)
    assert "unet_block04" not in lr_of and "unet_block24" not in lr_of
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    opt = torch.optim.AdamW(groups, lr=1e-4)  # torch accepts the groups as they are
    assert len(opt.param_groups) == len(groups)

    network.apply_to(te, unet)
    network.save_weights(tmp_path / "b.safetensors", None, None)
    keys = load_file(str(tmp_path / "b.safetensors")).keys()
    assert not any(unet_block_index(k.split(".")[0]) in (4, 24) for k in keys if k.startswith("lora_unet"))


def test_optimizer_groups_plain_and_zero_lr(tiny_models_v1):
    unet, vae, te = fresh_models(tiny_models_v1)
    network = lora.create_network(1.0, 4, 1.0, vae, te, unet)
    groups = network.prepare_optimizer_params(None, 2e-4, 1e-4)
    assert network.optimizer_group_names == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [1e-4, 2e-4]
    groups = network.prepare_optimizer_params(0.0, None, 1e-4)
    assert network.optimizer_group_names == ["unet"] and groups[0]["lr"] == 1e-4


# ---------------------------------------------------------------------------------------
# reload, dim_from_weights, merge

def test_reload_from_weights_reproduces_network(models, tmp_path):
    (unet, vae, te), _ = models
    network = lora.create_network(0.8, 4, 2.0, vae, te, unet, conv_dim="3", conv_alpha="1.5")
    network.apply_to(te, unet)
    randomize_up(network)
    out_u, out_t = unet_output(unet), te_output(te)
    path = tmp_path / "net.safetensors"
    network.save_weights(path, None, {"ss_network_dim": "4"})
    network.restore()

    unet2, te2 = copy.deepcopy(unet), copy.deepcopy(te)
    loaded, weights_sd = lora.create_network_from_weights(0.8, path, vae, te2, unet2)
    assert {m.lora_name: m.lora_dim for m in loaded.unet_loras} == {m.lora_name: m.lora_dim for m in network.unet_loras}
    loaded.apply_to(te2, unet2)
    info = loaded.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert torch.equal(unet_output(unet2), out_u)
    assert torch.equal(te_output(te2), out_t)

    # --dim_from_weights then --network_weights (the train_network path), from a .pt file
    pt = tmp_path / "net.pt"
    network.save_weights(pt, None, None)
    unet3, te3 = copy.deepcopy(unet), copy.deepcopy(te)
    again, _ = lora.create_network_from_weights(1, pt, vae, te3, unet3)
    again.apply_to(te3, unet3)
    again.load_weights(pt)
    again.set_multiplier(0.8)
    assert torch.equal(unet_output(unet3), out_u)


def test_missing_alpha_means_scale_one(tiny_models_v1, tmp_path):
    unet, vae, te = fresh_models(tiny_models_v1)
    network = lora.create_network(1.0, 4, 1.0, vae, te, unet)
    randomize_up(network)
    sd = {k: v for k, v in network.state_dict().items() if not k.endswith(".alpha")}
    path = tmp_path / "noalpha.safetensors"
    save_file(sd, str(path))
    loaded, _ = lora.create_network_from_weights(1.0, path, vae, te, unet)
    assert all(m.scale == 1.0 and float(m.alpha) == m.lora_dim for m in loaded.unet_loras)


def test_merge_to_matches_applied_network(models):
    (unet, vae, te), _ = models
    base_u = unet_output(unet)
    network = lora.create_network(0.7, 4, 2.0, vae, te, unet, conv_dim="2", conv_alpha="1")
    randomize_up(network)
    weights_sd = network.state_dict()
    unet_a, te_a = copy.deepcopy(unet), copy.deepcopy(te)
    applied, _ = lora.create_network_from_weights(0.7, None, vae, te_a, unet_a, weights_sd=weights_sd)
    applied.apply_to(te_a, unet_a)
    applied.load_state_dict(weights_sd)
    expected_u, expected_t = unet_output(unet_a), te_output(te_a)

    merged, _ = lora.create_network_from_weights(0.7, None, vae, te, unet, weights_sd=weights_sd, for_inference=True)
    assert merged.is_mergeable()
    merged.merge_to(te, unet, weights_sd)
    # float32 rounding through the whole UNet: compare relative to the output scale
    for got, want in ((unet_output(unet), expected_u), (te_output(te), expected_t)):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (unet_output(unet) - base_u).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# errors

def test_wrong_shape_file_names_file_and_module(tiny_models_v1, tiny_models_v2, tmp_path):
    unet1, vae, te1 = fresh_models(tiny_models_v1)
    unet2, _, te2 = fresh_models(tiny_models_v2)
    network = lora.create_network(1.0, 4, 1.0, vae, te2, unet2)
    path = tmp_path / "v2lora.safetensors"
    network.save_weights(path, None, None)
    with pytest.raises(UserError, match=r"v2lora\.safetensors.*module lora_"):
        lora.create_network_from_weights(1.0, path, vae, te1, unet1)
    target = lora.create_network(1.0, 4, 1.0, vae, te1, unet1)
    with pytest.raises(UserError, match=r"v2lora\.safetensors.*module lora_"):
        target.load_weights(path)
    with pytest.raises(UserError, match="not found"):
        target.load_weights(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="bad.safetensors"):
        target.load_weights(bad)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"conv_dim": "abc"}, "conv_dim"),
        ({"conv_dim": "4", "conv_alpha": "x"}, "conv_alpha"),
        ({"block_dims": "1,2,3"}, "block_dims"),
        ({"block_dims": ",".join(["4"] * 25), "block_alphas": ",".join(["a"] * 25)}, "block_alphas"),
        ({"down_lr_weight": "wavy"}, "down_lr_weight"),
        ({"up_lr_weight": "1,x"}, "up_lr_weight"),
        ({"mid_lr_weight": "?"}, "mid_lr_weight"),
        ({"rank_dropout": "1.5"}, "rank_dropout"),
        ({"block_lr_zero_threshold": "t", "mid_lr_weight": "1"}, "block_lr_zero_threshold"),
    ],
)
def test_bad_network_args_raise_user_error(tiny_models_v1, kwargs, arg):
    unet, vae, te = tiny_models_v1
    with pytest.raises(UserError, match=arg):
        lora.create_network(1.0, 4, 1.0, vae, te, unet, **kwargs)


def test_bad_network_dim(tiny_models_v1):
    unet, vae, te = tiny_models_v1
    with pytest.raises(UserError, match="network_dim"):
        lora.create_network(1.0, 0, 1.0, vae, te, unet)


def test_file_for_another_architecture_is_rejected(tiny_models_v1, tmp_path):
    unet, vae, te = tiny_models_v1
    path = tmp_path / "sdxl_like.safetensors"
    save_file(
        {
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4),
        },
        str(path),
    )
    with pytest.raises(UserError, match=r"sdxl_like\.safetensors.*none of its 1 modules"):
        lora.create_network_from_weights(1.0, path, vae, te, unet)
    empty = tmp_path / "empty.safetensors"
    save_file({"foo": torch.zeros(1)}, str(empty))
    with pytest.raises(UserError, match="not a LoRA file"):
        lora.create_network_from_weights(1.0, empty, vae, te, unet)


def test_loading_weights_with_other_alpha_updates_scale(tiny_models_v1, tmp_path):
    unet, vae, te = fresh_models(tiny_models_v1)
    source = lora.create_network(1.0, 4, 8.0, vae, te, unet)
    path = tmp_path / "a8.safetensors"
    source.save_weights(path, None, None)
    target = lora.create_network(1.0, 4, 1.0, vae, te, unet)
    target.load_weights(path)
    assert all(m.scale == 2.0 and float(m.alpha) == 8.0 for m in target.unet_loras)
