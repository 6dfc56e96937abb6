"""Train the small SD 1.x-architecture base model from scratch on procedural shape scenes.

Everything runs on the CPU from one seed: first the VAE, then the U-Net and the text encoder on
its latents. The result is one SD-format single file that every tool here (and diffusers'
from_single_file) loads like SD 1.5. See docs/tiny_model.md.

    python tools/train_tiny_base_model.py models/tiny_shapes_sd.safetensors
    python tools/train_tiny_base_model.py out.safetensors --num_images 64 --vae_steps 20 --unet_steps 20
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.io_util import write_text_atomic  # noqa: E402
from library.model_util import precision_to_dtype  # noqa: E402
from library.tiny_base_model import TinyBaseConfig, TinyBaseResult, build_models, train_tiny_base_model  # noqa: E402

logger = logging.getLogger(__name__)

_CHANNEL_FLAGS = ("vae_channels", "unet_channels")


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def setup_parser() -> argparse.ArgumentParser:
    defaults = TinyBaseConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the model file to write (.safetensors or .ckpt, SD 1.x single-file layout)")
    parser.add_argument("--save_precision", default="fp16", choices=["float", "fp16", "bf16"], help="dtype of the saved weights")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log_json", default=None, help="also write the per-step losses and stage times to this JSON file")
    for f in fields(TinyBaseConfig):
        if f.name == "shapes":
            continue  # the base model learns exactly the base shapes; the demos teach the others
        default = getattr(defaults, f.name)
        if f.name in _CHANNEL_FLAGS:
            parser.add_argument(f"--{f.name}", type=_channels, default=default, help=f"comma-separated (default {','.join(map(str, default))})")
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default, help=f"(default {default})")
    return parser


def config_from_args(args: argparse.Namespace) -> TinyBaseConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TinyBaseConfig) if f.name != "shapes"}
    for name in ("num_images", "vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size", "text_layers"):
        if values[name] < 1:
            raise UserError(f"--{name} must be at least 1")
    config = TinyBaseConfig(**values)
    try:
        build_models(config)  # shape rules, checked before any time is spent
    except ValueError as err:
        raise UserError(f"--vae_channels / --unet_channels / --resolution / --vae_crop: {err}") from err
    return config


def main(argv: Sequence[str] | None = None) -> TinyBaseResult:
    args = setup_parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix.lower() not in (".safetensors", ".ckpt"):
        raise UserError(f"{output}: the output must be a .safetensors or .ckpt file")
    config = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    output.parent.mkdir(parents=True, exist_ok=True)
    result = train_tiny_base_model(config, output, save_dtype=precision_to_dtype(args.save_precision))
    if args.log_json:
        log = {
            "vae_losses": result.vae_losses,
            "unet_losses": result.unet_losses,
            "latent_scale": result.latent_scale,
            "seconds": result.seconds,
            "threads": torch.get_num_threads(),
        }
        write_text_atomic(Path(args.log_json), json.dumps(log, indent=1))
    logger.info("wrote %s (stage seconds: %s)", output, {k: round(v, 1) for k, v in result.seconds.items()})
    return result


if __name__ == "__main__":
    sys.exit(run_main(main))
