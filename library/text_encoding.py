"""Caption tokenization and text-encoder states for training (SPEC 5.3 "Training").

`--max_token_length` 75 (default) / 150 / 225 tokenizes every caption to 77 / 152 / 227 ids
(BOS, up to 75·k text ids, EOS, padding) and splits them into k chunks of 77 ids, each
`[BOS] + 75 ids + [last id]`, because the CLIP text encoder only has 77 positions. After
encoding each chunk separately, the states are glued back into one sequence of 75·k + 2
vectors: the BOS state of chunk 0, the 75 inner states of every chunk, the last state of
the final chunk.

v1 tokenizers pad with EOS; v2 tokenizers pad with "!" (id 0), which is how a v2 tokenizer
is recognised (`pad_token_id != eos_token_id`). For v2 a chunk whose text runs up to its
end gets EOS as last id, and a chunk holding only padding starts with `[BOS, EOS]`.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from library.errors import UserError
from library.prompt_weighting import parse_prompt_attention

logger = logging.getLogger(__name__)

CHUNK_LENGTH = 77  # positions of the CLIP text encoder
CHUNK_TEXT_LENGTH = CHUNK_LENGTH - 2  # text ids per chunk, between BOS and EOS
VALID_MAX_TOKEN_LENGTHS = (75, 150, 225)


def is_v2_tokenizer(tokenizer) -> bool:
    """True for the SD v2 (OpenCLIP) tokenizer, which pads with "!" instead of EOS."""
    return tokenizer.pad_token_id != tokenizer.eos_token_id


def text_token_limit(max_token_length: int | None) -> int:
    """Number of text ids kept per caption for `--max_token_length` (None ⇒ 75)."""
    if max_token_length is None:
        return CHUNK_TEXT_LENGTH
    if max_token_length not in VALID_MAX_TOKEN_LENGTHS:
        raise UserError(
            f"--max_token_length must be one of 75, 150, 225 (or unset), got {max_token_length}"
        )
    return max_token_length


def split_into_chunks(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """Split padded id rows `[B, 75·k + 2]` into `[B, k, 77]` encoder chunks.

    Each chunk is `[BOS] + its 75 text positions + [the row's last id]`, with the v2
    fix-ups described in the module docstring.
    """
    batch_size, total_length = input_ids.shape
    if (total_length - 2) % CHUNK_TEXT_LENGTH != 0:
        raise ValueError(f"id rows must be 75·k + 2 long, got {total_length}")
    num_chunks = (total_length - 2) // CHUNK_TEXT_LENGTH
    if num_chunks == 1:
        return input_ids.reshape(batch_size, 1, CHUNK_LENGTH)

    v2 = is_v2_tokenizer(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for chunk_index in range(num_chunks):
        start = 1 + chunk_index * CHUNK_TEXT_LENGTH
        chunk = torch.cat(
            [input_ids[:, :1], input_ids[:, start : start + CHUNK_TEXT_LENGTH], input_ids[:, -1:]], dim=1
        )
        if v2:
            # text running to the end of the chunk must still be closed by EOS
            text_at_end = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[text_at_end, -1] = eos
            # a chunk of padding only reads "BOS EOS PAD ..." like an empty prompt
            only_padding = chunk[:, 1] == pad
            chunk[only_padding, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def tokenize_captions(tokenizer, captions: Sequence[str], max_token_length: int | None = None) -> torch.Tensor:
    """Tokenize captions to `[B, k, 77]` ids, k = 1 / 2 / 3 for max_token_length None / 150 / 225.

    Longer captions are truncated (the EOS is kept), shorter ones padded.
    """
    total_length = text_token_limit(max_token_length) + 2
    input_ids = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=total_length, return_tensors="pt"
    ).input_ids
    return split_into_chunks(tokenizer, input_ids)


def tokenize_padded_to_longest(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """`--no_token_padding` ids `[B, L]`: one 77-limited chunk, padded to the batch's longest."""
    return tokenizer(
        list(captions), padding=True, truncation=True, max_length=CHUNK_LENGTH, return_tensors="pt"
    ).input_ids


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    text_model = getattr(text_encoder, "text_model", text_encoder)
    return text_model.final_layer_norm


