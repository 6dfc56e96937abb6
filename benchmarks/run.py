"""The benchmark suite: one command, one table, one JSON file.

    python3 benchmarks/run.py                       # every suite, full-size SD 1.5 (random weights)
    python3 benchmarks/run.py --suites training --steps 20
    python3 benchmarks/run.py --quick               # small models, a few steps: checks the suite runs

Results go to `<out_dir>/results.json` (and the table to stdout). Record kept figures in
benchmarks/RESULTS.md with the command, date and machine.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Context, Row, format_table, write_json  # noqa: E402

# suite name -> module under benchmarks/ that has run(ctx) -> list[Row]
SUITES: dict[str, str] = {
    "quality": "suite_quality",
    "training": "suite_training",
    "startup": "suite_startup",
    "generation": "suite_generation",
    "latents": "suite_latents",
    "tools": "suite_tools",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", type=str, default=",".join(SUITES),
                        help=f"comma-separated, from: {', '.join(SUITES)} (default: all)")
    parser.add_argument("--out_dir", type=str, default="bench_output", help="models, outputs and results.json go here")
    parser.add_argument("--quick", action="store_true", help="small models and few steps (seconds, for tests)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every measured process")
    parser.add_argument("--steps", type=int, default=20, help="training / sampling steps per measured run")
    parser.add_argument("--json", type=str, default=None, help="results file (default: <out_dir>/results.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    names = [name.strip() for name in args.suites.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        parser.error(f"--suites: unknown suite {unknown[0]!r} (known: {', '.join(SUITES)})")
    ctx = Context(out_dir=Path(args.out_dir).resolve(), quick=args.quick, threads=args.threads, steps=args.steps)
    rows: list[Row] = []
    for name in names:
        started = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{SUITES[name]}")
        suite_rows = module.run(ctx)
        logging.info("suite %s: %d rows in %.0f s", name, len(suite_rows), time.perf_counter() - started)
        rows += suite_rows
    print(format_table(rows))
    command = "python3 benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    path = write_json(rows, Path(args.json) if args.json else ctx.out_dir / "results.json", command.strip())
    logging.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
