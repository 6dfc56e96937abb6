"""Start-up stays lean: every script imports its heavy dependencies only when a run needs them.

Non-timed guards of the lazy imports (benchmarks/suite_startup.py measures the time; see the
`## Start-up` section of benchmarks/RESULTS.md). A fresh interpreter imports every entry script
and runs its `--help`; a few scripts run, as the bad-input suite does, to an input file that is
missing. Afterwards the heavy packages that must not have been imported are looked up in
`sys.modules`. A failure names the script (and case) that first pulled the package in: move that
import into the function that needs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dataset_fixtures as df

REPO = Path(__file__).resolve().parents[1]

ENTRY_SCRIPTS = sorted(
    str(path.relative_to(REPO).as_posix())
    for pattern in ("*.py", "networks/*.py", "finetune/*.py", "tools/*.py")
    for path in REPO.glob(pattern)
    if path.name != "setup.py" and 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")
)

# Never needed to print a script's help. (OpenCV is not listed: it imports in ~0.05 s, measured.)
NOT_AT_HELP = (
    "diffusers", "transformers", "accelerate", "onnxruntime", "scipy", "tensorboard", "skimage", "peft", "bitsandbytes",
)
# Not needed before a run has found its model file (flags, config, dataset, outputs checked):
# diffusers' package import alone costs seconds (it pulls torch._dynamo, peft, transformers).
NOT_BEFORE_MODEL = (
    "diffusers", "transformers", "onnxruntime", "scipy", "tensorboard", "skimage", "peft", "bitsandbytes",
)

# Runs the cases [script, argv or null] one after another in this interpreter: each script is
# imported as a module (its `if __name__ == "__main__"` block does not run), then `main(argv)`
# runs with its output discarded. Prints, per case, the watched modules loaded so far and the
# user error the run stopped with ("" for none).
_CHECKER = r"""
import contextlib, io, json, runpy, sys
cases, watched = json.loads(sys.argv[1]), json.loads(sys.argv[2])
report = []
for script, argv in cases:
    namespace = runpy.run_path(script, run_name="startup_check")
    error = ""
    if argv is not None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                namespace["main"](argv)
            except SystemExit:
                pass
            except Exception as err:
                if type(err).__name__ != "UserError":
                    raise
                error = str(err)
    report.append([[name for name in watched if name in sys.modules], error])
print(json.dumps(report))
"""


def _run_cases(cases: list[tuple[str, list[str] | None]], watched: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """({module: the first case after which it was in sys.modules}, the cases' user errors), from
    one fresh interpreter."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(
        [sys.executable, "-c", _CHECKER, json.dumps(cases), json.dumps(watched)], cwd=REPO, env=env,
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first: dict[str, str] = {}
    errors = []
    for (script, argv), (names, error) in zip(cases, json.loads(result.stdout.strip().splitlines()[-1])):
        for name in names:
            first.setdefault(name, f"{script} {'(import)' if argv is None else ' '.join(argv)}")
        errors.append(error)
    return first, errors


def test_entry_scripts_are_found():
    assert {"train_network.py", "gen_img_diffusers.py", "networks/merge_lora.py", "tools/show_metadata.py"} <= set(
        ENTRY_SCRIPTS
    )


def test_help_of_every_script_imports_no_heavy_package():
    cases = [(script, ["--help"]) for script in ENTRY_SCRIPTS]
    first, errors = _run_cases(cases, NOT_AT_HELP)
    assert not first, f"imported for --help: {first}"
    assert errors == [""] * len(cases), errors


def _train_missing_model(tmp: Path) -> list[str]:
    df.make_dreambooth_folder(tmp / "data", "1_dog", [(64, 64)] * 2, ["a dog"] * 2)
    return [
        "--pretrained_model_name_or_path", str(tmp / "nothere.safetensors"), "--train_data_dir", str(tmp / "data"),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(tmp / "out"),
        "--network_module", "networks.lora", "--max_train_steps", "1", "--max_data_loader_n_workers", "0",
    ]


def test_training_run_stopping_at_missing_model_loads_no_model_code(tmp_path):
    """The bad-input rows that stop before the model loads pay for no diffusers / transformers models."""
    first, errors = _run_cases([("train_network.py", _train_missing_model(tmp_path))], NOT_BEFORE_MODEL)
    assert "nothere.safetensors: model not found" in errors[0], errors  # the run got as far as the model
    assert not first, f"imported before the model file was found: {first}"


@pytest.mark.parametrize("script,argv", [
    ("gen_img_diffusers.py", ["--ckpt", "{tmp}/none.safetensors", "--prompt", "a dog", "--outdir", "{tmp}/images"]),
    ("networks/merge_lora.py", ["--models", "{tmp}/none.safetensors", "--save_to", "{tmp}/m.safetensors"]),
    ("tools/convert_diffusers20_original_sd.py", ["{tmp}/none.safetensors", "{tmp}/out.safetensors"]),
])
def test_tool_stopping_at_missing_file_loads_no_model_code(tmp_path, script, argv):
    argv = [value.replace("{tmp}", str(tmp_path)) for value in argv]
    first, errors = _run_cases([(script, argv)], NOT_BEFORE_MODEL)
    assert "none.safetensors" in errors[0] and "not found" in errors[0], errors
    assert not first, f"imported before the input file was found: {first}"


def test_startup_benchmark_quick_mode(tmp_path):
    """benchmarks/suite_startup.py in --quick mode: its rows, measured CPU times, heavy-module lists."""
    from benchmarks.common import Context
    from benchmarks.suite_startup import QUICK_SCRIPTS, run

    rows = run(Context(out_dir=tmp_path, quick=True))
    assert [row.name for row in rows] == [f"{script} {case}" for script in QUICK_SCRIPTS for case in ("help", "missing")]
    assert all(row.metrics["cpu_s"] > 0 and row.metrics["wall_s"] > 0 for row in rows)
    heavy = {row.name: row.metrics["heavy"].split() for row in rows}
    assert "torch" in heavy["train_network.py missing"] and "accelerate" in heavy["train_network.py missing"]
    assert not {"diffusers", "transformers"} & set(heavy["train_network.py missing"])
    assert heavy["tools/show_metadata.py help"] == ["-"]  # reads a safetensors header: no torch at all
