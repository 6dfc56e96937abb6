"""Flags shared by the LoRA tools (networks/*_lora*.py), with sd-scripts' names and defaults."""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from library.errors import UserError
from library.model_util import precision_to_dtype

PRECISIONS = ["float", "fp16", "bf16"]


def add_save_precision_argument(parser: argparse.ArgumentParser, default_text: str = "float") -> None:
    parser.add_argument(
        "--save_precision", type=str, default=None, choices=PRECISIONS,
        help=f"dtype of the saved tensors; default {default_text}",
    )


def add_precision_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--precision", type=str, default="float", choices=PRECISIONS, help=help_text)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=str, default=None, help="device for the SVD, e.g. cuda; default CPU")


def add_models_ratios_arguments(parser: argparse.ArgumentParser, models_help: str) -> None:
    parser.add_argument("--models", type=str, nargs="*", help=models_help)
    parser.add_argument("--ratios", type=float, nargs="*", help="one ratio per --models file (default 1.0 each)")


def add_no_metadata_argument(parser: argparse.ArgumentParser, what: str = "") -> None:
    parser.add_argument("--no_metadata", action="store_true", help=f"{what}write no ss_* metadata (only the sshs_* hashes)")


def add_clamp_quantile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clamp_quantile", type=float, default=0.99,
        help="clamp the factors to this quantile of their absolute values (default 0.99, as sd-scripts; 1 = no clamp)",
    )


def check_clamp_quantile(value: float) -> float:
    if not 0 < value <= 1:
        raise UserError(f"--clamp_quantile must be in (0, 1], got {value}")
    return value


def save_dtype_of(save_precision: Optional[str]) -> Optional[torch.dtype]:
    """--save_precision as a dtype (None when not given)."""
    return precision_to_dtype(save_precision) if save_precision else None
