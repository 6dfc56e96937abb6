"""Merge LoRAs into a Stable Diffusion model, or into one LoRA, like sd-scripts' merge_lora.py.

    python networks/merge_lora.py --sd_model model.safetensors --save_to merged.safetensors \
        --models a.safetensors b.safetensors --ratios 0.8 0.5
    python networks/merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors --ratios 1 1 --concat

With --sd_model, each layer becomes W + Σ ratio·up·down·alpha/rank (the same as applying
the LoRAs at run time) and the model is written as a single file; a single-file model is
streamed tensor by tensor. Without it the LoRAs are merged into one LoRA: sd-scripts'
element-wise sum (same ranks), or with --concat the exact sum of the weight changes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library import lora_merge, lora_tool_args  # noqa: E402
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

logger = logging.getLogger(__name__)

MODEL_EXTENSIONS = (".safetensors", ".ckpt")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v2", action="store_true", help="the --sd_model is SD 2.x (also detected from the weights)")
    lora_tool_args.add_save_precision_argument(parser, "as the source model (merge into a model) / float (LoRA output)")
    lora_tool_args.add_precision_argument(parser, "precision of the merge arithmetic (default float)")
    parser.add_argument("--sd_model", type=str, default=None, help="SD model to merge into (.safetensors / .ckpt / Diffusers folder); omit to merge LoRAs into one LoRA")
    parser.add_argument("--save_to", type=str, default=None, help="output file: a model (.safetensors / .ckpt) or a LoRA (.safetensors / .pt / .ckpt)")
    lora_tool_args.add_models_ratios_arguments(parser, "LoRA files to merge")
    parser.add_argument("--concat", action="store_true", help="LoRA output: concatenate the ranks (exact sum of the weight changes; any ranks)")
    lora_tool_args.add_no_metadata_argument(parser, "LoRA output: ")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.save_to is None:
        raise UserError("--save_to is required")
    ratios = check_ratios(args.models or [], args.ratios)
    inputs = [*args.models, args.sd_model]
    merge_dtype = precision_to_dtype(args.precision) or torch.float32
    save_dtype = lora_tool_args.save_dtype_of(args.save_precision)

    if args.sd_model is not None:
        save_to = Path(args.save_to)
        if save_to.suffix.lower() not in MODEL_EXTENSIONS:
            raise UserError(f"--save_to {save_to}: a merged model is written as .safetensors or .ckpt")
        check_distinct_output(save_to, inputs)
        loras = [read_lora(path) for path in args.models]
        lora_merge.merge_into_model(args.sd_model, loras, ratios, save_to, args.v2, merge_dtype, save_dtype)
        print(f"saved {save_to}")
        return

    if args.concat is False and len(args.models) > 1:
        logger.warning(
            "without --concat the up and down weights are summed element-wise (as sd-scripts does); "
            "the result is not the sum of the LoRAs' weight changes"
        )
    save_to = check_distinct_output(check_lora_output(args.save_to), inputs)
    loras = [read_lora(path).rounded_to(merge_dtype) for path in args.models]
    merged = lora_merge.merge_lora_modules(loras, ratios, concat=args.concat)
    metadata = {} if args.no_metadata else lora_merge.merged_lora_metadata(merged, loras, save_to)
    write_lora(save_to, merged, save_dtype or torch.float32, metadata)
    print(f"saved {save_to} ({len(merged)} modules)")


if __name__ == "__main__":
    sys.exit(run_main(main))
