"""Resize the images of a folder to at most the given resolution(s) (area), keeping the aspect ratio."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.cli import run_main  # noqa: E402
from library.image_util import resize_folder_images  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src_img_folder", type=str, help="Source folder containing the images")
    parser.add_argument("dst_img_folder", type=str, help="Destination folder to save the resized images")
    parser.add_argument("--max_resolution", type=str, default="512x512,384x384,256x256,128x128",
                        help='Maximum resolution(s) in the format "512x512,384x384, etc, etc"')
    parser.add_argument("--divisible_by", type=int, default=1, help="Ensure new dimensions are divisible by this value")
    parser.add_argument("--interpolation", type=str, choices=["area", "cubic", "lanczos4", "nearest", "linear"], default=None,
                        help="Interpolation method for resizing (default: area)")
    parser.add_argument("--save_as_png", action="store_true", help="Save as png format (default: jpg, quality 100)")
    parser.add_argument("--copy_associated_files", action="store_true",
                        help="Copy files with same base name to images (captions etc)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    resize_folder_images(
        args.src_img_folder, args.dst_img_folder, [r.strip() for r in args.max_resolution.split(",") if r.strip()],
        args.divisible_by, args.interpolation, args.save_as_png, args.copy_associated_files,
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
