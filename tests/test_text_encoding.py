"""Tokenizers (packaged CLIP BPE vs. a reference implementation and published ids) and
training text encoding: chunks for --max_token_length, clip_skip, --weighted_captions."""
from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import torch

from library.errors import UserError
from library.text_encoding import (
    apply_weights_keeping_mean,
    encode_input_ids,
    encode_weighted_captions,
    is_v2_tokenizer,
    tokenize_captions,
    tokenize_padded_to_longest,
    tokenize_with_weights,
)
from library.tokenizer_util import TOKENIZER_DIR, load_tokenizer

BOS, EOS, V2_PAD = 49406, 49407, 0


# ---------------------------------------------------------------------------------------
# Reference CLIP BPE, written from the published algorithm (CLIP's simple_tokenizer):
# bytes → printable unicode map, regex pre-tokenisation, lowercase + whitespace clean-up,
# then per word: repeatedly merge the adjacent pair with the lowest merge rank.


def _byte_to_unicode() -> dict[int, str]:
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in kept}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


_PRETOKENIZE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


class ReferenceClipBpe:
    def __init__(self, folder: Path) -> None:
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        self.byte_map = _byte_to_unicode()
        self.merges = merges

    @lru_cache(maxsize=None)
    def word_to_symbols(self, word: str) -> tuple[str, ...]:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(
                ((self.ranks[pair], pair) for pair in zip(symbols, symbols[1:]) if pair in self.ranks),
                default=None,
            )
            if best is None:
                break
            first, second = best[1]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode_segment(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        text = " ".join(text.split()).lower()
        ids = []
        for piece in _PRETOKENIZE.findall(text):
            mapped = "".join(self.byte_map[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.vocab[symbol] for symbol in self.word_to_symbols(mapped))
        return ids

    def encode(self, text: str, exclamation_is_pad: bool = False) -> list[int]:
        """With `exclamation_is_pad` (hub SD v2 tokenizer, whose pad token is "!"), every "!"
        is cut out as a special token of id 0 before BPE (diffusers issue #4153)."""
        if not exclamation_is_pad:
            return [BOS, *self.encode_segment(text), EOS]
        ids = [BOS]
        for index, segment in enumerate(text.split("!")):
            if index:
                ids.append(V2_PAD)
            ids.extend(self.encode_segment(segment))
        return ids + [EOS]


@pytest.fixture(scope="module")
def reference_bpe():
    return ReferenceClipBpe(TOKENIZER_DIR)


REFERENCE_STRINGS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, 1girl, solo, looking at viewer",
    "hatsune_miku, twintails, aqua_hair",
    "(cat:1.2), [dog], ((bird))",
    "it's a dog's life, isn't it? we'll see, they've gone, I'm here, you'd know, we're done",
    "DON'T STOP",
    "  leading and   multiple\tspaces\nand newlines  ",
    "12345 67.89 3.14159 1,000,000",
    "model year 2023, 4k, 8k uhd, 16:9",
    "hello!!! ??? ... --- *** ###",
    "e-mail: someone@example.com, url https://example.com/a?b=c&d=e",
    "<lora:myLora:0.8> <hypernet:foo:1>",
    "café naïve résumé façade",
    "Ünïcödé ÀÉÎÕÜ straße",
    "日本語のテキスト 東京",
    "中文提示词 一只猫",
    "Привет мир кошка",
    "emoji 😀🐱🎨 and ❤️",
    "a\u00a0non-breaking space",
    "tabs\tand\u3000ideographic space",
    "semi;colon:colon|pipe/slash\\backslash",
    "quotes \"double\" 'single' `back`",
    "underscores_are_kept and hyphens-too",
    "x" * 60,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "CamelCaseWordsTogether",
    "ﬁ ligature and Å angstrom",
    "mixed123letters456",
    "",
]


@pytest.mark.parametrize("text", REFERENCE_STRINGS)
def test_tokenizer_matches_reference_bpe(tokenizer_v1, tokenizer_v2, reference_bpe, text):
    assert tokenizer_v1(text).input_ids == reference_bpe.encode(text)
    assert tokenizer_v2(text).input_ids == reference_bpe.encode(text, exclamation_is_pad=True)


def test_packaged_vocab_is_clip_vocab(reference_bpe):
    """CLIP's vocabulary is: 256 byte symbols, the same with "</w>", one entry per merge, 2 specials."""
    byte_symbols = list(_byte_to_unicode().values())
    expected_order = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in reference_bpe.merges]
    expected_order += ["<|startoftext|>", "<|endoftext|>"]
    assert len(reference_bpe.merges) == 49152 - 256 - 2
    assert reference_bpe.vocab == {symbol: index for index, symbol in enumerate(expected_order)}


