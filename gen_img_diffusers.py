"""Generate images with a Stable Diffusion 1.x / 2.x model (sd-scripts' gen_img_diffusers.py flags).

    python3 gen_img_diffusers.py --ckpt model.safetensors --outdir out --prompt "a cat --n blurry --d 42"

See docs/gen_img.md. The work is done in library/gen_img.py and library/gen_pipeline.py.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library import gen_args  # noqa: E402
from library.cli import run_main  # noqa: E402


def setup_parser():
    return gen_args.setup_parser()


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = gen_args.parse_args(argv)
    from library import gen_img  # models, pipelines and networks: after the flags are checked

    return gen_img.run(args, stdin=sys.stdin)


if __name__ == "__main__":
    sys.exit(run_main(main))
