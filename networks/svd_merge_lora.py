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

from library import lora_merge, lora_svd  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.lora_modules import (  # noqa: E402
    check_distinct_output,
    check_lora_output,
    check_ratios,
    lora_network_metadata,
    read_lora,
    write_lora,
)
from library.model_util import precision_to_dtype  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
        help="dtype of the saved tensors; default float",
    )
    parser.add_argument(
        "--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
        help="precision the inputs are read in (default float); the SVD runs in float32",
    )
    parser.add_argument("--save_to", type=str, default=None, help="output LoRA file (.safetensors / .pt / .ckpt)")
    parser.add_argument("--models", type=str, nargs="*", help="LoRA files to merge (any ranks, LierLa or C3Lier)")
    parser.add_argument("--ratios", type=float, nargs="*", help="one ratio per --models file (default 1.0 each)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (default 4)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv modules (default --new_rank)")
    parser.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda; default CPU")
    parser.add_argument(
        "--clamp_quantile", type=float, default=0.99,
        help="clamp the factors to this quantile of their absolute values (default 0.99, as sd-scripts; 1 = no clamp)",
    )
    parser.add_argument("--no_metadata", action="store_true", help="write no ss_* metadata (only the sshs_* hashes)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.save_to is None:
        raise UserError("--save_to is required")
    ratios = check_ratios(args.models or [], args.ratios)
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank and --new_conv_rank must be positive integers")
    if not 0 < args.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile must be in (0, 1], got {args.clamp_quantile}")
    save_to = check_distinct_output(check_lora_output(args.save_to), args.models)
    device = lora_svd.check_device(args.device)
    merge_dtype = precision_to_dtype(args.precision) or torch.float32
    save_dtype = precision_to_dtype(args.save_precision) if args.save_precision else None

    loras = [read_lora(path).rounded_to(merge_dtype) for path in args.models]
    merged = lora_merge.svd_merge_modules(
        loras, ratios, args.new_rank, args.new_conv_rank, args.clamp_quantile, device
    )
    metadata = {} if args.no_metadata else lora_network_metadata(merged, {"ss_network_module": "networks.lora"})
    write_lora(save_to, merged, save_dtype or torch.float32, metadata)
    print(f"saved {save_to} ({len(merged)} modules, rank {metadata.get('ss_network_dim', args.new_rank)})")


if __name__ == "__main__":
    sys.exit(run_main(main))
