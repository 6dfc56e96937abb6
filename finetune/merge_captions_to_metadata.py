"""Merge `<image><caption_extension>` caption files into a fine-tuning metadata JSON (`caption`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.captions import merge_text_files_into_metadata, read_metadata_file  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.image_util import glob_images, glob_images_recursive  # noqa: E402
from library.io_util import write_text_atomic  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("train_data_dir", type=str, help="directory for train images")
    parser.add_argument("out_json", type=str, help="metadata file to output")
    parser.add_argument("--in_json", type=str, help="metadata file to input (default: the existing out_json)")
    parser.add_argument("--caption_extention", type=str, default=None, help="extension of caption file (old spelling, kept for compatibility)")
    parser.add_argument("--caption_extension", type=str, default=".caption", help="extension of caption file")
    parser.add_argument("--full_path", action="store_true", help="use the full path as the image key (needed with --recursive)")
    parser.add_argument("--recursive", action="store_true", help="also search sub-folders (use with --full_path)")
    parser.add_argument("--debug", action="store_true", help="log every caption")
    return parser


def merge_into_metadata(args: argparse.Namespace, field_name: str) -> dict:
    """Shared by merge_captions / merge_dd_tags: read metadata, merge text files, write out_json."""
    train_data_dir = Path(args.train_data_dir)
    if not train_data_dir.is_dir():
        raise UserError(f"train_data_dir {train_data_dir} not found")
    if args.recursive and not args.full_path:
        raise UserError("--recursive needs --full_path (image stems in sub-folders may collide)")
    image_paths = glob_images_recursive(train_data_dir) if args.recursive else glob_images(train_data_dir)
    logger.info(f"found {len(image_paths)} images")
    in_json = args.in_json
    if in_json is None and Path(args.out_json).is_file():
        in_json = args.out_json
    metadata = read_metadata_file(in_json) if in_json is not None else {}
    if in_json is not None:
        logger.info(f"loaded existing metadata {in_json}: {len(metadata)} entries")
    extension = getattr(args, "caption_extention", None) or args.caption_extension
    count = merge_text_files_into_metadata(metadata, image_paths, field_name, extension, args.full_path)
    if args.debug:
        for key, entry in metadata.items():
            logger.info(f"{key}: {entry.get(field_name)}")
    write_text_atomic(args.out_json, json.dumps(metadata, indent=2))
    logger.info(f"wrote {args.out_json}: {field_name} for {count} images")
    return metadata


def main(argv: Sequence[str] | None = None) -> None:
    merge_into_metadata(setup_parser().parse_args(argv), "caption")


if __name__ == "__main__":
    sys.exit(run_main(main))
