"""Resize a LoRA to a lower rank by SVD (LoRA-LierLa and C3Lier modules), like sd-scripts' resize_lora.py.

    python networks/resize_lora.py --model my_lora.safetensors --save_to my_lora_r4.safetensors --new_rank 4
    python networks/resize_lora.py --model my_lora.safetensors --save_to small.safetensors \
        --new_rank 32 --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module keeps the best rank-r approximation of its up·down·alpha/rank (Frobenius norm);
the metadata is copied with ss_network_dim / ss_network_alpha updated, the resize noted in
ss_training_comment and the sshs_* hashes recomputed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library import lora_resize, lora_svd, lora_tool_args, modelspec  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.lora_modules import check_distinct_output, check_lora_output, read_lora, write_lora  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=str, default=None, help="LoRA file to resize (.safetensors / .pt / .ckpt)")
    parser.add_argument("--save_to", type=str, default=None, help="output LoRA file (.safetensors / .pt / .ckpt)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (with --dynamic_method: the maximum); default 4")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 conv (C3Lier) modules; default --new_rank")
    lora_tool_args.add_save_precision_argument(parser)
    lora_tool_args.add_device_argument(parser)
    parser.add_argument("--verbose", action="store_true", help="print each module's new rank and the Frobenius norm fraction it keeps")
    parser.add_argument(
        "--dynamic_method", type=str, default=None, choices=list(lora_svd.DYNAMIC_METHODS),
        help="choose each module's rank from its singular values (capped at --new_rank)",
    )
    parser.add_argument(
        "--dynamic_param", type=float, default=None,
        help="sv_ratio: keep values > S[0]/param; sv_fro: keep this fraction of the Frobenius norm; "
        "sv_cumulative: keep this fraction of the sum of singular values",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.model is None or args.save_to is None:
        raise UserError("--model and --save_to are required")
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank and --new_conv_rank must be positive integers")
    lora_svd.check_dynamic_args(args.dynamic_method, args.dynamic_param)
    save_to = check_distinct_output(check_lora_output(args.save_to), [args.model])
    device = lora_svd.check_device(args.device)
    save_dtype = lora_tool_args.save_dtype_of(args.save_precision)

    lora = read_lora(args.model)
    resized, stats = lora_resize.resize_modules(
        lora, args.new_rank, args.new_conv_rank, args.dynamic_method, args.dynamic_param, device
    )
    metadata = lora_resize.resized_metadata(lora, resized, args.dynamic_method, args.dynamic_param)
    metadata = modelspec.with_tool_modelspec(metadata, modelspec.LORA, save_to, sources=[lora.metadata])
    write_lora(save_to, resized, save_dtype or torch.float32, metadata)
    if args.verbose:
        for line in lora_resize.verbose_lines(stats):
            print(line)
        print(f"all modules: Frobenius norm kept {lora_resize.resize_total_fro(stats):.6f}")
    print(f"saved {save_to} (ss_network_dim {metadata['ss_network_dim']}, ss_network_alpha {metadata['ss_network_alpha']})")


if __name__ == "__main__":
    sys.exit(run_main(main))
