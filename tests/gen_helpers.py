"""Shared helpers of the gen_img_diffusers.py tests: one image as pixels, one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import train_helpers  # noqa: F401 - puts the repository root on sys.path

import gen_img_diffusers  # noqa: E402
from library.cli import run_main  # noqa: E402


def generate_pixels(
    model: Path, outdir: Path, *extra: str, prompt: str = "a cat", size: int = 64, steps: int = 3, seed: int = 5
) -> np.ndarray:
    """Run the script in process for one image; its pixels as int16 (differences do not wrap)."""
    argv = ["--ckpt", str(model), "--outdir", str(outdir), "--W", str(size), "--H", str(size),
            "--steps", str(steps), "--seed", str(seed), "--prompt", prompt, *extra]
    (written,) = gen_img_diffusers.main(argv)
    with Image.open(written) as image:
        return np.asarray(image).astype(np.int16)


def one_line_error(capsys, argv) -> str:
    """The script's error for `argv`: exit code 1 and exactly one `error: ...` line on stderr."""
    assert run_main(gen_img_diffusers.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]