def run_text_encoder(text_encoder, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """States `[N, L, D]` of `input_ids [N, L]`.

    clip_skip None/1: the last layer (final LayerNorm included); n ≥ 2: the output of the
    n-th layer from the end (`hidden_states[-n]`, index 0 being the embeddings) passed
    through the final LayerNorm.
    """
    if clip_skip is None or clip_skip <= 1:
        return text_encoder(input_ids)[0]
    output = text_encoder(input_ids, output_hidden_states=True, return_dict=True)
    return _final_layer_norm(text_encoder)(output.hidden_states[-clip_skip])


def _encoder_device(text_encoder) -> torch.device:
    return next(text_encoder.parameters()).device


def encode_input_ids(
    text_encoder,
    input_ids: torch.Tensor,
    tokenizer,
    max_token_length: int | None,
    clip_skip: int | None,
    weight_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Encoder states `[B, 75·k + 2, D]` of chunked ids `[B, k, 77]` from `tokenize_captions`.

    Ids `[B, L]` with L ≠ 77 (`--no_token_padding`) are encoded as they are.
    """
    input_ids = input_ids.to(_encoder_device(text_encoder))
    if input_ids.dim() == 2 and input_ids.shape[-1] != CHUNK_LENGTH:
        states = run_text_encoder(text_encoder, input_ids, clip_skip)
        return states if weight_dtype is None else states.to(weight_dtype)

    batch_size = input_ids.shape[0]
    chunks = input_ids.reshape(batch_size, -1, CHUNK_LENGTH)
    num_chunks = chunks.shape[1]
    expected_chunks = text_token_limit(max_token_length) // CHUNK_TEXT_LENGTH
    if num_chunks != expected_chunks:
        raise ValueError(
            f"input ids hold {num_chunks} chunks but max_token_length={max_token_length} needs {expected_chunks}"
        )
    states = run_text_encoder(text_encoder, chunks.reshape(-1, CHUNK_LENGTH), clip_skip)
    states = states.reshape(batch_size, num_chunks, CHUNK_LENGTH, states.shape[-1])
    if num_chunks == 1:
        joined = states[:, 0]
    else:
        inner = states[:, :, 1:-1].reshape(batch_size, num_chunks * CHUNK_TEXT_LENGTH, states.shape[-1])
        joined = torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)
    return joined if weight_dtype is None else joined.to(weight_dtype)


def tokenize_with_weights(tokenizer, text: str, max_tokens: int) -> tuple[list[int], list[float], bool]:
    """Text ids (no BOS/EOS) of a weighted prompt and one weight per id.

    Each parsed piece is tokenized on its own, as sd-scripts does, so brackets never reach
    the tokenizer. Returns (ids, weights, truncated) with at most `max_tokens` ids.
    """
    pieces = parse_prompt_attention(text)
    piece_ids = tokenizer([piece for piece, _ in pieces], add_special_tokens=False, verbose=False).input_ids
    ids: list[int] = []
    weights: list[float] = []
    for ids_of_piece, (_, weight) in zip(piece_ids, pieces):
        ids.extend(ids_of_piece)
        weights.extend([weight] * len(ids_of_piece))
    truncated = len(ids) > max_tokens
    return ids[:max_tokens], weights[:max_tokens], truncated


def build_padded_rows(
    tokenizer, token_rows: Sequence[Sequence[int]], weight_rows: Sequence[Sequence[float]], total_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[BOS] + ids + [EOS] + padding` rows of `total_length`, and per-position weights (1 for specials)."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    id_rows, position_weights = [], []
    for ids, weights in zip(token_rows, weight_rows):
        padding = total_length - 2 - len(ids)
        id_rows.append([bos, *ids, eos] + [pad] * padding)
        position_weights.append([1.0, *weights] + [1.0] * (padding + 1))
    return torch.tensor(id_rows, dtype=torch.long), torch.tensor(position_weights, dtype=torch.float32)


def apply_weights_keeping_mean(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each position's vector by its weight, then rescale every sample so its mean is unchanged."""
    weights = weights.to(device=embeddings.device, dtype=embeddings.dtype)
    previous_mean = embeddings.float().mean(dim=(-2, -1))
    weighted = embeddings * weights.unsqueeze(-1)
    current_mean = weighted.float().mean(dim=(-2, -1))
    return weighted * (previous_mean / current_mean).to(embeddings.dtype)[:, None, None]


def encode_weighted_captions(
    tokenizer,
    text_encoder,
    captions: Sequence[str],
    max_token_length: int | None,
    clip_skip: int | None,
    weight_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`--weighted_captions`: states `[B, 75·k + 2, D]` with `(word:1.2)` weights applied.

    Same layout as `encode_input_ids(tokenize_captions(...))`, so a caption without
    brackets encodes exactly as without `--weighted_captions`.
    """
    max_tokens = text_token_limit(max_token_length)
    token_rows, weight_rows = [], []
    any_truncated = False
    for caption in captions:
        ids, weights, truncated = tokenize_with_weights(tokenizer, caption, max_tokens)
        token_rows.append(ids)
        weight_rows.append(weights)
        any_truncated |= truncated
    if any_truncated:
        logger.warning("a weighted caption was longer than %d tokens and was truncated", max_tokens)
    id_rows, position_weights = build_padded_rows(tokenizer, token_rows, weight_rows, max_tokens + 2)
    chunks = split_into_chunks(tokenizer, id_rows)
    states = encode_input_ids(text_encoder, chunks, tokenizer, max_token_length, clip_skip)
    states = apply_weights_keeping_mean(states, position_weights)
    return states if weight_dtype is None else states.to(weight_dtype)
