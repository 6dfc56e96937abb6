"""Cut a DyLoRA file into plain LoRA files of ranks unit, 2·unit, ... (extract_lora_from_dylora.py).

A DyLoRA is trained so that every rank prefix k·unit works on its own (SPEC 2.7); each cut is
`networks.dylora.dylora_rank_prefix` of the weights with the alpha kept, so the file at rank r
behaves exactly like the DyLoRA evaluated at rank r (`DyLoRANetwork.set_eval_rank(r)`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Optional

import torch

from library.errors import UserError
from networks.dylora import dylora_rank_prefix
from networks.lora import PathLike, weights_ranks_and_alphas

logger = logging.getLogger(__name__)


def trained_unit(metadata: Mapping[str, str]) -> Optional[int]:
    """The `unit` a DyLoRA was trained with, from `ss_network_args` (None when not recorded)."""
    raw = metadata.get("ss_network_args")
    if not raw:
        return None
    try:
        unit = json.loads(raw).get("unit")
        return int(unit) if unit is not None else None
    except (ValueError, TypeError, AttributeError):
        logger.warning("ss_network_args is not a JSON object of network args: %r", raw)
        return None


def split_ranks(
    weights_sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], unit: int, source: PathLike
) -> tuple[int, list[int]]:
    """(maximum rank, ranks to cut: unit, 2·unit, ... below it), after checking `unit` fits the file."""
    if unit is None or unit <= 0:
        raise UserError(f"--unit must be a positive integer, got {unit!r}")
    module = metadata.get("ss_network_module")
    if module is not None and module != "networks.dylora":
        raise UserError(
            f"{source}: not a DyLoRA (ss_network_module is {module}); "
            "its rank prefixes were not trained to work alone - use resize_lora.py to lower its rank"
        )
    modules_dim, _ = weights_ranks_and_alphas(weights_sd)
    max_rank = max(modules_dim.values())
    if unit >= max_rank:
        raise UserError(f"--unit {unit} is not smaller than the DyLoRA's rank {max_rank} ({source}): nothing to cut")
    trained = trained_unit(metadata)
    if trained is not None and unit % trained:
        raise UserError(
            f"--unit {unit} is not a multiple of the unit {trained} the DyLoRA {source} was trained with"
        )
    return max_rank, list(range(unit, max_rank, unit))


def cut_metadata(metadata: Mapping[str, str], max_rank: int, rank: int) -> dict[str, str]:
    """Source metadata with the new `ss_network_dim` and a note in `ss_training_comment`."""
    out = dict(metadata)
    out.pop("sshs_model_hash", None)
    out.pop("sshs_legacy_hash", None)
    comment = metadata.get("ss_training_comment", "")
    out["ss_training_comment"] = f"split from DyLoRA, rank {max_rank} to {rank}; {comment}"
    out["ss_network_dim"] = str(rank)
    return out


def cut_file_name(save_to: PathLike, rank: int) -> Path:
    """`<stem>-<rank:04d><ext>` beside `save_to` (sd-scripts' naming)."""
    save_to = Path(save_to)
    return save_to.with_name(f"{save_to.stem}-{rank:04d}{save_to.suffix}")


def dylora_cuts(
    weights_sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], unit: int, source: PathLike
) -> list[tuple[int, dict[str, torch.Tensor], dict[str, str]]]:
    """[(rank, weights, metadata)] for every cut of the DyLoRA."""
    max_rank, ranks = split_ranks(weights_sd, metadata, unit, source)
    logger.info("DyLoRA rank %d: cutting ranks %s", max_rank, ", ".join(map(str, ranks)))
    return [(rank, dylora_rank_prefix(weights_sd, rank), cut_metadata(metadata, max_rank, rank)) for rank in ranks]
