"""Print statistics of every tensor of a LoRA file and flag broken modules.

Same arguments as sd-scripts' networks/check_lora_weights.py:

    python networks/check_lora_weights.py my_lora.safetensors [-s]

One CSV line per lora_up / lora_down tensor (`-s`: every key): `key,(shape),mean|v|,min|v|`
as sd-scripts prints them, then `max|v|` and the Frobenius norm. Modules holding NaN or inf
values or an all-zero up / down weight are listed at the end, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.lora_modules import load_lora_file  # noqa: E402
from networks.lora_stats import all_tensor_stats, is_weight_key, module_problems  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=str, help="LoRA file to check (.safetensors/.pt/.ckpt)")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="also list the keys that are not lora_up/lora_down")
    return parser


def check(args: argparse.Namespace) -> None:
    """Print the report; UserError (exit status 1) when a module is broken."""
    logger.info("loading: %s", args.file)
    state_dict, _ = load_lora_file(args.file, sd_model_keys=False)
    # every key is checked (a NaN alpha breaks a module too); -s only decides what is listed
    every = all_tensor_stats(state_dict, show_all_keys=True)
    listed = every if args.show_all_keys else [item for item in every if is_weight_key(item.key)]
    print(f"number of LoRA modules: {sum(is_weight_key(item.key) for item in every)}")
    if args.show_all_keys:
        print(f"number of all modules: {len(every)}")
    for item in listed:
        print(item.csv_line())
    broken = module_problems(every)
    num_modules = len({key.split(".", 1)[0] for key in state_dict})
    if not broken:
        print(f"all {num_modules} modules are finite and non-zero")
        return
    print(f"modules with problems: {len(broken)}")
    for entry in broken:
        print(f"{entry.name}: {', '.join(entry.problems)}")
    names = ", ".join(entry.name for entry in broken[:3]) + (", ..." if len(broken) > 3 else "")
    raise UserError(f"{args.file}: {len(broken)} of {num_modules} LoRA modules are broken (NaN, inf or all zero): {names}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    check(setup_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
