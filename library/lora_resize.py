"""Re-rank a LoRA by SVD (resize_lora.py): per module the best approximation of its ΔW.

Each module's ΔW = up·down·alpha/rank is decomposed exactly from its factors
(`lora_svd.svd_of_product`), the rank is chosen (`--new_rank` / `--new_conv_rank`, or a
`--dynamic_method`), and the module is rebuilt as up = U·S, down = Vh with
alpha = old scale · new rank, so the kept part of ΔW is unchanged (Eckart–Young: it is the
best rank-r approximation in Frobenius norm).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional

from tqdm import tqdm

from library import lora_svd
from library.lora_modules import LoraFile, LoraModuleWeights, lora_network_metadata

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResizeStat:
    """What happened to one module."""

    name: str
    old_rank: int
    new_rank: int
    kept_fro: float  # ‖kept ΔW‖_F / ‖ΔW‖_F
    fro_norm: float  # ‖ΔW‖_F of the input module


def resize_modules(
    lora: LoraFile,
    new_rank: int,
    new_conv_rank: Optional[int] = None,
    dynamic_method: Optional[str] = None,
    dynamic_param: Optional[float] = None,
    device: Optional[str] = None,
) -> tuple[dict[str, LoraModuleWeights], list[ResizeStat]]:
    """Resized modules (in file order) and per-module statistics.

    `new_rank` (3x3 convs: `new_conv_rank`, default `new_rank`) is the hard maximum; a module
    whose rank is already lower keeps its rank. With a dynamic method the rank is what the
    method picks for that module's singular values, capped at the maximum.
    """
    lora_svd.check_dynamic_args(dynamic_method, dynamic_param)
    conv_cap = new_rank if new_conv_rank is None else new_conv_rank
    resized: dict[str, LoraModuleWeights] = {}
    stats: list[ResizeStat] = []
    for name, module in tqdm(lora.modules.items(), desc="resizing", unit="module"):
        cap = conv_cap if module.is_conv3x3 else new_rank
        decomposition = lora_svd.svd_of_product(module.up2d().to(device or "cpu"), module.down2d().to(device or "cpu"))
        rank = lora_svd.dynamic_rank(decomposition.s, dynamic_method, dynamic_param, min(cap, module.rank))
        up2d, down2d = decomposition.factors(rank)
        alpha = module.scale * rank
        resized[name] = module.with_factors(up2d.cpu(), down2d.cpu(), alpha)
        norm = abs(module.scale) * float((decomposition.s**2).sum()) ** 0.5
        stats.append(ResizeStat(name, module.rank, rank, decomposition.kept_fro_fraction(rank), norm))
    smaller = [s for s in stats if s.old_rank < (conv_cap if lora.modules[s.name].is_conv3x3 else new_rank)]
    if smaller and dynamic_method is None:
        logger.info("%d modules already have a rank below the new rank and keep it (e.g. %s)", len(smaller), smaller[0].name)
    return resized, stats


def resized_metadata(
    lora: LoraFile, resized: Mapping[str, LoraModuleWeights], dynamic_method: Optional[str], dynamic_param: Optional[float]
) -> dict[str, str]:
    """The input's metadata with the network description updated and the resize noted in
    ss_training_comment (the hashes are recomputed on save)."""
    old_dim = lora.metadata.get("ss_network_dim")
    if old_dim in (None, "None"):
        old_dim = lora.network_dim_alpha()[0]
    metadata = lora_network_metadata(resized, lora.metadata)
    if dynamic_method is not None:
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
        new_desc = f"dynamic ({dynamic_method} {dynamic_param})"
    else:
        new_desc = metadata["ss_network_dim"]
    note = f"dimension is resized from {old_dim} to {new_desc}"
    comment = lora.metadata.get("ss_training_comment")
    metadata["ss_training_comment"] = f"{note}; {comment}" if comment and comment != "None" else note
    return metadata


def verbose_lines(stats: list[ResizeStat]) -> list[str]:
    """One line per module for --verbose: rank change and the kept Frobenius fraction."""
    return [f"{s.name}: rank {s.old_rank} -> {s.new_rank}, Frobenius norm kept {s.kept_fro:.6f}" for s in stats]


def resize_total_fro(stats: list[ResizeStat]) -> float:
    """Kept fraction of the Frobenius norm over all modules together."""
    total = sum(s.fro_norm**2 for s in stats)
    kept = sum((s.fro_norm * s.kept_fro) ** 2 for s in stats)
    return (kept / total) ** 0.5 if total > 0 else 1.0
