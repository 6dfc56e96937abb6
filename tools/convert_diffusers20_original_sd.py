"""Convert an SD 1.x/2.x model between an LDM single file (.ckpt/.safetensors) and a Diffusers folder.

Same arguments as sd-scripts' tools/convert_diffusers20_original_sd.py:

    python tools/convert_diffusers20_original_sd.py model.safetensors out_diffusers_dir --v2
    python tools/convert_diffusers20_original_sd.py diffusers_dir model.ckpt --epoch 10 --global_step 5000
    python tools/convert_diffusers20_original_sd.py model.ckpt model.safetensors --save_precision_as fp16

`model_to_save` with an extension is written as a single file (the source single file's other
keys - EMA, DDPM buffers, ... - are kept); without one it becomes a Diffusers folder.
Nothing is downloaded: `--reference_model` must be a local Diffusers folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library import model_util  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v1", action="store_true", help="load the model as SD 1.x (single files are also detected)")
    parser.add_argument("--v2", action="store_true", help="load the model as SD 2.x (single files are also detected)")
    parser.add_argument(
        "--unet_use_linear_projection",
        action="store_true",
        help="SD 2.x to Diffusers: save the UNet with Linear proj_in/proj_out (use_linear_projection)",
    )
    parser.add_argument("--fp16", action="store_true", help="load as fp16 and save as fp16 (unless --save_precision_as)")
    parser.add_argument("--bf16", action="store_true", help="load as bf16 and save as bf16 (unless --save_precision_as)")
    parser.add_argument("--float", action="store_true", help="save as float32 (unless --save_precision_as)")
    parser.add_argument(
        "--save_precision_as", type=str, default="no", choices=["fp16", "bf16", "float"],
        help="precision of the saved weights (default: as loaded)",
    )
    parser.add_argument("--epoch", type=int, default=0, help="epoch written into a .ckpt")
    parser.add_argument("--global_step", type=int, default=0, help="global_step written into a .ckpt")
    parser.add_argument(
        "--reference_model", type=str, default=None,
        help="local Diffusers folder whose scheduler and tokenizer are copied into a Diffusers output",
    )
    parser.add_argument("--use_safetensors", action="store_true", help="Diffusers output: weights as .safetensors")
    parser.add_argument("model_to_load", type=str, help="model to convert: .ckpt/.safetensors file or Diffusers folder")
    parser.add_argument("model_to_save", type=str, help="output: file with extension (.ckpt/.safetensors) or a folder")
    return parser


def convert(args: argparse.Namespace) -> Path:
    """Load `args.model_to_load` and save it as `args.model_to_save`; returns the written path."""
    if args.v1 and args.v2:
        raise UserError("--v1 and --v2 cannot be given together")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 cannot be given together")
    load_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    if args.save_precision_as != "no":
        save_dtype = model_util.precision_to_dtype(args.save_precision_as)
    elif args.float:
        save_dtype = torch.float32
    else:
        save_dtype = load_dtype if load_dtype != torch.float32 else None

    source = Path(args.model_to_load)
    output = Path(args.model_to_save)
    to_single_file = output.suffix != ""
    if to_single_file and output.suffix.lower() not in (".ckpt", ".safetensors"):
        raise UserError(f"{output}: output file must end with .ckpt or .safetensors (or have no extension for Diffusers)")
    if source.is_file() and not (args.v1 or args.v2):
        logger.info("neither --v1 nor --v2 given: detecting the model version from %s", source)

    use_linear_projection = None
    if not to_single_file and source.is_file():
        # sd-scripts writes SD2 Diffusers UNets with Conv 1x1 projections unless asked for Linear
        use_linear_projection = bool(args.unet_use_linear_projection)
    models = model_util.load_target_model(
        source, v2=args.v2 or None, dtype=load_dtype, unet_use_linear_projection=use_linear_projection
    )
    if args.v1 and models.v2:
        raise UserError(f"{source}: --v1 was given but this is an SD 2.x model")

    if to_single_file:
        written = model_util.save_stable_diffusion_checkpoint(
            models.v2, output, models.text_encoder, models.unet, models.vae,
            source_path=source if source.is_file() else None,
            epoch=args.epoch, global_step=args.global_step, save_dtype=save_dtype,
        )
    else:
        written = model_util.save_diffusers_checkpoint(
            models.v2, output, models.text_encoder, models.unet, models.vae,
            reference_model=args.reference_model, use_safetensors=args.use_safetensors, save_dtype=save_dtype,
        )
    logger.info("converted %s -> %s (%s)", source, written, "SD 2.x" if models.v2 else "SD 1.x")
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)
    convert(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
