"""Train a textual-inversion embedding for Stable Diffusion 1.x / 2.x (kohya-ss/sd-scripts compatible).

Usage (same flags and TOML keys as sd-scripts' train_textual_inversion.py):

    accelerate launch train_textual_inversion.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir img --resolution 512 --output_dir out --output_name mychar \\
        --token_string mychar --init_word girl --num_vectors_per_token 4 \\
        --learning_rate 5e-3 --max_train_steps 1600 --save_model_as safetensors

    python train_textual_inversion.py --config_file settings.toml      # CLI flags override TOML keys

Only the embedding rows of the new tokens (`mychar`, `mychar1`, ...) train; every other
weight stays as it was. Captions must contain the token string, or use
`--use_object_template` / `--use_style_template`. The result is `{"emb_params": [n, dim]}`
(`.safetensors`) or an AUTOMATIC1111-style `.pt`; both load in AUTOMATIC1111, ComfyUI and
diffusers (`pipe.load_textual_inversion(file, token="mychar")`). See docs/train_textual_inversion.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from library import textual_inversion, train_core, train_util
from library.cli import run_main

logger = logging.getLogger(__name__)


def setup_parser(xti_files: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_util.add_sd_models_arguments(parser)
    train_util.add_dataset_arguments(parser, True, True, False)
    train_util.add_training_arguments(parser, True)
    train_util.add_optimizer_arguments(parser)
    train_util.add_dataset_config_argument(parser)
    train_util.add_custom_train_arguments(parser, False)
    textual_inversion.add_textual_inversion_arguments(parser, xti_files)
    return parser


def train(args: argparse.Namespace, hooks: Optional[train_core.TrainHooks] = None) -> train_core.TrainResult:
    """Train an embedding with parsed `args` (library entry point; tests pass hooks)."""
    return train_core.run_training(args, textual_inversion.TextualInversionMethod(args), hooks)


def main(argv: Optional[Sequence[str]] = None, xti_files: bool = False, parser: Optional[argparse.ArgumentParser] = None) -> None:
    """The command line; `xti_files` runs the XTI trainer (train_textual_inversion_XTI.py passes its parser)."""
    args = train_util.parse_args_with_config(parser or setup_parser(xti_files), argv)
    method_class = textual_inversion.XTIMethod if xti_files else textual_inversion.TextualInversionMethod
    result = train_core.run_training(args, method_class(args))
    if result.final_model_path is not None:
        logger.info("embedding saved: %s", result.final_model_path)
    if getattr(args, "sample_prompts", None) and getattr(args, "output_dir", None):
        logger.info("sample images: %s", Path(args.output_dir) / "sample")


if __name__ == "__main__":
    sys.exit(run_main(main))
