"""DreamBooth training of a whole Stable Diffusion 1.x / 2.x model (kohya-ss/sd-scripts compatible).

Usage (same flags and TOML keys as sd-scripts' train_db.py):

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir img --reg_data_dir reg --prior_loss_weight 1.0 --resolution 512 \\
        --output_dir out --output_name my_model --save_model_as safetensors \\
        --learning_rate 1e-6 --max_train_steps 1600 --stop_text_encoder_training 800

    python train_db.py --config_file settings.toml      # CLI flags override TOML keys

The U-Net and, by default, the text encoder train on DreamBooth folders (`<repeats>_<token>
<class>`) or a `--dataset_config` TOML, with regularisation images weighted by
`--prior_loss_weight`. `--stop_text_encoder_training N` freezes the text encoder after step N
(-1: never train it). The output is a whole model: an LDM single file (.ckpt / .safetensors with
modelspec.* metadata) or a Diffusers folder. `--save_state` / `--resume` continue a run exactly.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from library import full_model_training, train_core
from library.cli import run_main


def setup_parser() -> argparse.ArgumentParser:
    parser = full_model_training.build_parser(__doc__, dreambooth=True)
    parser.add_argument(
        "--no_token_padding", action="store_true",
        help="do not pad captions to 75 tokens; pad to the longest caption of the batch (older DreamBooth behaviour)",
    )
    parser.add_argument(
        "--stop_text_encoder_training", type=int, default=None,
        help="stop training the text encoder after this step (-1: do not train it; default: train it to the end)",
    )
    return parser


def make_method(args: argparse.Namespace) -> full_model_training.FullModelTrainingMethod:
    return full_model_training.FullModelTrainingMethod(args, train_text_encoder=True, tracker_name="dreambooth")


def train(args: argparse.Namespace, hooks: Optional[train_core.TrainHooks] = None) -> train_core.TrainResult:
    """Train with parsed `args` (library entry point; tests pass hooks)."""
    return train_core.run_training(args, make_method(args), hooks)


def main(argv: Optional[Sequence[str]] = None) -> None:
    full_model_training.run_script(setup_parser(), make_method, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
