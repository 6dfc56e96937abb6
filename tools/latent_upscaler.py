"""Upscale images 2x with the latent upscaler of sd-scripts' highres fix.

    python tools/latent_upscaler.py --vae_path <model or VAE> --weights <upscaler file> \\
        --image_pattern "images/*.png" --output_dir out

Each image (cropped to a multiple of 8) is resized 2x with Lanczos, encoded by the VAE, refined
by the upscaler, decoded, and written as `<stem>_upscaled<ext>`. The generator uses the same
module: `--highres_fix_upscaler tools.latent_upscaler --highres_fix_upscaler_args weights=<file>`.
"""
from __future__ import annotations

import argparse
import glob
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.image_util import is_image_file  # noqa: E402
from library.io_util import atomic_path  # noqa: E402
from library.latent_upscaler import (  # noqa: E402,F401 - Upscaler / create_upscaler: the generator's interface
    Upscaler,
    create_upscaler,
    crop_to_multiple_of_8,
    decode_latents,
)
from library.model_util import load_vae  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_path", type=str, default=None,
                        help="VAE: a Diffusers model folder, a VAE folder, or a checkpoint / VAE file")
    parser.add_argument("--weights", type=str, default=None, help="latent upscaler weights (.safetensors or .pt)")
    parser.add_argument("--image_pattern", type=str, default=None, help='glob of the input images, e.g. "images/*.png"')
    parser.add_argument("--output_dir", type=str, default=".", help="folder for the upscaled images")
    parser.add_argument("--batch_size", type=int, default=4, help="latents per upscaler call")
    parser.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE encode / decode call")
    parser.add_argument("--debug", action="store_true", help="also write the plain Lanczos 2x image as <stem>_lanczos4<ext>")
    parser.add_argument("--seed", type=int, default=None, help="seed of the VAE posterior sampling")
    return parser


def save_image(image: Image.Image, target: Path) -> None:
    with atomic_path(target) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)
    for flag in ("vae_path", "weights", "image_pattern"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required")
    paths = sorted(Path(p) for p in glob.glob(args.image_pattern) if is_image_file(Path(p)))
    if not paths:
        raise UserError(f"--image_pattern {args.image_pattern}: no images match")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vae = load_vae(args.vae_path, dtype).to(device)
    upscaler = create_upscaler(weights=args.weights).to(device, dtype=dtype)
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        with Image.open(path) as img:
            image = crop_to_multiple_of_8(img.convert("RGB"))
        width, height = image.width * 2, image.height * 2
        if args.debug:
            save_image(image.resize((width, height), Image.LANCZOS), output_dir / f"{path.stem}_lanczos4{path.suffix}")
        latents = upscaler.upscale(vae, [image], None, dtype, width, height, args.batch_size, args.vae_batch_size,
                                   generator=generator)
        (upscaled,) = decode_latents(vae, latents, args.vae_batch_size)
        target = output_dir / f"{path.stem}_upscaled{path.suffix}"
        save_image(upscaled, target)
        logger.info("wrote %s (%dx%d)", target, width, height)


if __name__ == "__main__":
    sys.exit(run_main(main))
