"""Write a tiny SD-architecture model with random weights (for demos, tests and trying flags).

The model has the real SD v1 (or v2 with --v2) layout at a fraction of the width, so every
script of the toolkit runs on it on a CPU in seconds. Its outputs are meaningless pictures.

    python tools/make_tiny_model.py demo_output/tiny_sd_v1.safetensors
    python tools/make_tiny_model.py --v2 demo_output/tiny_sd_v2        (a Diffusers folder)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.model_util import save_diffusers_checkpoint, save_stable_diffusion_checkpoint  # noqa: E402

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="a .safetensors / .ckpt single file (LDM layout), or a folder for Diffusers format")
    parser.add_argument("--v2", action="store_true", help="SD v2 layout (OpenCLIP text encoder, linear projections)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = setup_parser().parse_args(argv)
    from library.tiny_sd import build_tiny_models  # diffusers / transformers: not for --help

    output = Path(args.output)
    unet, vae, text_encoder = build_tiny_models(v2=args.v2, seed=args.seed)
    if output.suffix.lower() in SINGLE_FILE_SUFFIXES:
        written = save_stable_diffusion_checkpoint(args.v2, output, text_encoder, unet, vae)
    elif output.suffix:
        raise UserError(f"{output}: use a .safetensors or .ckpt file name, or a folder name without extension")
    else:
        written = save_diffusers_checkpoint(args.v2, output, text_encoder, unet, vae, use_safetensors=True)
    logger.info("tiny SD %s model written to %s", "v2" if args.v2 else "v1", written)
    return written


if __name__ == "__main__":
    sys.exit(run_main(main))
