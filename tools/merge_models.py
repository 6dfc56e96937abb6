"""Weighted merge of two or more SD 1.x/2.x checkpoints into one single file.

Same arguments as sd-scripts' tools/merge_models.py:

    python tools/merge_models.py --models a.safetensors b.ckpt --ratios 0.7 0.3 --output merged.safetensors

Inputs may be `.safetensors` / `.ckpt` files or Diffusers folders, SD 1.x or 2.x (all the same
version). The models are read one tensor at a time, so memory holds the merged model plus the
current tensors, never the inputs. `--unet_only` merges the U-Net and keeps the first model's
text encoder and VAE.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.checkpoint_merge import merge_checkpoints  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.model_util import precision_to_dtype  # noqa: E402

logger = logging.getLogger(__name__)

PRECISIONS = ["float", "fp16", "bf16"]


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=str, required=True, help="models to merge (files or Diffusers folders)")
    parser.add_argument("--output", type=str, required=True, help="merged model (.safetensors is added unless .safetensors/.ckpt)")
    parser.add_argument("--ratios", nargs="+", type=float, help="one ratio per model (default: equal, summing to 1)")
    parser.add_argument("--unet_only", action="store_true", help="merge only the U-Net; text encoder and VAE of the first model")
    parser.add_argument("--device", type=str, default="cpu", help="device for the arithmetic (default cpu)")
    parser.add_argument("--precision", type=str, default="float", choices=PRECISIONS, help="arithmetic precision")
    parser.add_argument("--saving_precision", type=str, default="float", choices=PRECISIONS, help="precision of the saved weights")
    parser.add_argument("--show_skipped", action="store_true", help="list the keys of later models that the first model lacks")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = setup_parser().parse_args(argv)
    return merge_checkpoints(
        args.models,
        args.output,
        ratios=args.ratios,
        unet_only=args.unet_only,
        dtype=precision_to_dtype(args.precision),
        save_dtype=precision_to_dtype(args.saving_precision),
        device=args.device,
        show_skipped=args.show_skipped,
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
