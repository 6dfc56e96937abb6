"""Merge tagger output files (`<image>.txt`) into a fine-tuning metadata JSON (`tags`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from finetune.merge_captions_to_metadata import merge_into_metadata  # noqa: E402
from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("train_data_dir", type=str, help="directory for train images")
    parser.add_argument("out_json", type=str, help="metadata file to output")
    parser.add_argument("--in_json", type=str, help="metadata file to input (default: the existing out_json)")
    parser.add_argument("--caption_extension", type=str, default=".txt", help="extension of the tag files")
    parser.add_argument("--full_path", action="store_true", help="use the full path as the image key (needed with --recursive)")
    parser.add_argument("--recursive", action="store_true", help="also search sub-folders (use with --full_path)")
    parser.add_argument("--debug", action="store_true", help="log every tag list")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    merge_into_metadata(setup_parser().parse_args(argv), "tags")


if __name__ == "__main__":
    sys.exit(run_main(main))
