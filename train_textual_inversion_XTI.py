"""Train an Extended Textual Inversion (XTI) embedding: one embedding per U-Net cross-attention block.

Usage (same flags and TOML keys as sd-scripts' train_textual_inversion_XTI.py):

    accelerate launch train_textual_inversion_XTI.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir img --resolution 512 --output_dir out --output_name mychar_xti \\
        --token_string mychar --init_word girl --num_vectors_per_token 2 \\
        --learning_rate 5e-3 --max_train_steps 1600

The saved `.safetensors` holds one `[num_vectors, dim]` tensor per block (`IN01`, `IN02`,
`IN04`, `IN05`, `IN07`, `IN08`, `MID`, `OUT03` … `OUT11` for SD 1.x / 2.x). Sample images
during training use the per-block embeddings. The file format and how a generator applies
it are in docs/train_textual_inversion.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from library import textual_inversion, train_core
from library.cli import run_main
from train_textual_inversion import main as ti_main
from train_textual_inversion import setup_parser as ti_parser


def setup_parser() -> argparse.ArgumentParser:
    parser = ti_parser(xti_files=True)
    parser.description = __doc__
    return parser


def train(args: argparse.Namespace, hooks: Optional[train_core.TrainHooks] = None) -> train_core.TrainResult:
    """Train an XTI embedding with parsed `args` (library entry point; tests pass hooks)."""
    return train_core.run_training(args, textual_inversion.XTIMethod(args), hooks)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ti_main(argv, xti_files=True, parser=setup_parser())


if __name__ == "__main__":
    sys.exit(run_main(main))
