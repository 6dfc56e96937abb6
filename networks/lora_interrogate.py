"""Which vocabulary tokens a LoRA's text-encoder part changes most (lora_interrogator.py).

Every token id t from 0 to the largest special id is encoded as `[BOS, t, EOS]` by the text
encoder without and with the LoRA (optionally at `clip_skip`, as training encodes captions),
and the tokens are ranked by the mean absolute difference of the encoder states. Tokens a
LoRA was trained on (its trigger words) tend to rank high.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from tqdm import tqdm

from library.text_encoding import run_text_encoder

logger = logging.getLogger(__name__)


@torch.no_grad()
def token_states(
    text_encoder: torch.nn.Module,
    bos_id: int,
    eos_id: int,
    token_ids: range,
    batch_size: int,
    clip_skip: Optional[int],
) -> torch.Tensor:
    """Encoder states `[len(token_ids), 3, D]` (float32, CPU) of `[BOS, t, EOS]` for every t."""
    device = next(text_encoder.parameters()).device
    out = []
    starts = range(token_ids.start, token_ids.stop, batch_size)
    for start in tqdm(starts, desc="tokens", unit="batch", leave=False):
        ids = torch.arange(start, min(start + batch_size, token_ids.stop), device=device)
        batch = torch.stack([torch.full_like(ids, bos_id), ids, torch.full_like(ids, eos_id)], dim=1)
        out.append(run_text_encoder(text_encoder, batch, clip_skip).float().cpu())
    return torch.cat(out)


def rank_tokens(original: torch.Tensor, with_lora: torch.Tensor, first_id: int = 0) -> list[tuple[int, float]]:
    """[(token id, mean |Δ state|)] sorted by the change, largest first."""
    diffs = (with_lora - original).abs().flatten(1).mean(dim=1)
    order = torch.argsort(diffs, descending=True, stable=True)
    return [(first_id + int(i), float(diffs[i])) for i in order]
