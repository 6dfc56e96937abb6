"""XTI: block names from the U-Net config, per-block states reach exactly their block, and
train_textual_inversion_XTI.py trains only the block rows and samples with them."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import ti_helpers as tih
import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
import train_textual_inversion_XTI as txti
from library import embedding_files, sampling, text_encoding, train_core, train_util, xti
from library.embedding_files import SD_XTI_BLOCKS
from library.errors import UserError
from library.tiny_sd import tiny_unet_config
from library.tokenizer_util import load_tokenizer


def test_block_names_follow_the_unet_config():
    config = {**tiny_unet_config(False), "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
              "cross_attention_dim": 768}
    with init_empty_weights():
        sd15 = UNet2DConditionModel(**config)
    assert xti.xti_blocks(sd15) == list(SD_XTI_BLOCKS)
    with init_empty_weights():
        tiny = UNet2DConditionModel(**tiny_unet_config(False))  # one layer per block: LDM numbers step by 2
    assert xti.xti_blocks(tiny) == ["IN01", "IN03", "IN05", "MID", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07"]


def _xti_setup(models, vectors_per_block):
    unet, _, text_encoder = copy.deepcopy(models)
    tokenizer = load_tokenizer(v2=True)
    blocks = xti.xti_blocks(unet)
    wrapped = xti.load_xti_embedding(tokenizer, text_encoder, unet, "mychar", dict(zip(blocks, vectors_per_block)), "test")
    return unet, text_encoder, tokenizer, wrapped, blocks


def test_each_block_gets_its_own_states(tiny_models_v2):
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(2, 64, generator=gen) for _ in range(16)]
    unet, text_encoder, tokenizer, wrapped, blocks = _xti_setup(tiny_models_v2, vectors)
    prompt = "a photo of mychar mychar1"
    ids = torch.tensor([tokenizer(prompt, padding="max_length", max_length=77).input_ids])
    states = wrapped(ids)[0]
    assert states.shape == (1, 77, 16 * 64)
    tokens = wrapped.tokens[0]
    for b in (0, 6, 15):  # block b's slice is the plain encoder's output with the block's rows in place
        swapped = ids.clone()
        swapped[ids == tokens.base_ids[0]] = tokens.block_ids[b][0]
        swapped[ids == tokens.base_ids[1]] = tokens.block_ids[b][1]
        with torch.no_grad():
            expected = text_encoder(swapped)[0]
        assert torch.allclose(states[..., b * 64 : (b + 1) * 64], expected, atol=1e-5)

    # clip_skip goes through the wrapper's per-block final LayerNorm
    skipped = text_encoding.run_text_encoder(wrapped, ids, clip_skip=2)
    with torch.no_grad():
        swapped = ids.clone()
        swapped[ids == tokens.base_ids[0]] = tokens.block_ids[3][0]
        swapped[ids == tokens.base_ids[1]] = tokens.block_ids[3][1]
        expected = text_encoding.run_text_encoder(text_encoder, swapped, clip_skip=2)
    assert torch.allclose(skipped[..., 3 * 64 : 4 * 64], expected, atol=1e-5)

    # every attn2 processor receives exactly its block's slice
    received = {}
    for name, processor in unet.attn_processors.items():
        if isinstance(processor, xti.XTIAttnProcessor):
            inner = processor.inner

            def spy(attn, hidden, ehs=None, *rest, _name=name, _inner=inner, **kw):
                received[_name] = ehs
                return _inner(attn, hidden, ehs, *rest, **kw)

            processor.inner = spy
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([10]), states)
    assert len(received) == len(blocks) * 1  # one transformer block per attention in the tiny U-Net
    for name, ehs in received.items():
        b = blocks.index(xti.block_name_of(name, unet.config))
        assert torch.equal(ehs, states[..., b * 64 : (b + 1) * 64])


def test_same_vectors_in_every_block_equal_plain_textual_inversion(tiny_models_v2):
    vector = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    unet, text_encoder, tokenizer, wrapped, _ = _xti_setup(tiny_models_v2, [vector] * 16)
    plain_unet, _, plain_te = copy.deepcopy(tiny_models_v2)
    plain_tok = load_tokenizer(v2=True)
    embedding_files.add_embedding_tokens(plain_tok, plain_te, "mychar", vector, "test")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ids = torch.tensor([tokenizer("mychar on grass", padding="max_length", max_length=77).input_ids])
        ours = unet(latents, torch.tensor([500]), wrapped(ids)[0]).sample
        theirs = plain_unet(latents, torch.tensor([500]), plain_te(ids)[0]).sample
        # plain [N, L, D] states still pass through the patched U-Net untouched
        passthrough = unet(latents, torch.tensor([500]), plain_te(ids)[0]).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(passthrough, theirs, atol=1e-5)
    xti.remove_xti_processors(unet)
    assert not any(isinstance(p, xti.XTIAttnProcessor) for p in unet.attn_processors.values())


def test_block_mismatch_is_user_error(tiny_models_v1):
    unet, _, text_encoder = copy.deepcopy(tiny_models_v1)
    blocks = {name: torch.zeros(1, 32) for name in SD_XTI_BLOCKS}  # an SD file on the 10-block tiny U-Net
    with pytest.raises(UserError, match="sd.safetensors: XTI blocks IN01, IN02.* do not match the U-Net's cross-attention blocks IN01, IN03"):
        xti.load_xti_embedding(load_tokenizer(), text_encoder, unet, "mychar", blocks, "sd.safetensors")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("xti")
    return {"model": th.make_tiny_model(root, v2=True), "img": tih.make_ti_images(root), "root": root}


def run(argv, hooks=None):
    return txti.train(train_util.parse_args_with_config(txti.setup_parser(), list(argv)), hooks)


def test_xti_training_end_to_end(workspace, tmp_path):
    from PIL import Image

    from library.model_util import load_target_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("mychar on grass --w 64 --h 64 --d 3 --s 3 --l 2\n", encoding="utf-8")
    seen = {}

    def start(ctx):
        seen["before"] = tih.snapshot(ctx)
        seen["loss_before"] = tih.fixed_loss(ctx)  # the batch's own captions

    def end(ctx):
        seen["after"] = tih.snapshot(ctx)
        seen["loss_after"] = tih.fixed_loss(ctx)
        seen["trained"] = ctx.models.text_encoder.tokens[0]

    out = tmp_path / "out"
    argv = tih.ti_argv(
        workspace["model"], workspace["img"], out, "--num_vectors_per_token", "2", "--max_train_steps", "8",
        "--learning_rate", "0.3", "--sample_prompts", str(prompts), "--sample_every_n_steps", "8",
    )
    result = run(argv, train_core.TrainHooks(on_train_start=start, on_train_end=end))
    assert len(result.step_losses) == 8 and all(np.isfinite(result.step_losses))
    assert seen["loss_after"] < 0.99 * seen["loss_before"], (seen["loss_before"], seen["loss_after"])

    before, after = seen["before"], seen["after"]
    for key, value in before["unet"].items():
        assert torch.equal(value, after["unet"][key]), key
    (embedding_key,) = [k for k in before["text_encoder"] if k.endswith("token_embedding.weight")]
    for key, value in before["text_encoder"].items():
        if key != embedding_key:
            assert torch.equal(value, after["text_encoder"][key]), key
    trained_ids = [i for ids in seen["trained"].block_ids for i in ids]
    others = torch.ones(before["text_encoder"][embedding_key].shape[0], dtype=torch.bool)
    others[trained_ids] = False
    assert torch.equal(before["text_encoder"][embedding_key][others], after["text_encoder"][embedding_key][others])

    path = out / "emb.safetensors"
    saved = load_file(str(path))
    assert list(saved) == list(SD_XTI_BLOCKS) and all(t.shape == (2, 64) for t in saved.values())
    _, metadata = embedding_files.read_xti_file(path)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-512/textual-inversion"
    rows = after["text_encoder"][embedding_key]
    assert all(torch.equal(saved[b], rows[ids]) for b, ids in zip(SD_XTI_BLOCKS, seen["trained"].block_ids))
    assert not torch.equal(saved["IN01"], saved["OUT11"])  # blocks learn different vectors

    # the training sample used the per-block embeddings: a generator loading the file reproduces it
    (sample,) = (out / "sample").glob("emb_*_000008_00_3.png")
    models = load_target_model(workspace["model"])
    blocks, _ = embedding_files.read_xti_file(path)
    wrapped = xti.load_xti_embedding(models.tokenizer, models.text_encoder, models.unet, "mychar", blocks, str(path))
    request = sampling.parse_prompt_line("mychar mychar1 on grass --w 64 --h 64 --d 3 --s 3 --l 2")
    (image,) = sampling.generate_images(models.unet, models.vae, wrapped, models.tokenizer, request)
    # the freshly loaded models hold their weights at other addresses than the run's; MKL (torch's
    # BLAS here) orders a product's sums by the arrays' alignment (Intel's reproducibility notes),
    # so a last bit may round differently: a pixel may move by one level. Exact in a lone run.
    reproduced = np.abs(np.asarray(Image.open(sample)).astype(int) - np.asarray(image).astype(int))
    assert reproduced.max() <= 1 and (reproduced > 0).mean() < 1e-3, (reproduced.max(), (reproduced > 0).sum())
    xti.remove_xti_processors(models.unet)
    (plain,) = sampling.generate_images(models.unet, models.vae, models.text_encoder, models.tokenizer, request)
    assert np.abs(np.asarray(plain).astype(int) - np.asarray(image).astype(int)).mean() > 1.0  # the blocks matter


def test_xti_weights_continue_and_bad_blocks_fail(workspace, tmp_path):
    start_blocks = {b: torch.full((1, 64), float(i)) for i, b in enumerate(SD_XTI_BLOCKS)}
    start = embedding_files.save_xti_file(tmp_path / "start.safetensors", start_blocks)
    seen = {}

    def capture(ctx):
        weight = ctx.models.text_encoder.get_input_embeddings().weight.detach()
        seen["rows"] = [weight[ids].clone() for ids in ctx.models.text_encoder.tokens[0].block_ids]

    run(tih.ti_argv(workspace["model"], workspace["img"], tmp_path / "a", "--max_train_steps", "1", "--weights", str(start)),
        train_core.TrainHooks(on_train_start=capture))
    assert all(torch.equal(rows, start_blocks[b]) for rows, b in zip(seen["rows"], SD_XTI_BLOCKS))

    partial = embedding_files.save_xti_file(tmp_path / "partial.safetensors", {"IN01": torch.zeros(1, 64), "MID": torch.zeros(1, 64)})
    with pytest.raises(UserError, match="partial.safetensors: XTI blocks IN01, MID do not match"):
        run(tih.ti_argv(workspace["model"], workspace["img"], tmp_path / "b", "--max_train_steps", "1", "--weights", str(partial)))
    single = embedding_files.save_embedding(tmp_path / "single.safetensors", torch.zeros(1, 64))
    with pytest.raises(UserError, match="not an XTI embedding"):
        run(tih.ti_argv(workspace["model"], workspace["img"], tmp_path / "c", "--max_train_steps", "1", "--weights", str(single)))
