"""Clean the captions and tags of a fine-tuning metadata JSON (sd-scripts rules)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.captions import clean_metadata, read_metadata_file  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.io_util import write_text_atomic  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("in_json", type=str, help="metadata file to input")
    parser.add_argument("out_json", type=str, help="metadata file to output")
    parser.add_argument("--debug", action="store_true", help="log every change")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = setup_parser()
    args, unknown = parser.parse_known_args(argv)
    if len(unknown) == 1:  # old form: train_data_dir in_json out_json
        logger.warning("train_data_dir is no longer needed; pass only in_json and out_json")
        args.in_json, args.out_json = args.out_json, unknown[0]
    elif unknown:
        raise UserError(f"unrecognized arguments: {' '.join(unknown)}")
    if not Path(args.in_json).is_file():
        raise UserError(f"metadata file {args.in_json} not found")
    metadata = clean_metadata(read_metadata_file(args.in_json), debug=args.debug)
    write_text_atomic(args.out_json, json.dumps(metadata, indent=2))
    logger.info(f"wrote {args.out_json} ({len(metadata)} entries)")


if __name__ == "__main__":
    sys.exit(run_main(main))
