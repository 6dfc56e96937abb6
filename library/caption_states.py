"""Text-encoder states of the captions a training run shows: how captions are encoded
(`text_encode_fn`, the flags `--weighted_captions`, `--no_token_padding`, `--max_token_length`,
`--clip_skip`), the per-caption cache a frozen text encoder's states live in
(`TextEmbeddingCache`), and which captions the next batches will show (`captions_ahead`), so
the cache can be filled before the loop and the text encoder never runs inside a step.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

import numpy as np
import torch

from library.train_method import TrainContext


class TextEmbeddingCache:
    """Encoder states per caption string (frozen text encoder), kept in host memory.

    One caption per encoder call, so states never depend on batch mates (resumed runs stay
    bit-identical); past `max_entries` captions, new ones are encoded but not stored."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], device: torch.device, max_entries: int = 50_000):
        self._encode, self._device, self._max_entries = encode, device, max_entries
        self._states: dict[str, torch.Tensor] = {}

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def _states_of(self, caption: str) -> torch.Tensor:
        states = self._states.get(caption)
        if states is None:
            if self._encode is None:
                raise RuntimeError(f"caption not in the text-encoder cache after the encoder was released: {caption!r}")
            with torch.no_grad():
                states = self._encode([caption])[0].to("cpu")
            if len(self._states) < self._max_entries:
                self._states[caption] = states
        return states

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._states_of(c) for c in captions]).to(self._device, non_blocking=True)

    def fill(self, captions: Sequence[str]) -> int:
        """Encode now (one caption per call, as the loop would) the captions not cached yet, while
        there is room; returns how many were encoded."""
        added = 0
        for caption in captions:
            if caption not in self._states and len(self._states) < self._max_entries:
                self._states_of(caption)
                added += 1
        return added

    def seal(self) -> None:
        """No more encoding: the text encoder is about to be released (every caption is cached)."""
        self._encode = None

    def __len__(self) -> int:
        return len(self._states)


def text_encode_fn(args: argparse.Namespace, ctx: TrainContext) -> Callable[[list[str]], torch.Tensor]:
    from library import text_encoding

    tokenizer, text_encoder = ctx.models.tokenizer, ctx.models.text_encoder
    max_token_length, clip_skip = getattr(args, "max_token_length", None), getattr(args, "clip_skip", None)
    weighted = bool(getattr(args, "weighted_captions", False))
    no_padding = bool(getattr(args, "no_token_padding", False))

    def encode(captions: list[str]) -> torch.Tensor:
        if weighted:
            return text_encoding.encode_weighted_captions(
                tokenizer, text_encoder, captions, max_token_length, clip_skip, ctx.weight_dtype
            )
        if no_padding:  # --no_token_padding (train_db): ids padded to the batch's longest caption only
            input_ids = text_encoding.tokenize_padded_to_longest(tokenizer, captions)
        else:
            input_ids = text_encoding.tokenize_captions(tokenizer, captions, max_token_length)
        return text_encoding.encode_input_ids(text_encoder, input_ids, tokenizer, max_token_length, clip_skip, ctx.weight_dtype)

    return encode


def captions_ahead(dataset_group: Any, epoch: int, batch_index: int, batches: int, limit: int) -> list[str]:
    """Distinct captions of the next `batches` batches from (epoch, batch_index), at most `limit`,
    for a dataset group whose captions are fixed (one caption per image, no random draw)."""
    from library.captions import process_caption

    unused_rng = np.random.default_rng(0)  # fixed captions draw nothing from it
    images = sum(len(d.image_data) for d in dataset_group.datasets)
    captions: dict[str, None] = {}
    seen: set[tuple[int, str]] = set()
    while batches > 0 and len(captions) < limit and len(seen) < images:
        order = dataset_group.epoch_order(epoch)
        for dataset_index, image_keys in order[batch_index:batch_index + batches]:
            dataset = dataset_group.datasets[dataset_index]
            for key in image_keys:
                if (dataset_index, key) in seen:
                    continue
                seen.add((dataset_index, key))
                info = dataset.image_data[key]
                caption = process_caption(info.caption, dataset.subset_of(info), unused_rng, epoch, 0,
                                          dataset_group.max_train_steps, dataset_group.replacements)
                captions.setdefault(caption, None)
        batches -= max(0, len(order) - batch_index)
        epoch, batch_index = epoch + 1, 0
    return list(captions)[:limit]
