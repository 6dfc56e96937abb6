"""Command-line flags of `gen_img_diffusers.py` (sd-scripts' names, types and defaults; SPEC 7.1)
and the checks that need no model."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from library.errors import UserError
from library.samplers import SAMPLER_NAMES, check_sampler_name

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 512
DEFAULT_STRENGTH = 0.8


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Stable Diffusion 1.x / 2.x image generator (sd-scripts compatible)")
    model = parser.add_argument_group("model")
    model.add_argument("--v2", action="store_true", help="the model is SD 2.x (detected from the weights anyway)")
    model.add_argument("--v_parameterization", action="store_true", help="v-prediction model (SD 2.x 768)")
    model.add_argument("--ckpt", type=str, default=None, help="model: .safetensors / .ckpt file or Diffusers folder")
    model.add_argument("--vae", type=str, default=None, help="replace the model's VAE (file or folder)")
    model.add_argument("--tokenizer_cache_dir", type=str, default=None, help="folder to keep / read the tokenizer")
    model.add_argument("--clip_skip", type=int, default=None, help="use the output of the n-th text-encoder layer from the end")
    model.add_argument("--fp16", action="store_true", help="run in float16")
    model.add_argument("--bf16", action="store_true", help="run in bfloat16")

    memory = parser.add_argument_group("attention and memory")
    memory.add_argument("--xformers", action="store_true", help="xformers attention (needs the xformers package)")
    memory.add_argument("--diffusers_xformers", action="store_true", help="same as --xformers (diffusers' switch)")
    memory.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention")
    memory.add_argument("--opt_channels_last", action="store_true", help="U-Net in channels-last memory format")
    memory.add_argument(
        "--vae_batch_size", type=float, default=None,
        help="images decoded by the VAE at once; below 1: that share of --batch_size",
    )
    memory.add_argument("--vae_slices", type=int, default=None, help="decode each image in N slices (less memory)")

    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt", type=str, default=None, help="prompt line (options like --n, --d allowed)")
    prompts.add_argument("--from_file", type=str, default=None, help="text file with one prompt line per line")
    prompts.add_argument("--interactive", action="store_true", help="read prompt lines from stdin until EOF")
    prompts.add_argument("--no_preview", action="store_true", help="do not show images in interactive mode")
    prompts.add_argument("--negative_scale", type=float, default=None, help="separate guidance scale for the negative prompt")
    prompts.add_argument(
        "--max_embeddings_multiples", type=int, default=None, help="prompts up to 75 × N tokens (default 1)"
    )
    prompts.add_argument("--clip_guidance_scale", type=float, default=0.0, help="CLIP guidance (not supported; 0)")
    prompts.add_argument("--clip_image_guidance_scale", type=float, default=0.0, help="CLIP image guidance (not supported; 0)")
    prompts.add_argument("--vgg16_guidance_scale", type=float, default=0.0, help="VGG16 guidance (not supported; 0)")
    prompts.add_argument("--vgg16_guidance_layer", type=int, default=20, help="VGG16 guidance layer (unused)")
    prompts.add_argument(
        "--guide_image_path", type=str, default=None, nargs="*", help="ControlNet hint images (files or folders)"
    )

    batch = parser.add_argument_group("batch and seeds")
    batch.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt line")
    batch.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list N times")
    batch.add_argument("--batch_size", type=int, default=1, help="images generated at once")
    batch.add_argument("--seed", type=int, default=None, help="seed of the first image; later seeds are drawn from it")
    batch.add_argument(
        "--iter_same_seed", action="store_true", help="one seed for all images of an iteration (compare prompts)"
    )

    size = parser.add_argument_group("size and steps")
    size.add_argument("--W", type=int, default=None, help="width (default 512, or the init image's)")
    size.add_argument("--H", type=int, default=None, help="height (default 512, or the init image's)")
    size.add_argument("--steps", type=int, default=50, help="sampling steps")
    size.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    size.add_argument("--sampler", type=str, default="ddim", help=f"one of {', '.join(SAMPLER_NAMES)}")

    output = parser.add_argument_group("output")
    output.add_argument("--outdir", type=str, default="outputs", help="folder for the images")
    output.add_argument("--sequential_file_name", action="store_true", help="name images im_000001.png, ...")
    output.add_argument(
        "--use_original_file_name", action="store_true", help="img2img: put the init image's name before the file name"
    )

    networks = parser.add_argument_group("networks")
    networks.add_argument("--network_module", type=str, default=None, nargs="*", help="network module(s), e.g. networks.lora")
    networks.add_argument("--network_weights", type=str, default=None, nargs="*", help="network file(s)")
    networks.add_argument("--network_mul", type=float, default=None, nargs="*", help="multiplier(s) of the networks")
    networks.add_argument(
        "--network_args", type=str, default=None, nargs="*", help="per network: 'key=value;key=value'"
    )
    networks.add_argument("--network_show_meta", action="store_true", help="print the networks' metadata")
    networks.add_argument("--network_merge", action="store_true", help="merge the networks into the model weights")
    networks.add_argument(
        "--network_pre_calc", action="store_true", help="pre-compute the networks' weights (faster, fixed multipliers)"
    )
    networks.add_argument("--textual_inversion_embeddings", type=str, default=None, nargs="*", help="TI embedding files")
    networks.add_argument("--XTI_embeddings", type=str, default=None, nargs="*", help="XTI embedding files")

    img2img = parser.add_argument_group("img2img and inpainting")
    img2img.add_argument("--image_path", type=str, default=None, help="init image, or a folder of them (img2img)")
    img2img.add_argument("--mask_path", type=str, default=None, help="mask image or folder (inpaint; white = repaint)")
    img2img.add_argument("--strength", type=float, default=None, help="img2img strength (default 0.8)")

    highres = parser.add_argument_group("highres fix")
    highres.add_argument("--highres_fix_scale", type=float, default=None, help="1st stage at this share of the size")
    highres.add_argument("--highres_fix_steps", type=int, default=28, help="1st stage steps")
    highres.add_argument("--highres_fix_strength", type=float, default=None, help="2nd stage strength (default: --strength)")
    highres.add_argument("--highres_fix_save_1st", action="store_true", help="also save the 1st stage images")
    highres.add_argument(
        "--highres_fix_latents_upscaling", action="store_true", help="upscale the 1st stage latents instead of the image"
    )
    highres.add_argument("--highres_fix_upscaler", type=str, default=None, help="upscaler module (not supported)")
    highres.add_argument("--highres_fix_upscaler_args", type=str, default=None, help="upscaler arguments (not supported)")

    control = parser.add_argument_group("ControlNet")
    control.add_argument("--control_net_models", type=str, default=None, nargs="*", help="ControlNet model files")
    control.add_argument("--control_net_preps", type=str, default=None, nargs="*", help="preprocessors, e.g. canny_63_191")
    control.add_argument("--control_net_weights", type=float, default=None, nargs="*", help="ControlNet weights")
    control.add_argument(
        "--control_net_ratios", type=float, default=None, nargs="*", help="share of the steps ControlNet is applied"
    )
    return parser


def _round_size(value: int | None, flag: str) -> int | None:
    if value is None:
        return None
    if value < 8:
        raise UserError(f"{flag} {value}: the image size must be at least 8")
    if value % 8:
        rounded = value - value % 8
        logger.warning("%s %d is not divisible by 8; using %d", flag, value, rounded)
        return rounded
    return value


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")


def verify_args(args: argparse.Namespace) -> argparse.Namespace:
    """Checks that need no model; normalises sizes and the sampler name in place."""
    if not args.ckpt:
        raise UserError("--ckpt is required (a .safetensors / .ckpt file or a Diffusers folder)")
    if args.mask_path is not None and args.image_path is None and not args.network_weights:
        raise UserError(
            "--mask_path needs --image_path (the image to inpaint), or --network_weights for regional LoRA (AND prompts)"
        )
    args.sampler = check_sampler_name(args.sampler, "--sampler")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 exclude each other")
    args.W = _round_size(args.W, "--W")
    args.H = _round_size(args.H, "--H")
    for flag in ("images_per_prompt", "n_iter", "batch_size", "steps", "highres_fix_steps"):
        _positive(getattr(args, flag), f"--{flag}")
    _positive(args.vae_slices, "--vae_slices")
    for flag in ("strength", "highres_fix_strength"):
        value = getattr(args, flag)
        if value is not None and not 0.0 < value <= 1.0:
            raise UserError(f"--{flag} must be in (0, 1], got {value}")
    if args.highres_fix_scale is not None and not 0.0 < args.highres_fix_scale < 1.0:
        raise UserError(f"--highres_fix_scale is the share of the final size for the 1st stage, in (0, 1); got {args.highres_fix_scale}")
    if args.vae_batch_size is not None and args.vae_batch_size <= 0:
        raise UserError(f"--vae_batch_size must be positive, got {args.vae_batch_size}")
    for flag in ("clip_guidance_scale", "clip_image_guidance_scale", "vgg16_guidance_scale"):
        if getattr(args, flag):
            raise UserError(f"--{flag} is not supported (CLIP / VGG16 guidance needs models that are not bundled)")
    if args.highres_fix_upscaler:
        raise UserError("--highres_fix_upscaler is not supported (the 1st stage is upscaled with Lanczos or bilinear latents)")
    if args.control_net_models and not args.guide_image_path:
        raise UserError("--control_net_models needs --guide_image_path (the hint images)")
    if args.guide_image_path and not args.control_net_models:
        raise UserError("--guide_image_path is used for ControlNet hints only; give --control_net_models")
    if args.network_merge and args.network_pre_calc:
        raise UserError("--network_merge and --network_pre_calc exclude each other")
    if not (args.prompt or args.from_file or args.interactive):
        raise UserError("no prompt: give --prompt, --from_file or --interactive")
    return args


def vae_batch_size(args: argparse.Namespace) -> int | None:
    """--vae_batch_size as an image count (a value below 1 is a share of --batch_size)."""
    if args.vae_batch_size is None:
        return None
    if args.vae_batch_size < 1:
        return max(1, int(args.batch_size * args.vae_batch_size))
    return int(args.vae_batch_size)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return verify_args(setup_parser().parse_args(argv))
