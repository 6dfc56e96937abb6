"""Start-up cost of every entry script: `--help`, and a run that stops at a missing input file.

    python3 benchmarks/run.py --suites startup            # every script, 3 runs per case
    python3 benchmarks/suite_startup.py --repeats 5       # the same suite on its own
    python3 benchmarks/suite_startup.py --profile train_network.py --missing   # -X importtime top list
    python3 benchmarks/suite_startup.py --base_root /tmp/before   # before/after, alternating runs

Each case runs the script as a user runs it (`python3 <script> ...`, repository root as working
folder) and reports the child's CPU time (user + sys, from `getrusage(RUSAGE_CHILDREN)`): far less
disturbed by other processes on a shared machine than wall time, which is reported too. The
median of `repeats` runs is kept. One more run of each case, inside a small wrapper, lists which
heavy packages (diffusers pipelines, accelerate, cv2, scipy, ...) were imported by the time the
script exited: what lazy imports are meant to keep out.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, Context, Row, format_table  # noqa: E402

logger = logging.getLogger(__name__)

SUITE = "startup"

# Heavy imports a script should only pay for when it needs them (prefix match on module names).
HEAVY_MODULES = (
    "torch", "diffusers", "diffusers.pipelines", "transformers", "transformers.models.clip.modeling_clip",
    "accelerate", "cv2", "onnxruntime", "scipy", "tensorboard", "skimage", "peft", "bitsandbytes",
    "voluptuous", "safetensors.torch", "PIL.Image", "numpy",
)


@dataclass(frozen=True)
class Script:
    """An entry script and the arguments of a run that must stop at a missing file (exit 1)."""

    path: str
    missing: tuple[str, ...]


def _m(name: str) -> str:
    """A path under the missing-input folder (never created)."""
    return str(Path("/nonexistent-startup-bench") / name)


TRAINER_MISSING = ("--pretrained_model_name_or_path", _m("model.safetensors"), "--train_data_dir", _m("data"),
                   "--output_dir", _m("out"), "--resolution", "64")

SCRIPTS: tuple[Script, ...] = (
    Script("train_network.py", TRAINER_MISSING + ("--network_module", "networks.lora")),
    Script("train_db.py", TRAINER_MISSING),
    Script("fine_tune.py", TRAINER_MISSING + ("--in_json", _m("meta.json"))),
    Script("train_textual_inversion.py", TRAINER_MISSING + ("--token_string", "mytok", "--init_word", "dog")),
    Script("train_textual_inversion_XTI.py", TRAINER_MISSING + ("--token_string", "mytok", "--init_word", "dog")),
    Script("gen_img_diffusers.py", ("--ckpt", _m("model.safetensors"), "--prompt", "a dog", "--outdir", _m("images"))),
    Script("networks/merge_lora.py", ("--models", _m("a.safetensors"), "--save_to", _m("m.safetensors"))),
    Script("networks/svd_merge_lora.py", ("--models", _m("a.safetensors"), "--save_to", _m("m.safetensors"),
                                          "--new_rank", "4")),
    Script("networks/resize_lora.py", ("--model", _m("a.safetensors"), "--save_to", _m("r.safetensors"), "--new_rank", "2")),
    Script("networks/extract_lora_from_models.py", ("--model_org", _m("a.safetensors"), "--model_tuned", _m("b.safetensors"),
                                                    "--save_to", _m("e.safetensors"), "--dim", "4")),
    Script("networks/extract_lora_from_dylora.py", ("--model", _m("d.safetensors"), "--save_to", _m("c.safetensors"),
                                                    "--unit", "4")),
    Script("networks/check_lora_weights.py", (_m("a.safetensors"),)),
    Script("networks/lora_interrogator.py", ("--sd_model", _m("model.safetensors"), "--model", _m("a.safetensors"))),
    Script("finetune/clean_captions_and_tags.py", (_m("meta.json"), _m("out.json"))),
    Script("finetune/merge_captions_to_metadata.py", (_m("data"), _m("out.json"))),
    Script("finetune/merge_dd_tags_to_metadata.py", (_m("data"), _m("out.json"))),
    Script("finetune/prepare_buckets_latents.py", (_m("data"), _m("meta.json"), _m("out.json"), _m("model.safetensors"))),
    Script("finetune/make_captions.py", (_m("data"), "--caption_weights", _m("blip"))),
    Script("finetune/make_captions_by_git.py", (_m("data"), "--model_id", _m("git"))),
    Script("finetune/tag_images_by_wd14_tagger.py", (_m("data"), "--model_dir", _m("wd14"))),
    Script("tools/canny.py", ("--input", _m("in.png"), "--output", _m("out.png"))),
    Script("tools/convert_diffusers20_original_sd.py", (_m("model.safetensors"), _m("out.safetensors"))),
    Script("tools/detect_face_rotate.py", ("--src_dir", _m("data"), "--dst_dir", _m("out"))),
    Script("tools/latent_upscaler.py", ("--vae", _m("vae.safetensors"), "--weights", _m("up.safetensors"),
                                        "--image_pattern", _m("*.png"))),
    Script("tools/make_tiny_model.py", ()),  # writes a model; no input file to miss
    Script("tools/merge_models.py", ("--models", _m("a.safetensors"), _m("b.safetensors"), "--output", _m("m.safetensors"))),
    Script("tools/original_control_net.py", ("--model", _m("model.safetensors"), "--save_to", _m("cn.safetensors"))),
    Script("tools/resize_images_to_resolution.py", (_m("src"), _m("dst"))),
    Script("tools/show_metadata.py", ("--model", _m("a.safetensors"))),
    Script("tools/train_tiny_base_model.py", ()),  # trains from scratch; no input file to miss
)

QUICK_SCRIPTS = ("train_network.py", "tools/show_metadata.py")

# Runs a script as `python3 script` would (sys.path[0] = its folder, __main__) and, at exit,
# writes which heavy modules were imported.
_MODULES_WRAPPER = r"""
import atexit, json, runpy, sys
report, target, heavy = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
def _write():
    loaded = [name for name in heavy if name in sys.modules]
    with open(report, "w", encoding="utf-8") as out:
        json.dump(loaded, out)
