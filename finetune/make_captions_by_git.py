"""Caption a folder of images with GIT (transformers' GitForCausalLM).

    python finetune/make_captions_by_git.py <train_data_dir> --model_id <GIT folder or hub id>

Writes `<image stem><caption_extension>` (default `.caption`) beside each image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.caption_models import GIT_DEFAULT_MODEL, git_captions, load_git  # noqa: E402
from library.captioning import add_common_caption_arguments, caption_folder, preferred_device  # noqa: E402
from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_caption_arguments(parser, ".caption")
    parser.add_argument("--model_id", type=str, default=GIT_DEFAULT_MODEL,
                        help=f"GIT model: a local transformers folder or a hub id (default {GIT_DEFAULT_MODEL})")
    parser.add_argument("--max_length", type=int, default=50, help="longest caption, in tokens")
    parser.add_argument("--remove_words", action="store_true",
                        help="remove phrases that read out text in the image ('with the words ...', 'that says ...')")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)

    def make_describe():
        git = load_git(args.model_id, preferred_device())
        return lambda batch: git_captions(git, batch, args.max_length, args.remove_words)

    caption_folder(args, make_describe)


if __name__ == "__main__":
    sys.exit(run_main(main))
