"""Which Python packages the GPU check needs, and which of them this interpreter lacks.

Standard library only: `benchmarks/gpu_check.sh` runs this before anything else, on a machine
that may have no diffusers yet, and `benchmarks/fetch_wheels.py` reads the same lists to fill
the wheel folder.

    python3 benchmarks/gpu_packages.py --missing [--wheels benchmarks/wheels]

prints the distributions to install (one per line; nothing when all are there): every
REQUIRED one that cannot be imported, and every OPTIONAL one that cannot be imported but
whose wheel is in the folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

WHEELS_DIR = Path(__file__).resolve().parent / "wheels"

# import name -> distribution name, for what the trainers' and the generator's import chain
# needs beyond PyTorch. The first three are imported by library/ itself; the optimizers are
# imported by name when --optimizer_type asks for them (library/optimizers.py).
REQUIRED: dict[str, str] = {
    "diffusers": "diffusers",
    "toml": "toml",
    "voluptuous": "voluptuous",
    "lion_pytorch": "lion-pytorch",
    "prodigyopt": "prodigyopt",
    "dadaptation": "dadaptation",
    "einops": "einops",
}

# Installed only when a wheel for it is in the folder (both are binary wheels tied to one CUDA
# and PyTorch build, and too large for the 64 MiB the GPU machine takes along).
OPTIONAL: dict[str, str] = {
    "xformers": "xformers",
    "bitsandbytes": "bitsandbytes",
}

# What the GPU machine we test on already has (docs/benchmarks.md): the import chain may use
# these without a wheel. tests/test_gpu_check.py checks every third-party import of the code
# against REQUIRED, OPTIONAL and this list, so a new dependency cannot be forgotten here.
GPU_MACHINE_HAS: frozenset[str] = frozenset({
    "torch", "accelerate", "transformers", "safetensors", "peft", "huggingface_hub", "numpy", "PIL", "cv2",
    "tqdm", "scipy", "skimage", "onnxruntime", "psutil", "packaging", "yaml", "regex", "requests",
    "filelock", "tensorboard", "setuptools",
})

# Imported by code the GPU check never runs (trackers, captioning models): may be absent.
NOT_ON_CHECK_PATH: frozenset[str] = frozenset({"wandb", "open_clip", "timm", "fairscale"})


def normalize(name: str) -> str:
    """PEP 503 name as wheel files spell it (`lion-pytorch` -> `lion_pytorch`)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_for(distribution: str, folder: Path) -> Optional[Path]:
    """The wheel of `distribution` in `folder` (any version), or None."""
    if not folder.is_dir():
        return None
    prefix = normalize(distribution) + "-"
    matches = sorted(p for p in folder.glob("*.whl") if normalize(p.name.split("-", 1)[0]) + "-" == prefix)
    return matches[-1] if matches else None


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def extra_requirements(value: Optional[str]) -> dict[str, str]:
    """`module=distribution,...` (the GPU_CHECK_REQUIRE variable) as a dict; `module` alone means both."""
    pairs: dict[str, str] = {}
    for item in (value or "").split(","):
        item = item.strip()
        if item:
            module, _, distribution = item.partition("=")
            pairs[module.strip()] = (distribution or module).strip()
    return pairs


def missing_packages(
    folder: Path = WHEELS_DIR,
    required: Mapping[str, str] = REQUIRED,
    optional: Mapping[str, str] = OPTIONAL,
) -> list[str]:
    """Distributions to install: required ones not importable, optional ones not importable with a wheel here."""
    names = [dist for module, dist in required.items() if not importable(module)]
    names += [dist for module, dist in optional.items() if not importable(module) and wheel_for(dist, folder)]
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="list the packages the GPU check still needs")
    parser.add_argument("--missing", action="store_true", help="print the distributions to install, one per line")
    parser.add_argument("--wheels", type=str, default=str(WHEELS_DIR), help="the wheel folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.missing:
        parser.print_help()
        return 0
    required = {**REQUIRED, **extra_requirements(os.environ.get("GPU_CHECK_REQUIRE"))}
    for name in missing_packages(Path(args.wheels), required):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