atexit.register(_write)
sys.argv = [target, *sys.argv[4:]]
sys.path[0] = __import__("os").path.dirname(__import__("os").path.abspath(target))
runpy.run_path(target, run_name="__main__")
"""


@dataclass
class Timing:
    returncode: int
    cpu_s: float
    wall_s: float
    stderr: str


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def time_script(argv: Sequence[str], root: Path = ROOT, threads: int = 1) -> Timing:
    """CPU (user + sys) and wall time of one fresh `python3 <argv>` process run in checkout `root`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *argv], cwd=root, env=_env(threads), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(result.returncode, cpu, wall, result.stderr)


def heavy_modules_loaded(argv: Sequence[str], report: Path, root: Path = ROOT, threads: int = 1) -> list[str]:
    """The HEAVY_MODULES a fresh run of `argv` (in checkout `root`) had imported when it exited."""
    report.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-c", _MODULES_WRAPPER, str(report), argv[0], ",".join(HEAVY_MODULES), *argv[1:]],
                   cwd=root, env=_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    loaded = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else []
    report.unlink(missing_ok=True)
    return loaded


def _checked(runs: Sequence[Timing], what: str, expect_rc: int) -> Sequence[Timing]:
    bad = [run for run in runs if run.returncode != expect_rc]
    if bad:
        raise RuntimeError(f"{what}: exit status {bad[0].returncode}, expected {expect_rc}:\n{bad[0].stderr[-2000:]}")
    if expect_rc and not re.search(r"^error: ", runs[0].stderr, re.MULTILINE):
        raise RuntimeError(f"{what}: no 'error: ...' line:\n{runs[0].stderr[-2000:]}")
    return runs


