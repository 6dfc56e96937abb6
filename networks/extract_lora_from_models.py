"""Extract a LoRA from the difference of two SD models, like sd-scripts' extract_lora_from_models.py.

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \
        --save_to extracted.safetensors --dim 8 --conv_dim 4

Both models may be .safetensors / .ckpt single files or Diffusers folders (SD 1.x or 2.x,
detected). They are read one layer at a time. The output has the keys of a trained LoRA
(LierLa, plus C3Lier conv modules with --conv_dim), so A1111, ComfyUI and diffusers load it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library import lora_extract, lora_svd, lora_tool_args, modelspec  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.lora_modules import check_distinct_output, check_lora_output, write_lora  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v2", action="store_true", help="the models are SD 2.x (also detected from the weights)")
    lora_tool_args.add_save_precision_argument(parser)
    parser.add_argument("--model_org", type=str, default=None, help="the original model (file or Diffusers folder)")
    parser.add_argument("--model_tuned", type=str, default=None, help="the fine-tuned model (file or Diffusers folder)")
    parser.add_argument("--save_to", type=str, default=None, help="output LoRA file (.safetensors / .pt / .ckpt)")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None, help="rank of 3x3 conv (C3Lier) modules; default: no conv modules")
    lora_tool_args.add_clamp_quantile_argument(parser)
    parser.add_argument(
        "--min_diff", type=float, default=0.01,
        help="the text encoder is extracted only if some weight differs by at least this (default 0.01)",
    )
    lora_tool_args.add_device_argument(parser)
    lora_tool_args.add_no_metadata_argument(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.model_org is None or args.model_tuned is None or args.save_to is None:
        raise UserError("--model_org, --model_tuned and --save_to are required")
    lora_tool_args.check_clamp_quantile(args.clamp_quantile)
    save_to = check_distinct_output(check_lora_output(args.save_to), [args.model_org, args.model_tuned])
    device = lora_svd.check_device(args.device)
    save_dtype = lora_tool_args.save_dtype_of(args.save_precision)

    modules, v2 = lora_extract.extract_modules(
        args.model_org, args.model_tuned, args.dim, args.conv_dim, args.v2, args.clamp_quantile, args.min_diff, device
    )
    metadata = {} if args.no_metadata else modelspec.with_tool_modelspec(
        lora_extract.extract_metadata(modules, v2, args.model_org, args.model_tuned, args.dim, args.conv_dim),
        modelspec.LORA, save_to, v2=v2,
    )
    write_lora(save_to, modules, save_dtype or torch.float32, metadata)
    print(f"saved {save_to} ({len(modules)} modules)")


if __name__ == "__main__":
    sys.exit(run_main(main))
