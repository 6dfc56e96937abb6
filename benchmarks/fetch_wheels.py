"""Fill benchmarks/wheels/ with the wheels benchmarks/gpu_check.sh installs on a machine with no internet.

    python3 benchmarks/fetch_wheels.py                  # the versions installed here, for Python 3.10-3.12
    python3 benchmarks/fetch_wheels.py --only diffusers --python_versions 3.12

Run it where the package registry can be reached. For every package in
`benchmarks/gpu_packages.REQUIRED` it downloads the wheel of the version installed in this
Python (so the GPU check runs what the tests here ran), without dependencies: the GPU machine
has them (its list is `gpu_packages.GPU_MACHINE_HAS`). A package published only as a source
archive is built into a wheel here (all of them are pure Python). A binary wheel is fetched
once per `--python_versions` entry. Older versions of a package in the folder are removed, so
pip finds one version of each. The folder is git-ignored; carry it to the GPU machine with the
working tree (the device tool's `carry`, 64 MiB at most — the script prints the total).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_packages import REQUIRED, WHEELS_DIR, normalize  # noqa: E402

logger = logging.getLogger(__name__)

CARRY_LIMIT_MIB = 64
DEFAULT_PYTHON_VERSIONS = ("3.10", "3.11", "3.12")
# manylinux tags a binary wheel may carry (pip matches each one exactly)
_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"error: {distribution} is not installed here; install it first (pip install {distribution})") from None


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, encoding="utf-8")


def is_pure(wheel: Path) -> bool:
    """py3-none-any style wheels run on every Python 3 and platform."""
    return wheel.name.endswith("-none-any.whl")


def _download(requirement: str, dest: Path, python_version: Optional[str]) -> Optional[Path]:
    args = ["download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), requirement]
    if python_version:
        args += ["--python-version", python_version, "--implementation", "cp"]
        for platform in _PLATFORMS:
            args += ["--platform", platform]
    result = _pip(*args)
    if result.returncode != 0:
        logger.debug("pip download %s failed: %s", requirement, result.stderr[-500:])
        return None
    wheels = sorted(dest.glob("*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


def _build(requirement: str, dest: Path) -> Path:
    result = _pip("wheel", "--no-deps", "--wheel-dir", str(dest), requirement)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise SystemExit(f"error: no wheel of {requirement} could be downloaded or built:\n{result.stderr[-1500:]}")
    return wheels[-1]


def fetch(distribution: str, version: str, folder: Path, python_versions: Sequence[str]) -> list[Path]:
    """The wheel(s) of distribution==version in `folder`; other versions of it there are removed."""
    requirement = f"{distribution}=={version}"
    folder.mkdir(parents=True, exist_ok=True)
    fetched: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        first = _download(requirement, Path(tmp), None) or _build(requirement, Path(tmp))
        if is_pure(first):
            fetched.append(first)
        else:
            for python_version in python_versions:
                target = Path(tmp) / python_version
                wheel = _download(requirement, target, python_version)
                if wheel is None:
                    raise SystemExit(f"error: no wheel of {requirement} for Python {python_version} on x86-64 Linux")
                fetched.append(wheel)
        keep = {wheel.name for wheel in fetched}
        prefix = normalize(distribution) + "-"
        for old in folder.glob("*.whl"):
            if normalize(old.name.split("-", 1)[0]) + "-" == prefix and old.name not in keep:
                old.unlink()
        placed = []
        for wheel in fetched:
            target = folder / wheel.name
            if not target.exists():  # the same file name is the same release: keep the one there
                wheel.replace(target)
            placed.append(target)
    return placed


def folder_size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=str, default=str(WHEELS_DIR), help="the folder to fill (default: %(default)s)")
    parser.add_argument("--only", type=str, default=None, help="comma-separated distributions (default: all of REQUIRED)")
    parser.add_argument(
        "--python_versions", type=str, default=",".join(DEFAULT_PYTHON_VERSIONS),
        help="Python versions binary wheels are fetched for (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    folder = Path(args.wheels)
    wanted = list(REQUIRED.values())
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in REQUIRED.values()]
        if unknown:
            parser.error(f"--only: {unknown[0]!r} is not a package the GPU check needs ({', '.join(REQUIRED.values())})")
    versions = [v.strip() for v in args.python_versions.split(",") if v.strip()]
    for distribution in wanted:
        version = installed_version(distribution)
        for wheel in fetch(distribution, version, folder, versions):
            print(f"{wheel.name}  {wheel.stat().st_size / 2**20:.2f} MiB")
    total = folder_size_mib(folder)
    print(f"{folder}: {total:.1f} MiB in all (the GPU machine takes {CARRY_LIMIT_MIB} MiB with the working tree)")
    if total > CARRY_LIMIT_MIB * 0.75:
        logger.warning("the wheel folder is %.1f MiB: close to the %d MiB carry limit", total, CARRY_LIMIT_MIB)
    return 0


if __name__ == "__main__":
    sys.exit(main())
