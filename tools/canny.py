"""Write the Canny edge map of an image (a ControlNet hint for `--control_net_preps none`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.cli import run_main  # noqa: E402
from library.control_hint import DEFAULT_CANNY_HIGH, DEFAULT_CANNY_LOW, write_canny  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", type=str, required=True, help="image to detect edges in")
    parser.add_argument("--output", type=str, required=True, help="PNG file to write the edge map to")
    parser.add_argument("--low", type=int, default=DEFAULT_CANNY_LOW, help=f"lower hysteresis threshold (default {DEFAULT_CANNY_LOW})")
    parser.add_argument("--high", type=int, default=DEFAULT_CANNY_HIGH, help=f"upper hysteresis threshold (default {DEFAULT_CANNY_HIGH})")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    print(write_canny(args.input, args.output, args.low, args.high))


if __name__ == "__main__":
    sys.exit(run_main(main))
