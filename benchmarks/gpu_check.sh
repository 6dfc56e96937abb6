#!/usr/bin/env bash
# The CUDA rows and the CUDA correctness check, on a machine with no internet.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py flags]     # e.g. --out_dir /tmp/gpu_check
#   bash benchmarks/gpu_check.sh --check_packages         # only install / report missing packages
#
# First installs what this Python lacks (diffusers, toml, voluptuous, the optimizer packages;
# xformers / bitsandbytes when their wheels are there) from the wheel folder that
# benchmarks/fetch_wheels.py fills, without the network. Then runs benchmarks/gpu_check.py,
# whose exit status it returns. See docs/benchmarks.md.
#
# Environment: PYTHON (default python3), GPU_CHECK_WHEELS (default benchmarks/wheels),
# GPU_CHECK_REQUIRE (extra module=distribution pairs that must be importable, comma-separated).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
wheels="${GPU_CHECK_WHEELS:-$here/wheels}"

missing="$("$python" "$here/gpu_packages.py" --missing --wheels "$wheels")"
if [ -z "$missing" ]; then
    echo "packages: nothing to install"
else
    # word splitting is wanted: one distribution name per line
    # shellcheck disable=SC2086
    echo "packages: installing from $wheels:" $missing
    # --no-deps: the machine has every dependency of these (they would need the network otherwise)
    # shellcheck disable=SC2086
    if ! "$python" -m pip install --quiet --no-index --no-deps --find-links "$wheels" $missing; then
        echo "error: could not install" $missing "from $wheels; run python3 benchmarks/fetch_wheels.py on a machine with the package registry and carry the folder along" >&2
        exit 2
    fi
    still="$("$python" "$here/gpu_packages.py" --missing --wheels "$wheels")"
    if [ -n "$still" ]; then
        echo "error: still not importable after installing:" $still >&2
        exit 2
    fi
fi

if [ "${1:-}" = "--check_packages" ]; then
    exit 0
fi
# relative paths in the flags (--out_dir, --json, --model) are taken from the caller's folder
exec "$python" "$here/gpu_check.py" "$@"
