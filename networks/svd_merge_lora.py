"""Merge LoRAs of any ranks into one LoRA of a chosen rank by SVD, like sd-scripts' svd_merge_lora.py.

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.3 \
        --save_to ab_r8.safetensors --new_rank 8

Per module the output is the best rank-r approximation (Frobenius norm) of
Σ ratio·up·down·alpha/rank, computed exactly from the factors; alpha = rank.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library import lora_merge, lora_svd, lora_tool_args  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.lora_modules import (  # noqa: E402
    check_distinct_output,
    check_lora_output,
    check_ratios,
    read_lora,
    write_lora,
)
from library.model_util import precision_to_dtype  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lora_tool_args.add_save_precision_argument(parser)
    lora_tool_args.add_precision_argument(parser, "precision the inputs are read in (default float); the SVD runs in float32")
    parser.add_argument("--save_to", type=str, default=None, help="output LoRA file (.safetensors / .pt / .ckpt)")
    lora_tool_args.add_models_ratios_arguments(parser, "LoRA files to merge (any ranks, LierLa or C3Lier)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (default 4)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default --new_rank)")
    lora_tool_args.add_device_argument(parser)
    lora_tool_args.add_clamp_quantile_argument(parser)
    lora_tool_args.add_no_metadata_argument(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.save_to is None:
        raise UserError("--save_to is required")
    ratios = check_ratios(args.models or [], args.ratios)
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank and --new_conv_rank must be positive integers")
    lora_tool_args.check_clamp_quantile(args.clamp_quantile)
    save_to = check_distinct_output(check_lora_output(args.save_to), args.models)
    device = lora_svd.check_device(args.device)
    merge_dtype = precision_to_dtype(args.precision) or torch.float32
    save_dtype = lora_tool_args.save_dtype_of(args.save_precision)

    loras = [read_lora(path).rounded_to(merge_dtype) for path in args.models]
    merged = lora_merge.svd_merge_modules(
        loras, ratios, args.new_rank, args.new_conv_rank, args.clamp_quantile, device
    )
    metadata = {} if args.no_metadata else lora_merge.merged_lora_metadata(merged, loras, save_to)
    write_lora(save_to, merged, save_dtype or torch.float32, metadata)
    print(f"saved {save_to} ({len(merged)} modules, rank {metadata.get('ss_network_dim', args.new_rank)})")


if __name__ == "__main__":
    sys.exit(run_main(main))