# Published id lists (tokenizers of openai/clip-vit-large-patch14 / OpenAI CLIP):
PUBLISHED_IDS = [
    # docs/architecture SPEC 9 and many sources
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    # apple/ml-stable-diffusion swift/StableDiffusionTests/StableDiffusionTests.swift (testBPETokenizer)
    ("a photo of an astronaut riding a horse on mars", [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]),
    (
        "Apple CoreML developer tools on a Macbook Air are fast",
        [49406, 3055, 19622, 5780, 10929, 5771, 525, 320, 20617, 1922, 631, 1953, 49407],
    ),
    # nishio/external_brain_in_markdown pages/CLIP.md (output of OpenAI clip.tokenize)
    ("a painting of a cat", [49406, 320, 3086, 539, 320, 2368, 49407]),
    ("bozuman", [49406, 647, 4091, 786, 49407]),
    # an Emgu CV CLIP test ("Tokenizer exactness against the huggingface CLIPTokenizer reference")
    ("Hello, World! 123", [49406, 3306, 267, 1002, 256, 272, 273, 274, 49407]),
    # a transformers.js-based SD tokenizer test (stable-diffusion-2-1-base tokenizer)
    ("An astronaut riding a horse", [49406, 550, 18376, 6765, 320, 4558, 49407]),
]


@pytest.mark.parametrize("text,expected", PUBLISHED_IDS)
def test_tokenizer_published_ids(tokenizer_v1, tokenizer_v2, text, expected):
    assert tokenizer_v1(text).input_ids == expected
    # v2 differs only where "!" (its pad token) occurs
    assert tokenizer_v2(text).input_ids == [V2_PAD if id_ == 256 else id_ for id_ in expected]


def test_v2_exclamation_marks_are_pad_tokens_like_the_hub(tokenizer_v1, tokenizer_v2):
    # huggingface/diffusers issue #4153: the hub SD v2 / XL tokenizer (pad token "!") gives
    # [49406, 0, 0, 0, 0, 0, 0, 49407] for "! !! !!!"; OpenCLIP itself gives 256, 748, 995.
    assert tokenizer_v2("! !! !!!").input_ids == [BOS, 0, 0, 0, 0, 0, 0, EOS]
    assert tokenizer_v1("! !! !!!").input_ids == [BOS, 256, 748, 995, EOS]


def test_special_tokens_and_padding(tokenizer_v1, tokenizer_v2):
    assert (tokenizer_v1.bos_token_id, tokenizer_v1.eos_token_id, tokenizer_v1.pad_token_id) == (BOS, EOS, EOS)
    assert (tokenizer_v2.bos_token_id, tokenizer_v2.eos_token_id, tokenizer_v2.pad_token_id) == (BOS, EOS, V2_PAD)
    assert tokenizer_v1.model_max_length == tokenizer_v2.model_max_length == 77
    assert not is_v2_tokenizer(tokenizer_v1) and is_v2_tokenizer(tokenizer_v2)
    cat = [BOS, 320, 1125, 539, 320, 2368, EOS]
    v1 = tokenizer_v1("a photo of a cat", padding="max_length", truncation=True, max_length=77).input_ids
    v2 = tokenizer_v2("a photo of a cat", padding="max_length", truncation=True, max_length=77).input_ids
    assert v1 == cat + [EOS] * 70
    assert v2 == cat + [V2_PAD] * 70


