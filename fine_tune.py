"""Native fine-tuning of a whole Stable Diffusion 1.x / 2.x model (kohya-ss/sd-scripts compatible).

Usage (same flags and TOML keys as sd-scripts' fine_tune.py):

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \\
        --in_json meta_lat.json --train_data_dir img --resolution 512 \\
        --output_dir out --output_name my_model --save_model_as safetensors \\
        --learning_rate 5e-6 --max_train_steps 10000 --train_text_encoder

    python fine_tune.py --config_file settings.toml      # CLI flags override TOML keys

Trains on the metadata JSON written by the `finetune/` scripts (`--in_json`: captions / tags,
`train_resolution` buckets and `.npz` latents from prepare_buckets_latents.py) or on a
`--dataset_config` TOML with fine-tuning subsets (`metadata_file`). The U-Net trains; the text
encoder only with `--train_text_encoder`. Saves a whole model like train_db.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from library import datasets, full_model_training, train_core
from library.captions import read_metadata_file
from library.cli import run_main
from library.errors import UserError


def setup_parser() -> argparse.ArgumentParser:
    parser = full_model_training.build_parser(__doc__, dreambooth=False)
    parser.add_argument(
        "--diffusers_xformers", action="store_true",
        help="use xformers attention in the diffusers models (the same as --xformers here)",
    )
    parser.add_argument("--train_text_encoder", action="store_true", help="train the text encoder too")
    return parser


def check_metadata_images(in_json: str, train_data_dir: Optional[str]) -> None:
    """`--in_json` must exist and every image it lists must be found (image or prepared .npz)."""
    metadata = read_metadata_file(in_json)
    for key in metadata:
        if datasets.resolve_image_path(key, train_data_dir) is None:
            where = f"in --train_data_dir {train_data_dir}" if train_data_dir else "(no --train_data_dir given)"
            raise UserError(
                f"--in_json {in_json}: image {key!r} not found {where}; "
                "re-run the finetune/ scripts or fix the keys (--full_path for path keys)"
            )


class FineTuningMethod(full_model_training.FullModelTrainingMethod):
    script_name = "fine_tune.py"

    def verify_args(self, args: argparse.Namespace) -> None:
        super().verify_args(args)
        if getattr(args, "dataset_config", None) is None:
            if not getattr(args, "in_json", None):
                raise UserError("--in_json is required (the metadata JSON of the finetune/ scripts), or use --dataset_config")
            check_metadata_images(args.in_json, getattr(args, "train_data_dir", None))


def make_method(args: argparse.Namespace) -> FineTuningMethod:
    return FineTuningMethod(
        args, train_text_encoder=bool(args.train_text_encoder), tracker_name="finetuning", support_dreambooth=False
    )


def train(args: argparse.Namespace, hooks: Optional[train_core.TrainHooks] = None) -> train_core.TrainResult:
    """Train with parsed `args` (library entry point; tests pass hooks)."""
    return train_core.run_training(args, make_method(args), hooks)


def main(argv: Optional[Sequence[str]] = None) -> None:
    full_model_training.run_script(setup_parser(), make_method, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
