"""Saving whole trained models (train_db.py, fine_tune.py): format choice, target checks, the VAE.

`model_util.save_model` writes the files; this module decides *what* is written:

- the format: `--save_model_as`, or (when not given) the kind of the input model, made
  `.safetensors` / `diffusers_safetensors` by `--use_safetensors` (sd-scripts rules);
- the VAE: re-read from the input model (or `--vae`) in the dtype it is stored in, so the saved
  VAE is bit-identical to the input one (cast once to `--save_precision` when that is given).
  The VAE held in memory may have been cast to the mixed-precision dtype for training and is
  never what gets saved;
- the `modelspec.*` metadata of single `.safetensors` files;
- clear errors, before training, for outputs that cannot be written (a Diffusers folder onto an
  existing file, a single file onto an existing folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import torch

from library import model_util
from library.errors import UserError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

SINGLE_FILE_FORMATS = ("ckpt", "safetensors")
DIFFUSERS_FORMATS = ("diffusers", "diffusers_safetensors")

_VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_VAE_PROBE_KEYS = ("first_stage_model.encoder.conv_in.weight", "encoder.conv_in.weight")


def resolve_save_model_as(save_model_as: Optional[str], use_safetensors: bool, source: str | Path) -> str:
    """The output format: `--save_model_as`, else the input's kind (`--use_safetensors` picks safetensors)."""
    if save_model_as:
        if save_model_as not in SINGLE_FILE_FORMATS + DIFFUSERS_FORMATS:
            raise UserError(
                f"--save_model_as must be one of {', '.join(SINGLE_FILE_FORMATS + DIFFUSERS_FORMATS)}, got {save_model_as!r}"
            )
        return save_model_as
    source = Path(source)
    if source.is_dir():
        return "diffusers_safetensors" if use_safetensors else "diffusers"
    if use_safetensors or model_util.is_safetensors(source):
        return "safetensors"
    return "ckpt"


def model_extension(save_model_as: str) -> str:
    """Suffix of saved outputs: `.ckpt` / `.safetensors`, or "" (a folder) for Diffusers."""
    return "" if save_model_as in DIFFUSERS_FORMATS else f".{save_model_as}"


def check_output_target(path: str | Path, save_model_as: str) -> None:
    """UserError when `path` cannot take this output: an existing file for a Diffusers folder,
    an existing folder for a single file. Existing outputs of the same kind are replaced."""
    path = Path(path)
    if save_model_as in DIFFUSERS_FORMATS and path.is_file():
        raise UserError(
            f"--save_model_as {save_model_as}: {path} is an existing file; a Diffusers model is a folder "
            "(choose another --output_name or remove the file)"
        )
    if save_model_as in SINGLE_FILE_FORMATS and path.is_dir():
        raise UserError(f"--save_model_as {save_model_as}: {path} is an existing folder; choose another --output_name")


def _vae_weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    folder = path / "vae" if (path / "vae").is_dir() else path
    for name in _VAE_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{path}: no VAE weights found ({' or '.join(_VAE_WEIGHT_FILES)})")


def stored_vae_dtype(path: str | Path) -> torch.dtype:
    """The dtype the VAE weights of a model file / Diffusers folder / VAE file are stored in."""
    weights = _vae_weights_file(Path(path))
    with model_util.LdmFile(weights) as stored:
        for key in _VAE_PROBE_KEYS:
            if key in stored:
                return stored.get(key).dtype
        for key in stored.keys():  # diffusers-layout VAE files
            if key.endswith("conv_in.weight"):
                return stored.get(key).dtype
    raise UserError(f"{weights}: not a Stable Diffusion VAE (no conv_in weight found)")


def load_input_vae(source: str | Path) -> AutoencoderKL:
    """The VAE of `source` (model or VAE file, Diffusers folder) in the dtype it is stored in.

    Loaded in float32 and cast back: fp16 / bf16 values survive the round trip exactly."""
    vae = model_util.load_vae(source, torch.float32)
    dtype = stored_vae_dtype(source)
    if dtype != torch.float32:
        vae.to(dtype=dtype)
    return vae


def save_trained_model(
    models: model_util.StableDiffusionModels,
    path: str | Path,
    save_model_as: str,
    save_dtype: Optional[torch.dtype] = None,
    epoch: int = 0,
    global_step: int = 0,
    metadata: Optional[Mapping[str, str]] = None,
    vae_path: Optional[str | Path] = None,
) -> Path:
    """Write the trained UNet and text encoder with the input VAE (`vae_path` or the model's).

    `path` is the output file (extension added when missing) or Diffusers folder. `metadata`
    goes into single `.safetensors` files (`.ckpt` and Diffusers folders carry none). A Diffusers
    input folder with a model_index.json is the reference for the scheduler and tokenizer.
    """
    path = Path(path)
    check_output_target(path, save_model_as)
    vae = load_input_vae(vae_path if vae_path is not None else models.source_path)
    reference = None
    if not models.is_ldm_file and (Path(models.source_path) / "model_index.json").is_file():
        reference = models.source_path
    to_save = dataclasses.replace(models, vae=vae)
    try:
        return model_util.save_model(
            to_save, path, save_model_as, save_dtype=save_dtype, epoch=epoch, global_step=global_step,
            metadata=metadata if save_model_as == "safetensors" else None, reference_model=reference,
        )
    finally:
        del to_save, vae  # the re-read VAE is only needed for this save


def prepare_output_format(args: argparse.Namespace) -> str:
    """Resolve `args.save_model_as` in place from the flags and the input model, and check that
    the final output (`<output_dir>/<output_name|last>[.ext]`) can be written: before training."""
    from library import train_util

    args.save_model_as = resolve_save_model_as(
        getattr(args, "save_model_as", None), bool(getattr(args, "use_safetensors", False)),
        getattr(args, "pretrained_model_name_or_path", None) or "",
    )
    if getattr(args, "output_dir", None):
        final = Path(args.output_dir) / train_util.get_last_ckpt_name(args, model_extension(args.save_model_as))
        check_output_target(final, args.save_model_as)
    return args.save_model_as
