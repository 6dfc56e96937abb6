"""Long and weighted prompt embeddings for generation (samples and gen_img; SPEC 5.3).

A prompt may hold up to `max_embeddings_multiples` × 75 text tokens. Its ids are laid out
as `[BOS] + ids + [EOS] + padding` and cut into k chunks of 77 like the training layout
(`library.text_encoding.split_into_chunks`), where k is the fewest chunks that hold the
longest of the prompt and its negative prompt, so both encode to the same length. Each
chunk keeps its own BOS/EOS states, giving 77·k vectors (or, with `no_boseos_middle`,
75·k + 2 like training). `(word:1.2)` weights then scale each token's vector and every
prompt is rescaled to keep its mean.

v2 prompts are padded with the v2 tokenizer's pad id like every other v2 path of the
toolkit (sd-scripts' copy of this pipeline pads with EOS there).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from library.text_encoding import (
    CHUNK_LENGTH,
    CHUNK_TEXT_LENGTH,
    apply_weights_keeping_mean,
    build_padded_rows,
    run_text_encoder,
    split_into_chunks,
    tokenize_with_weights,
)

logger = logging.getLogger(__name__)


def _tokenize_prompts(
    tokenizer, prompts: Sequence[str], max_tokens: int, skip_parsing: bool
) -> tuple[list[list[int]], list[list[float]]]:
    token_rows: list[list[int]] = []
    weight_rows: list[list[float]] = []
    truncated_any = False
    for prompt in prompts:
        if skip_parsing:
            ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
            truncated = len(ids) > max_tokens
            ids = ids[:max_tokens]
            weights = [1.0] * len(ids)
        else:
            ids, weights, truncated = tokenize_with_weights(tokenizer, prompt, max_tokens)
        token_rows.append(ids)
        weight_rows.append(weights)
        truncated_any |= truncated
    if truncated_any:
        logger.warning(
            "prompt truncated to %d tokens; shorten it or raise max_embeddings_multiples", max_tokens
        )
    return token_rows, weight_rows


def _encode_chunks(
    text_encoder, chunks: torch.Tensor, clip_skip: int | None, no_boseos_middle: bool
) -> torch.Tensor:
    """States of `[B, k, 77]` chunks: `[B, 77·k, D]`, or `[B, 75·k + 2, D]` without middle BOS/EOS."""
    batch_size, num_chunks, _ = chunks.shape
    device = next(text_encoder.parameters()).device
    states = run_text_encoder(text_encoder, chunks.reshape(-1, CHUNK_LENGTH).to(device), clip_skip)
    states = states.reshape(batch_size, num_chunks, CHUNK_LENGTH, states.shape[-1])
    if not no_boseos_middle or num_chunks == 1:
        return states.reshape(batch_size, num_chunks * CHUNK_LENGTH, states.shape[-1])
    inner = states[:, :, 1:-1].reshape(batch_size, num_chunks * CHUNK_TEXT_LENGTH, states.shape[-1])
    return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)


def _chunk_weights(position_weights: torch.Tensor, num_chunks: int, no_boseos_middle: bool) -> torch.Tensor:
    """Per-vector weights matching `_encode_chunks`' layout (1.0 on every BOS/EOS)."""
    if no_boseos_middle or num_chunks == 1:
        return position_weights
    batch_size = position_weights.shape[0]
    inner = position_weights[:, 1:-1].reshape(batch_size, num_chunks, CHUNK_TEXT_LENGTH)
    ones = torch.ones(batch_size, num_chunks, 1, dtype=position_weights.dtype)
    return torch.cat([ones, inner, ones], dim=2).reshape(batch_size, num_chunks * CHUNK_LENGTH)


def get_weighted_text_embeddings(
    tokenizer,
    text_encoder,
    prompt: str | Sequence[str],
    uncond_prompt: str | Sequence[str] | None = None,
    max_embeddings_multiples: int = 3,
    clip_skip: int | None = None,
    no_boseos_middle: bool = False,
    skip_parsing: bool = False,
    skip_weighting: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings of `prompt` (and `uncond_prompt`, padded to the same length).

    Returns `(text_embeddings [B, 77·k, D], uncond_embeddings [B, 77·k, D] or None)`.
    `skip_parsing` tokenizes the prompt literally (brackets included) and implies
    `skip_weighting`.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    uncond_prompts = None
    if uncond_prompt is not None:
        uncond_prompts = [uncond_prompt] if isinstance(uncond_prompt, str) else list(uncond_prompt)
    max_embeddings_multiples = max(1, int(max_embeddings_multiples))
    max_tokens = CHUNK_TEXT_LENGTH * max_embeddings_multiples

    token_rows, weight_rows = _tokenize_prompts(tokenizer, prompts, max_tokens, skip_parsing)
    uncond_token_rows, uncond_weight_rows = [], []
    if uncond_prompts is not None:
        uncond_token_rows, uncond_weight_rows = _tokenize_prompts(tokenizer, uncond_prompts, max_tokens, skip_parsing)

    longest = max(len(ids) for ids in token_rows + uncond_token_rows)
    num_chunks = max(1, min(max_embeddings_multiples, math.ceil(longest / CHUNK_TEXT_LENGTH)))
    total_length = CHUNK_TEXT_LENGTH * num_chunks + 2
    apply_weights = not (skip_parsing or skip_weighting)

    def encode(rows: list[list[int]], weights: list[list[float]]) -> torch.Tensor:
        id_rows, position_weights = build_padded_rows(tokenizer, rows, weights, total_length)
        chunks = split_into_chunks(tokenizer, id_rows)
        embeddings = _encode_chunks(text_encoder, chunks, clip_skip, no_boseos_middle)
        if apply_weights:
            embeddings = apply_weights_keeping_mean(
                embeddings, _chunk_weights(position_weights, num_chunks, no_boseos_middle)
            )
        return embeddings

    text_embeddings = encode(token_rows, weight_rows)
    uncond_embeddings = encode(uncond_token_rows, uncond_weight_rows) if uncond_prompts is not None else None
    return text_embeddings, uncond_embeddings
