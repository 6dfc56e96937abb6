"""Embedding files: every layout round-trips, pickles go through the restricted loader, the
files load in diffusers, and tokens are added with clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from library import embedding_files as ef
from library.errors import UserError
from library.tokenizer_util import load_tokenizer


def _vectors(n: int = 3, dim: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_safetensors_layout_round_trip(tmp_path):
    vectors = _vectors()
    path = ef.save_embedding(tmp_path / "tok.safetensors", vectors, metadata={"ss_output_name": "tok"})
    raw = load_file(str(path))
    assert list(raw) == ["emb_params"] and torch.equal(raw["emb_params"], vectors)
    emb = ef.read_embedding(path)
    assert emb.layout == "sd-scripts" and torch.equal(emb.vectors, vectors)
    assert emb.metadata == {"ss_output_name": "tok"}


def test_fp16_save(tmp_path):
    path = ef.save_embedding(tmp_path / "tok.safetensors", _vectors(), dtype=torch.float16)
    assert load_file(str(path))["emb_params"].dtype == torch.float16


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_a1111_layout_round_trip(tmp_path, suffix):
    vectors = _vectors(2)
    path = ef.save_embedding(tmp_path / f"mychar{suffix}", vectors, step=40)
    raw = torch.load(path, weights_only=True)  # what A1111 / diffusers read
    assert set(raw) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert raw["string_to_token"] == {"*": 265} and raw["name"] == "mychar" and raw["step"] == 40
    assert torch.equal(raw["string_to_param"]["*"], vectors)
    emb = ef.read_embedding(path)
    assert (emb.layout, emb.name, emb.step) == ("a1111", "mychar", 40)
    assert torch.equal(emb.vectors, vectors)


def test_original_textual_inversion_parameter_dict(tmp_path):
    """The original TI code pickles string_to_param as an nn.ParameterDict: read through the
    restricted loader's inert ModuleState, no module code runs."""
    vectors = _vectors(2)
    path = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": nn.ParameterDict({"*": nn.Parameter(vectors)})}, path)
    assert torch.equal(ef.read_embedding(path).vectors, vectors)


def test_pickles_only_through_safe_unpickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "x": Evil()}, path)
    with pytest.raises(UserError, match="refusing to load.*builtins.print"):
        ef.read_embedding(path)


def test_diffusers_layouts(tmp_path):
    one = _vectors(1)
    path = ef.save_diffusers_embedding(tmp_path / "learned_embeds.bin", "<cat>", one)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["<cat>"] and raw["<cat>"].shape == (32,)  # a single vector is stored 1-D
    emb = ef.read_embedding(path)
    assert (emb.layout, emb.name) == ("diffusers", "<cat>") and torch.equal(emb.vectors, one)
    multi = _vectors(3)
    path = ef.save_diffusers_embedding(tmp_path / "learned_embeds.safetensors", "<dog>", multi)
    assert torch.equal(ef.load_embedding_vectors(path), multi)
    bare = tmp_path / "bare.pt"
    torch.save(multi[0], bare)
    assert ef.load_embedding_vectors(bare).shape == (1, 32)


def test_xti_round_trip_and_errors(tmp_path):
    blocks = {name: _vectors(2, seed=i) for i, name in enumerate(ef.SD_XTI_BLOCKS)}
    path = ef.save_xti_file(tmp_path / "xti.safetensors", blocks, metadata={"a": "b"})
    assert set(load_file(str(path))) == set(ef.SD_XTI_BLOCKS)
    read, metadata = ef.read_xti_file(path)
    assert metadata == {"a": "b"} and all(torch.equal(read[k], blocks[k]) for k in blocks)
    with pytest.raises(UserError, match="XTI"):
        ef.read_embedding(path)  # an XTI file is not a single-token embedding
    plain = ef.save_embedding(tmp_path / "plain.safetensors", _vectors())
    with pytest.raises(UserError, match="not an XTI embedding"):
        ef.read_xti_file(plain)
    uneven = tmp_path / "uneven.safetensors"
    save_file({"IN01": torch.zeros(2, 4), "MID": torch.zeros(3, 4)}, str(uneven))
    with pytest.raises(UserError, match="differ in shape"):
        ef.read_xti_file(uneven)
    with pytest.raises(UserError, match=r"\.safetensors"):
        ef.read_xti_file(tmp_path / "xti.pt")


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ef.read_embedding(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a file")
    with pytest.raises(UserError, match="garbage.safetensors"):
        ef.read_embedding(garbage)
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, str(two))
    with pytest.raises(UserError, match="found keys a, b"):
        ef.read_embedding(two)
    three_d = tmp_path / "3d.safetensors"
    save_file({"emb_params": torch.zeros(1, 2, 4)}, str(three_d))
    with pytest.raises(UserError, match=r"shape \[1, 2, 4\]"):
        ef.read_embedding(three_d)


