"""Cut a DyLoRA into LoRA files of ranks unit, 2·unit, ... below its trained rank.

Same arguments as sd-scripts' networks/extract_lora_from_dylora.py:

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to lora.safetensors --unit 4

writes `lora-0004.safetensors`, `lora-0008.safetensors`, ... (one per rank below the DyLoRA's
rank). Each file equals the DyLoRA evaluated at that rank; metadata is copied with the new
`ss_network_dim` and a note in `ss_training_comment`. All files are written, or none.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library import modelspec  # noqa: E402
from library.cli import run_main  # noqa: E402
from networks.dylora_extract import cut_file_name, dylora_cuts  # noqa: E402
from library.lora_modules import (  # noqa: E402
    atomic_lora_outputs,
    check_distinct_output,
    check_lora_output,
    load_lora_file,
)
from networks.lora import write_lora_tensors  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", type=int, required=True, help="rank step of the cuts (a multiple of the training unit)")
    parser.add_argument(
        "--save_to", type=str, required=True,
        help="base name of the outputs (.safetensors/.pt/.ckpt); '-<rank:04d>' is added to the stem",
    )
    parser.add_argument("--model", type=str, required=True, help="DyLoRA file to cut (.safetensors/.pt/.ckpt)")
    return parser


def split(args: argparse.Namespace) -> list[Path]:
    """Write every cut of `args.model`; returns the written paths."""
    check_distinct_output(check_lora_output(args.save_to), [args.model])
    weights_sd, metadata = load_lora_file(args.model)
    cuts = dylora_cuts(weights_sd, metadata, args.unit, args.model)
    targets = [cut_file_name(args.save_to, rank) for rank, _, _ in cuts]
    for target in targets:
        check_distinct_output(target, [args.model])
    as_safetensors = Path(args.save_to).suffix.lower() == ".safetensors"
    with atomic_lora_outputs(targets) as temporary:
        for target, (rank, state_dict, meta) in zip(targets, cuts):
            logger.info("rank %d -> %s", rank, target)
            meta = modelspec.with_tool_modelspec(meta, modelspec.LORA, target, sources=[metadata])
            write_lora_tensors(temporary[target], state_dict, None, meta, as_safetensors)
    return targets


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    return split(setup_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
