"""Print the metadata of a .safetensors file as JSON.

Same argument as sd-scripts' tools/show_metadata.py:

    python tools/show_metadata.py --model my_lora.safetensors

The header's `__metadata__` is printed with sorted keys and 4-space indent. Any safetensors
file works (a LoRA, a checkpoint, a file written by another tool): only the header is read.
A file without metadata prints `{}`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.safetensors_header import read_metadata  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=str, required=True, help=".safetensors file whose metadata is printed")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = setup_parser().parse_args(argv)
    path = Path(args.model)
    if path.suffix.lower() in (".ckpt", ".pt", ".bin", ".pth"):
        raise UserError(f"{path}: only .safetensors files carry metadata")
    metadata = read_metadata(path)
    if not metadata:
        logger.warning("%s: no metadata found", path)
    print(json.dumps(metadata, indent=4, sort_keys=True))
    return metadata


if __name__ == "__main__":
    sys.exit(run_main(main))