def measure_case(script: str, argv: Sequence[str], expect_rc: int, repeats: int, report: Path,
                 base_root: Optional[Path] = None, modules: bool = True) -> dict:
    """Median CPU / wall time of `repeats` runs and the heavy modules loaded; with `base_root`, the
    same script of that checkout runs alternately with this one (before/after side by side)."""
    what = f"{script} {' '.join(argv)}"
    runs, base_runs = [], []
    for _ in range(repeats):
        if base_root is not None:
            base_runs.append(time_script([script, *argv], base_root))
        runs.append(time_script([script, *argv]))
    metrics = {
        "cpu_s": statistics.median(run.cpu_s for run in _checked(runs, what, expect_rc)),
        "wall_s": statistics.median(run.wall_s for run in runs),
    }
    if base_root is not None:
        metrics["before_cpu_s"] = statistics.median(run.cpu_s for run in _checked(base_runs, what + " (before)", expect_rc))
        metrics["after/before"] = metrics["cpu_s"] / metrics["before_cpu_s"]
    if modules:
        metrics["heavy"] = " ".join(heavy_modules_loaded([script, *argv], report)) or "-"
    return metrics


def run(ctx: Context) -> list[Row]:
    """Rows `<script> --help` and `<script> missing` (CPU s, wall s, heavy modules loaded)."""
    repeats = int(ctx.options.get("repeats", 1 if ctx.quick else 3))
    only = ctx.options.get("scripts")
    scripts = [s for s in SCRIPTS if s.path in QUICK_SCRIPTS] if ctx.quick else list(SCRIPTS)
    if only and not ctx.quick:
        scripts = [next(s for s in SCRIPTS if s.path == path) for path in only]  # in the order asked for
    base_root = ctx.options.get("base_root")
    report = ctx.out_dir / f".startup_modules_{os.getpid()}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for script in scripts:
        cases = [("help", ["--help"], 0)] + ([("missing", list(script.missing), 1)] if script.missing else [])
        for case, argv, expect_rc in cases:
            metrics = measure_case(script.path, argv, expect_rc, repeats, report, base_root,
                                   modules=bool(ctx.options.get("modules", True)))
            rows.append(Row(SUITE, f"{script.path} {case}", {"argv": argv, "repeats": repeats}, metrics))
            logger.info("%s %s: %s", script.path, case, metrics)  # rows as they come: long runs on busy machines
    return rows


def import_profile(argv: Sequence[str], top: int = 25) -> list[tuple[float, float, str]]:
    """`-X importtime` of one run: the `top` modules by cumulative time, as (self_s, cumulative_s, name)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", timeout=600)
    entries = []
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            entries.append((int(match.group(1)) / 1e6, int(match.group(2)) / 1e6, match.group(3), match.group(4)))
    # top-level entries (least indented) first matter most; list the biggest cumulative ones
    entries.sort(key=lambda entry: -entry[1])
    return [(self_s, cumulative, indent + name) for self_s, cumulative, indent, name in entries[:top]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (the median is kept)")
    parser.add_argument("--scripts", type=str, nargs="*", default=None, help="only these scripts (paths as in SCRIPTS)")
    parser.add_argument("--out_dir", type=str, default="bench_output")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", type=str, default=None, help="print the -X importtime top list of this script")
    parser.add_argument("--missing", action="store_true", help="with --profile: the missing-file case, not --help")
    parser.add_argument("--no_modules", action="store_true", help="skip the extra run that lists the heavy modules")
    parser.add_argument("--base_root", type=str, default=None,
                        help="another checkout (e.g. the commit before): its scripts run alternately with these")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.profile:
        script = next(s for s in SCRIPTS if s.path == args.profile)
        for self_s, cumulative, name in import_profile([script.path, *(script.missing if args.missing else ["--help"])]):
            print(f"{cumulative:7.3f} s cumulative {self_s:7.3f} s self  {name}")
        return 0
    ctx = Context(out_dir=Path(args.out_dir).resolve(), quick=args.quick,
                  options={"repeats": args.repeats, "scripts": args.scripts, "modules": not args.no_modules,
                           "base_root": Path(args.base_root).resolve() if args.base_root else None})
    print(format_table(run(ctx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