def test_long_prompt_truncated_to_77_keeping_eos(tokenizer_v1, tokenizer_v2, reference_bpe):
    text = ", ".join(f"word{i}" for i in range(60))  # far more than 75 tokens
    full = reference_bpe.encode(text)
    assert len(full) > 77
    for tokenizer in (tokenizer_v1, tokenizer_v2):
        ids = tokenizer(text, padding="max_length", truncation=True, max_length=77).input_ids
        assert ids == full[:76] + [EOS]


def test_tokenizer_cache_dir_saves_then_loads(tmp_path):
    cache = tmp_path / "cache"
    first = load_tokenizer(v2=False, tokenizer_cache_dir=cache)
    saved = cache / "openai_clip-vit-large-patch14"
    assert (saved / "tokenizer_config.json").is_file()
    assert first("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    load_tokenizer(v2=True, tokenizer_cache_dir=cache)
    assert (cache / "stabilityai_stable-diffusion-2" / "tokenizer_config.json").is_file()
    again_v2 = load_tokenizer(v2=True, tokenizer_cache_dir=cache)
    assert again_v2.pad_token_id == V2_PAD
    assert again_v2("a cat", padding="max_length", max_length=6).input_ids == [BOS, 320, 2368, EOS, 0, 0]


def test_tokenizer_cache_dir_uses_saved_tokenizer(tmp_path):
    cache = tmp_path / "cache"
    modified = load_tokenizer(v2=False)
    modified.add_tokens(["<my-new-token>"])
    modified.save_pretrained(str(cache / "openai_clip-vit-large-patch14"))
    loaded = load_tokenizer(v2=False, tokenizer_cache_dir=cache)
    assert len(loaded) == 49409
    assert loaded("<my-new-token>").input_ids == [BOS, 49408, EOS]
    assert len(load_tokenizer(v2=False)) == 49408  # the packaged one is unchanged


# ---------------------------------------------------------------------------------------
# Training layout (SPEC 5.3)

LONG_CAPTION = " ".join(["red"] * 100)  # "red" is one token: 100 text tokens
RED = 736


def test_red_is_one_token(tokenizer_v1):
    assert tokenizer_v1("red", add_special_tokens=False).input_ids == [RED]


@pytest.mark.parametrize("max_token_length,chunks", [(None, 1), (75, 1), (150, 2), (225, 3)])
def test_tokenize_captions_shapes(tokenizer_v1, max_token_length, chunks):
    ids = tokenize_captions(tokenizer_v1, ["a cat", LONG_CAPTION, ""], max_token_length)
    assert ids.shape == (3, chunks, 77)
    assert ids.dtype == torch.long
    assert (ids[:, :, 0] == BOS).all()


def test_tokenize_captions_rejects_bad_length(tokenizer_v1):
    with pytest.raises(UserError, match="--max_token_length"):
        tokenize_captions(tokenizer_v1, ["a"], 100)


def test_tokenize_captions_v1_chunk_layout(tokenizer_v1):
    ids = tokenize_captions(tokenizer_v1, [LONG_CAPTION], 150)[0]
    assert ids[0].tolist() == [BOS] + [RED] * 75 + [EOS]
    assert ids[1].tolist() == [BOS] + [RED] * 25 + [EOS] * 51
    ids3 = tokenize_captions(tokenizer_v1, [LONG_CAPTION], 225)[0]
    assert ids3[2].tolist() == [BOS] + [EOS] * 76
    # more than 225 tokens: truncated, the final chunk still ends with EOS
    longer = tokenize_captions(tokenizer_v1, [" ".join(["red"] * 300)], 225)[0]
    assert longer[2].tolist() == [BOS] + [RED] * 75 + [EOS]


def test_tokenize_captions_v2_fixups(tokenizer_v2):
    ids = tokenize_captions(tokenizer_v2, [LONG_CAPTION], 225)[0]
    # chunk 0 is full of text: its last id (the row's final PAD) becomes EOS
    assert ids[0].tolist() == [BOS] + [RED] * 75 + [EOS]
    # chunk 1: text, EOS, padding; last id stays PAD because the chunk ends in padding
    assert ids[1].tolist() == [BOS] + [RED] * 25 + [EOS] + [V2_PAD] * 50
    # chunk 2 holds only padding: it reads "BOS EOS PAD ..."
    assert ids[2].tolist() == [BOS, EOS] + [V2_PAD] * 75
    # text ending exactly at the chunk's end (75 tokens): EOS lands in the next chunk
    exact = tokenize_captions(tokenizer_v2, [" ".join(["red"] * 75)], 150)[0]
    assert exact[0].tolist() == [BOS] + [RED] * 75 + [EOS]
    assert exact[1].tolist() == [BOS, EOS] + [V2_PAD] * 75
    # one chunk: the plain tokenizer output
    single = tokenize_captions(tokenizer_v2, ["red"], None)[0, 0]
    assert single.tolist() == [BOS, RED, EOS] + [V2_PAD] * 74


def _plain_states(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("max_token_length,length", [(None, 77), (150, 152), (225, 227)])
def test_encode_shapes(tiny_models_v1, tiny_models_v2, tokenizer_v1, tokenizer_v2, v2, max_token_length, length):
    text_encoder = (tiny_models_v2 if v2 else tiny_models_v1)[2]
    tokenizer = tokenizer_v2 if v2 else tokenizer_v1
    ids = tokenize_captions(tokenizer, ["a cat", LONG_CAPTION], max_token_length)
    with torch.no_grad():
        states = encode_input_ids(text_encoder, ids, tokenizer, max_token_length, None)
    assert states.shape == (2, length, text_encoder.config.hidden_size)
    assert torch.isfinite(states).all()


def test_short_caption_equals_plain_encoder(tiny_models_v1, tokenizer_v1):
    text_encoder = tiny_models_v1[2]
    ids = tokenize_captions(tokenizer_v1, ["a photo of a cat"], None)
    plain_ids = tokenizer_v1("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = encode_input_ids(text_encoder, ids, tokenizer_v1, None, None)
    assert torch.equal(states, _plain_states(text_encoder, plain_ids))


@pytest.mark.parametrize("v2", [False, True])
def test_chunk_concatenation_rule(tiny_models_v1, tiny_models_v2, tokenizer_v1, tokenizer_v2, v2):
    text_encoder = (tiny_models_v2 if v2 else tiny_models_v1)[2]
    tokenizer = tokenizer_v2 if v2 else tokenizer_v1
    captions = [LONG_CAPTION, "a small cat"]
    ids = tokenize_captions(tokenizer, captions, 225)
    with torch.no_grad():
        states = encode_input_ids(text_encoder, ids, tokenizer, 225, None)
    for row in range(len(captions)):
        per_chunk = [_plain_states(text_encoder, ids[row, k : k + 1])[0] for k in range(3)]
        expected = torch.cat(
            [per_chunk[0][:1], per_chunk[0][1:76], per_chunk[1][1:76], per_chunk[2][1:76], per_chunk[2][76:]]
        )
        assert expected.shape[0] == 227
        torch.testing.assert_close(states[row], expected, rtol=1e-5, atol=1e-6)


def test_clip_skip(tiny_models_v1, tokenizer_v1):
    text_encoder = tiny_models_v1[2]
    ids = tokenize_captions(tokenizer_v1, ["a cat", LONG_CAPTION], 150)
    flat = ids.reshape(-1, 77)
    with torch.no_grad():
        skipped = encode_input_ids(text_encoder, ids, tokenizer_v1, 150, 2)
        last = encode_input_ids(text_encoder, ids, tokenizer_v1, 150, None)
        one = encode_input_ids(text_encoder, ids, tokenizer_v1, 150, 1)
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states
        final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 5 has no .text_model
        penultimate = final_layer_norm(hidden[-2]).reshape(2, 2, 77, -1)
    expected = torch.cat([penultimate[:, 0, :1], penultimate[:, :, 1:76].reshape(2, 150, -1), penultimate[:, 1, 76:]], 1)
    torch.testing.assert_close(skipped, expected)
    assert torch.equal(one, last)
    assert (skipped - last).abs().max() > 1e-3


def test_no_token_padding_ids(tiny_models_v1, tokenizer_v1):
    text_encoder = tiny_models_v1[2]
    ids = tokenize_padded_to_longest(tokenizer_v1, ["a cat", "a photo of a cat"])
    assert ids.shape == (2, 7)
    with torch.no_grad():
        states = encode_input_ids(text_encoder, ids, tokenizer_v1, None, None)
    torch.testing.assert_close(states, _plain_states(text_encoder, ids))


def test_weight_dtype(tiny_models_v1, tokenizer_v1):
    ids = tokenize_captions(tokenizer_v1, ["a cat"], None)
    with torch.no_grad():
        states = encode_input_ids(tiny_models_v1[2], ids, tokenizer_v1, None, None, weight_dtype=torch.bfloat16)
    assert states.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------
# --weighted_captions


def test_tokenize_with_weights(tokenizer_v1):
    ids, weights, truncated = tokenize_with_weights(tokenizer_v1, "a (red:1.5) cat [dog]", 75)
    assert ids == tokenizer_v1("a red cat dog", add_special_tokens=False).input_ids
    assert weights == pytest.approx([1.0, 1.5, 1.0, 1 / 1.1])
    assert not truncated
    ids, weights, truncated = tokenize_with_weights(tokenizer_v1, LONG_CAPTION, 75)
    assert len(ids) == len(weights) == 75 and truncated


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_unit_weights_equal_unweighted(
    tiny_models_v1, tiny_models_v2, tokenizer_v1, tokenizer_v2, v2, max_token_length
):
    text_encoder = (tiny_models_v2 if v2 else tiny_models_v1)[2]
    tokenizer = tokenizer_v2 if v2 else tokenizer_v1
    captions = ["a photo of a cat, best quality", LONG_CAPTION, ""]
    with torch.no_grad():
        plain = encode_input_ids(text_encoder, tokenize_captions(tokenizer, captions, max_token_length), tokenizer, max_token_length, 2)
        weighted = encode_weighted_captions(tokenizer, text_encoder, captions, max_token_length, 2)
    assert torch.equal(plain, weighted)


def test_weights_scale_tokens_and_keep_mean(tiny_models_v1, tokenizer_v1):
    text_encoder = tiny_models_v1[2]
    with torch.no_grad():
        plain = encode_input_ids(text_encoder, tokenize_captions(tokenizer_v1, ["a red cat"], 150), tokenizer_v1, 150, None)
        weighted = encode_weighted_captions(tokenizer_v1, text_encoder, ["a (red:1.5) [cat]"], 150, None)
    weights = torch.ones(1, 152)
    weights[0, 2] = 1.5  # position 0 is BOS, 1 "a", 2 "red", 3 "cat"
    weights[0, 3] = 1 / 1.1
    scaled = plain * weights[..., None]
    expected = scaled * (plain.mean() / scaled.mean())
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    assert (weighted - plain).abs().max() > 1e-3


def test_apply_weights_keeping_mean_per_sample():
    embeddings = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0)) + 1.0
    weights = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    out = apply_weights_keeping_mean(embeddings, weights)
    torch.testing.assert_close(out.mean(dim=(1, 2)), embeddings.mean(dim=(1, 2)))
    assert torch.equal(out[1], embeddings[1])
