"""Caption a folder of images with BLIP (transformers' BlipForConditionalGeneration).

    python finetune/make_captions.py <train_data_dir> --caption_weights <BLIP folder or hub id>

Writes `<image stem><caption_extension>` (default `.caption`) beside each image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.caption_models import BLIP_DEFAULT_MODEL, blip_captions, load_blip  # noqa: E402
from library.captioning import add_common_caption_arguments, caption_folder, preferred_device  # noqa: E402
from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_caption_arguments(parser, ".caption")
    parser.add_argument("--caption_weights", "--model_id", dest="caption_weights", type=str, default=BLIP_DEFAULT_MODEL,
                        help=f"BLIP model: a local transformers folder or a hub id (default {BLIP_DEFAULT_MODEL})")
    parser.add_argument("--beam_search", action="store_true", help="beam search instead of nucleus sampling")
    parser.add_argument("--num_beams", type=int, default=1, help="beams with --beam_search")
    parser.add_argument("--top_p", type=float, default=0.9, help="top-p of nucleus sampling")
    parser.add_argument("--max_length", type=int, default=75, help="longest caption, in tokens")
    parser.add_argument("--min_length", type=int, default=5, help="shortest caption, in tokens")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sampling")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)

    def make_describe():
        torch.manual_seed(args.seed)
        blip = load_blip(args.caption_weights, preferred_device())
        return lambda batch: blip_captions(blip, batch, args.beam_search, args.num_beams, args.top_p,
                                           args.max_length, args.min_length)

    caption_folder(args, make_describe)


if __name__ == "__main__":
    sys.exit(run_main(main))