def test_failed_save_keeps_existing_file(tmp_path):
    target = ef.save_embedding(tmp_path / "keep.safetensors", _vectors())
    before = target.read_bytes()
    with pytest.raises(ValueError):
        ef.save_embedding(target, torch.zeros(2, 3, 4))
    assert target.read_bytes() == before


def test_token_strings_and_expansion():
    assert ef.token_strings("mychar", 3) == ["mychar", "mychar1", "mychar2"]
    assert ef.expand_token_string("a photo of mychar", "mychar", 3) == "a photo of mychar mychar1 mychar2"
    assert ef.expand_token_string("a photo of mychar", "mychar", 1) == "a photo of mychar"


def test_add_embedding_tokens(tiny_models_v1):
    _, _, text_encoder = tiny_models_v1
    text_encoder = copy.deepcopy(text_encoder)
    tokenizer = load_tokenizer()
    base_rows = text_encoder.get_input_embeddings().weight.detach().clone()
    vectors = _vectors(3, dim=base_rows.shape[1])
    ids = ef.add_embedding_tokens(tokenizer, text_encoder, "mychar", vectors, "test.safetensors")
    assert ids == [base_rows.shape[0], base_rows.shape[0] + 1, base_rows.shape[0] + 2]
    weight = text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[: base_rows.shape[0]], base_rows) and torch.equal(weight[ids], vectors)
    assert tokenizer("mychar mychar1 mychar2", add_special_tokens=False).input_ids == ids
    with pytest.raises(UserError, match="already knows the token 'mychar'"):
        ef.add_embedding_tokens(tokenizer, text_encoder, "mychar", vectors, "again.safetensors")


def test_add_tokens_errors(tiny_models_v1):
    text_encoder = copy.deepcopy(tiny_models_v1[2])
    tokenizer = load_tokenizer()
    with pytest.raises(UserError, match=r"wrong\.pt: embedding dimension 768 does not match the text encoder's 32"):
        ef.add_embedding_tokens(tokenizer, text_encoder, "mychar", torch.zeros(1, 768), "wrong.pt")
    with pytest.raises(UserError, match="already knows the token 'Cat'"):
        ef.add_embedding_tokens(tokenizer, text_encoder, "Cat", torch.zeros(1, 32), "--token_string")
    with pytest.raises(UserError, match="without spaces"):
        ef.add_embedding_tokens(tokenizer, text_encoder, "my char", torch.zeros(1, 32), "--token_string")
    assert len(tokenizer) == 49408  # nothing was added by the failed calls


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saved_files_load_in_diffusers(tiny_models_v1, tmp_path, suffix):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, vae, text_encoder = tiny_models_v1
    vectors = _vectors(2, dim=32)
    path = ef.save_embedding(tmp_path / f"mychar{suffix}", vectors)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=copy.deepcopy(text_encoder), tokenizer=load_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_textual_inversion(str(path), token="mychar")
    ids = pipe.tokenizer.convert_tokens_to_ids(["mychar", "mychar_1"])  # diffusers names extra vectors tok_1
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), vectors)

    ours = load_tokenizer()
    our_te = copy.deepcopy(text_encoder)
    _, our_ids = ef.load_embedding_into(ours, our_te, path)
    prompt_ids = torch.tensor([ours("a mychar mychar1 photo", padding="max_length", max_length=77).input_ids])
    their_prompt = pipe.maybe_convert_prompt("a mychar photo", pipe.tokenizer)  # diffusers expands multi-vector tokens
    theirs = torch.tensor([pipe.tokenizer(their_prompt, padding="max_length", max_length=77).input_ids])
    assert theirs[0, 2:4].tolist() == our_ids
    with torch.no_grad():
        assert torch.allclose(our_te(prompt_ids)[0], pipe.text_encoder(theirs)[0], atol=1e-6)
