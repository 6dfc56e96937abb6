"""The CUDA rows of the benchmark and a correctness check of every CUDA code path, in one run.

    bash benchmarks/gpu_check.sh --out_dir /tmp/gpu_check          # on a CUDA machine (< 8 min on one H200)
    python3 benchmarks/gpu_check.py --cpu_smoke --out_dir /tmp/gc  # the same code on CPU, tiny models, seconds

Correctness: every trainer (train_network.py, train_db.py, fine_tune.py,
train_textual_inversion.py, train_textual_inversion_XTI.py) runs a few steps on the tiny model
with `--mixed_precision fp16` and `bf16`, `--full_fp16` and `--full_bf16`, `--xformers` when
xformers imports, the 8-bit optimizers when bitsandbytes imports, and train_network.py with the
other optimizer packages; then gen_img_diffusers.py generates with each trained LoRA. Each run
must exit 0, log a finite loss for every step and leave an output that loads.

Rows (full-size SD 1.5 architecture, random weights built here, or `--model`): LoRA 512², batch
1, fp16 and bf16, gradient checkpointing, SDPA (s/step, peak CUDA memory); full U-Net
fine-tune 512², batch 16, bf16 (s/step, MFU from U-Net FLOPs counted by
`torch.utils.flop_counter`); generation 512², 20 steps, side by side with
`diffusers.StableDiffusionPipeline`; optional rows (fused AdamW, and channels-last /
torch.compile where the trainers have such flags), reported, not adopted.

Prints one table, writes JSON (`--json`), exits 1 when any check or row failed (after running
the rest). Nothing here imports torch at module level: the package check of gpu_check.sh runs
first on a machine that may lack diffusers. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Context, Measured, Row, format_table, median_after_warmup, run_measured, write_json, write_random_sd_model,
)
from benchmarks.gpu_packages import importable  # noqa: E402

logger = logging.getLogger(__name__)

SUITE_ROWS = "cuda"
SUITE_CHECKS = "check"
TOKEN = "gpuchk"  # the concept word of the check images (also the textual-inversion token)
GIB = 2**30
LORA_TARGET_BYTES = 4 * 10**9  # issue 13: LoRA 512², batch 1 within 4 GB allocated
MFU_TARGET = 0.45

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; the first
# name fragment found in torch.cuda.get_device_name() wins, so specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
    ("RTX A6000", 155.0),
)

TRAINERS = ("train_network.py", "train_db.py", "fine_tune.py", "train_textual_inversion.py", "train_textual_inversion_XTI.py")
PRECISIONS: dict[str, list[str]] = {
    "fp16": ["--mixed_precision", "fp16"],
    "bf16": ["--mixed_precision", "bf16"],
    "full_fp16": ["--mixed_precision", "fp16", "--full_fp16"],
    "full_bf16": ["--mixed_precision", "bf16", "--full_bf16"],
    "fp32": ["--mixed_precision", "no"],
}


def bf16_peak_tflops(device_name: Optional[str]) -> Optional[float]:
    """The device's dense bf16 peak, or None when the name is not in the table."""
    for fragment, peak in BF16_PEAK_TFLOPS:
        if device_name and fragment.lower() in device_name.lower():
            return peak
    return None


# --- the settings of one run ------------------------------------------------------------
@dataclass
class Settings:
    out_dir: Path
    cuda: bool
    smoke: bool
    threads: int
    jobs: int
    check_steps: int
    row_steps: int
    size: int  # rows: training / generation resolution
    ft_batch: int
    gen_steps: int
    gen_images: int
    model: Optional[Path]
    peak_tflops: Optional[float]
    time_budget_s: float
    timeout_s: float
    parts: tuple[str, ...]
    started: float = field(default_factory=time.perf_counter)

    @property
    def check_precisions(self) -> list[str]:
        # CPU autocast has bf16 but no fp16 (accelerate refuses fp16 without a GPU)
        return ["fp16", "bf16", "full_fp16", "full_bf16"] if self.cuda else ["bf16"]

    @property
    def row_precisions(self) -> list[str]:
        return ["fp16", "bf16"] if self.cuda else ["fp32"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.time_budget_s


# --- the data and models ----------------------------------------------------------------
@dataclass
class Workspace:
    tiny_model: Path
    db_images: Path  # DreamBooth parent folder (`<repeats>_<token> shape` inside), check size
    ft_images: Path  # plain folder with captions, check size
    ft_meta: Path
    row_db_images: Path
    row_ft_images: Path
    row_ft_meta: Path


def write_dataset(root: Path, count: int, size: int, repeats: int, seed: int) -> tuple[Path, Path, Path]:
    """(DreamBooth parent folder, fine-tuning folder, its metadata JSON) of `count` scenes."""
    from library.io_util import write_text_atomic
    from library.shape_scenes import caption, make_scenes, write_scene_folder

    scenes = make_scenes(count, seed)
    db_parent = root / "db"
    if not db_parent.is_dir():
        write_scene_folder(db_parent / f"{repeats}_{TOKEN} shape", scenes, size, shape_word=TOKEN)
    ft_folder = root / "ft"
    meta = root / "ft_meta.json"
    if not meta.is_file():
        paths = write_scene_folder(ft_folder, scenes, size, shape_word=TOKEN, caption_extension=".caption")
        entries = {path.stem: {"caption": caption(scene, TOKEN)} for path, scene in zip(paths, scenes)}
        write_text_atomic(meta, json.dumps(entries, indent=1) + "\n")
    return db_parent, ft_folder, meta


def build_workspace(settings: Settings) -> Workspace:
    from library.tiny_sd import write_tiny_model

    root = settings.out_dir
    tiny = root / "tiny" / "tiny_sd_v1.safetensors"
    if not tiny.is_file():
        tiny = write_tiny_model(root / "tiny", formats=("safetensors",), seed=0)["safetensors"]
    db, ft, meta = write_dataset(root / "data_check", count=4, size=64, repeats=2, seed=1)
    row_count = max(settings.ft_batch * 2, 8)
    row_db, row_ft, row_meta = write_dataset(root / f"data_{settings.size}", row_count, settings.size, 1, seed=2)
    return Workspace(tiny, db, ft, meta, row_db, row_ft, row_meta)


def full_model(settings: Settings) -> Path:
    """`--model`, or the random-weight SD 1.5 file built here (small U-Net with --cpu_smoke)."""
    if settings.model is not None:
        return settings.model
    ctx = Context(out_dir=settings.out_dir, quick=settings.smoke)
    name = f"sd15_random{'_quick' if settings.smoke else ''}.safetensors"
    return write_random_sd_model(ctx.out_dir / name, quick=settings.smoke)


# --- trainer command lines --------------------------------------------------------------
def trainer_argv(script: str, model: Path, ws_images: tuple[Path, Path, Path], out: Path, size: int,
                 batch: int, steps: int, extra: Sequence[str] = ()) -> list[str]:
    """A short run of `script` on the given data; `extra` flags come last (and win)."""
    db_parent, ft_folder, meta = ws_images
    argv = [
        "--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--output_name", "out",
        "--resolution", str(size), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
        "--seed", "42", "--max_data_loader_n_workers", "0", "--optimizer_type", "AdamW", "--cache_latents",
    ]
    if script == "fine_tune.py":
        argv += ["--in_json", str(meta), "--train_data_dir", str(ft_folder), "--learning_rate", "1e-5",
                 "--save_model_as", "safetensors", "--dataset_repeats", "1"]
    else:
        argv += ["--train_data_dir", str(db_parent), "--caption_extension", ".txt"]
    if script == "train_network.py":
        argv += ["--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8", "--learning_rate", "1e-4"]
    elif script == "train_db.py":
        argv += ["--learning_rate", "1e-5", "--save_model_as", "safetensors"]
    elif script.startswith("train_textual_inversion"):
        argv += ["--token_string", TOKEN, "--init_word", "shape", "--num_vectors_per_token", "2",
                 "--learning_rate", "5e-3", "--save_model_as", "safetensors"]
    return argv + list(extra)


def output_kind(script: str) -> str:
    return {
        "train_network.py": "lora", "train_db.py": "model", "fine_tune.py": "model",
        "train_textual_inversion.py": "embedding", "train_textual_inversion_XTI.py": "xti",
    }[script]


# --- checking what a run left behind --------------------------------------------------
def _nonfinite(tensors: Any) -> list[str]:
    import torch

    return [name for name, tensor in tensors if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def output_problem(kind: str, path: Optional[Path]) -> str:
    """'' when the output of a run loads and holds only finite numbers, else what is wrong."""
    if path is None or not path.exists():
        return f"no output file ({path})"
    try:
        if kind == "lora":
            from library.safetensors_header import read_metadata
            from networks.lora import load_lora_state_dict

            tensors = load_lora_state_dict(path)
            bad = _nonfinite(tensors.items())
            if not tensors:
                return f"{path}: no tensors"
            if "ss_network_module" not in read_metadata(path):
                return f"{path}: no ss_network_module metadata"
        elif kind == "model":
            from library.model_util import load_target_model

            models = load_target_model(path)
            bad = _nonfinite([*models.unet.named_parameters(), *models.text_encoder.named_parameters()])
        elif kind == "embedding":
            from library.embedding_files import read_embedding

            bad = _nonfinite([("vectors", read_embedding(path).vectors)])
        elif kind == "xti":
            from library.embedding_files import read_xti_file

            blocks, _ = read_xti_file(path)
            bad = _nonfinite(blocks.items())
        elif kind == "images":
            return images_problem(sorted(Path(path).glob("*.png")))
        else:
            raise ValueError(kind)
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        return f"{path}: does not load: {type(err).__name__}: {err}"
    return f"{path}: non-finite values in {', '.join(bad[:3])}" if bad else ""


def images_problem(paths: Sequence[Path]) -> str:
    import numpy as np
    from PIL import Image

    if not paths:
        return "no images written"
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if float(pixels.std()) == 0.0:  # NaN latents decode to one flat colour
            return f"{path}: a single flat colour (NaN / inf in the sampling?)"
    return ""


def losses_problem(report: dict[str, Any], steps: int) -> str:
    losses = report.get("losses")
    if losses is None:
        return "no losses reported (training did not finish)"
    if len(losses) != steps:
        return f"{len(losses)} losses for {steps} steps"
    bad = [i + 1 for i, value in enumerate(losses) if not math.isfinite(value)]
    return f"non-finite loss at step {bad[0]}" if bad else ""


# --- running --------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    ok: bool
    problem: str
    measured: Optional[Measured]
    report: dict[str, Any]

    def row(self) -> Row:
        status = "ok" if self.ok else "FAIL"
        metrics: dict[str, Any] = {"result": status}
        if self.measured is not None:
            metrics["wall_s"] = self.measured.wall_s
        losses = self.report.get("losses")
        if losses:
            metrics["last_loss"] = losses[-1]
        return Row(SUITE_CHECKS, self.name, metrics=metrics, note=self.problem)


def skipped(name: str, why: str) -> Row:
    return Row(SUITE_CHECKS, name, metrics={"result": f"skipped: {why}"})


def context(settings: Settings, name: str) -> Context:
    """A Context of its own per child: run_measured names its peak-memory file after this
    process, so children started side by side need separate folders."""
    return Context(out_dir=settings.out_dir / "work" / slug(name), quick=settings.smoke, threads=settings.threads)


def run_probe(settings: Settings, name: str, script: str, argv: Sequence[str]) -> tuple[Measured, dict[str, Any]]:
    """Run `script` under benchmarks/train_probe.py; (the measured process, its report)."""
    report_path = settings.out_dir / "reports" / f"{slug(name)}.json"
    report_path.unlink(missing_ok=True)
    measured = run_measured(["benchmarks/train_probe.py", str(report_path), script, *argv], context(settings, name),
                            timeout=settings.timeout_s)
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    save_log(settings, name, measured)
    return measured, report


def save_log(settings: Settings, name: str, measured: Measured) -> None:
    from library.io_util import write_text_atomic

    (settings.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    write_text_atomic(settings.out_dir / "logs" / f"{slug(name)}.log", measured.stdout + measured.stderr)


def slug(name: str) -> str:
    """A file name for a row or check name (ASCII letters, digits and `_`)."""
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in name).strip("_")


def train_outcome(settings: Settings, name: str, script: str, argv: Sequence[str], steps: int) -> Outcome:
    """Run a trainer and judge it: exit 0, `steps` finite losses, an output that loads."""
    try:
        measured, report = run_probe(settings, name, script, argv)
    except Exception as err:  # noqa: BLE001 - a timeout or a broken probe is a failed check
        return Outcome(name, False, f"{type(err).__name__}: {err}", None, {})
    problem = ""
    if measured.returncode != 0:
        problem = f"exit status {measured.returncode}: {last_error_line(measured.stderr)}"
    problem = problem or losses_problem(report, steps)
    if not problem:
        final = report.get("final_model_path")
        problem = output_problem(output_kind(script), Path(final) if final else None)
    return Outcome(name, not problem, problem, measured, report)


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line.split(":")[0]:
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "(no output)"


# --- correctness ------------------------------------------------------------------------
@dataclass
class CheckJob:
    name: str
    script: str
    argv: list[str]


def flag_supported(script: str, flag: str) -> bool:
    """The script's parser has `--flag` and the toolkit does not refuse it as unimplemented."""
    import importlib

    from library import train_util
    from library.errors import UserError

    module = importlib.import_module(Path(script).stem)
    parser = module.setup_parser()
    known = {option.lstrip("-") for action in parser._actions for option in action.option_strings}
    if flag not in known:
        return False
    try:
        train_util.check_unsupported_flags([f"--{flag}"], known_flags=known)
    except UserError:
        return False
    return True


def check_jobs(settings: Settings, ws: Workspace) -> tuple[list[CheckJob], list[Row]]:
    """The trainer runs of the correctness check, and rows for those skipped on this machine."""
    jobs: list[CheckJob] = []
    skips: list[Row] = []
    images = (ws.db_images, ws.ft_images, ws.ft_meta)
    steps = settings.check_steps

    def add(name: str, script: str, extra: Sequence[str]) -> None:
        out = settings.out_dir / "check_out" / slug(name)
        jobs.append(CheckJob(name, script, trainer_argv(script, ws.tiny_model, images, out, 64, 2, steps, extra)))

    for script in TRAINERS:
        stem = Path(script).stem
        for precision in PRECISIONS:
            if precision in settings.check_precisions:
                add(f"{stem} {precision}", script, PRECISIONS[precision])
            elif precision != "fp32":
                skips.append(skipped(f"{stem} {precision}", "needs CUDA"))
        for package, name, extra in (
            ("xformers", f"{stem} fp16 xformers", [*PRECISIONS["fp16"], "--xformers"]),
            ("bitsandbytes", f"{stem} bf16 AdamW8bit", [*PRECISIONS["bf16"], "--optimizer_type", "AdamW8bit"]),
        ):
            why = "needs CUDA" if not settings.cuda else "" if importable(package) else f"{package} not importable"
            if why:
                skips.append(skipped(name, why))
            else:
                add(name, script, extra)
    # frozen base weights in fp8 (train_network.py only; CPU autocast has bf16, CUDA both)
    for precision in ("fp16", "bf16") if settings.cuda else ("bf16",):
        add(f"train_network {precision} fp8_base", "train_network.py", [*PRECISIONS[precision], "--fp8_base"])
    # the optimizer packages the wheel folder brings (the CPU suite covers them on CPU)
    optimizers = [("Lion", "1e-5", None), ("Prodigy", "1.0", None), ("DAdaptAdam", "1.0", None),
                  ("Lion8bit", "1e-5", "bitsandbytes")]
    for optimizer, lr, package in optimizers:
        name = f"train_network bf16 {optimizer}"
        why = "needs CUDA" if not settings.cuda else f"{package} not importable" if package and not importable(package) else ""
        if why:
            skips.append(skipped(name, why))
        else:
            add(name, "train_network.py", [*PRECISIONS["bf16"], "--optimizer_type", optimizer, "--learning_rate", lr])
    return jobs, skips


def generation_argv(model: Path, outdir: Path, lora: Path, precision: str) -> list[str]:
    """gen_img_diffusers.py flags of the generator check: 2 images of 64², 4 DDIM steps, the LoRA at 1.0."""
    argv = ["--ckpt", str(model), "--outdir", str(outdir), "--W", "64", "--H", "64", "--steps", "4", "--sampler", "ddim",
            "--seed", "1", "--images_per_prompt", "2", "--batch_size", "2", "--network_module", "networks.lora",
            "--network_weights", str(lora), "--network_mul", "1.0",
            "--prompt", f"a red {TOKEN} on a blue background --n blurry"]
    return argv + ([f"--{precision}"] if precision in ("fp16", "bf16") else [])


def generation_outcome(settings: Settings, ws: Workspace, lora: Outcome, precision: str) -> Outcome:
    """gen_img_diffusers.py with the LoRA `lora` trained: exit 0, PNGs that load, not flat."""
    name = f"gen_img_diffusers {precision} + LoRA"
    outdir = settings.out_dir / "check_out" / slug(name)
    argv = ["gen_img_diffusers.py", *generation_argv(ws.tiny_model, outdir, Path(lora.report.get("final_model_path", "")), precision)]
    try:
        measured = run_measured(argv, context(settings, name), timeout=settings.timeout_s)
    except Exception as err:  # noqa: BLE001
        return Outcome(name, False, f"{type(err).__name__}: {err}", None, {})
    save_log(settings, name, measured)
    problem = f"exit status {measured.returncode}: {last_error_line(measured.stderr)}" if measured.returncode else ""
    problem = problem or output_problem("images", outdir)
    return Outcome(name, not problem, problem, measured, {})


def run_checks(settings: Settings, ws: Workspace, pool: ThreadPoolExecutor) -> list[Outcome | Row]:
    jobs, skips = check_jobs(settings, ws)
    futures: list[tuple[CheckJob, Future]] = [
        (job, pool.submit(train_outcome, settings, job.name, job.script, job.argv, settings.check_steps)) for job in jobs
    ]
    outcomes: list[Outcome] = []
    for job, future in futures:
        outcome = future.result()
        logger.info("check %s: %s %s", job.name, "ok" if outcome.ok else "FAIL", outcome.problem)
        outcomes.append(outcome)
    generation: list[Future] = []
    lora_runs = {f"train_network {p}": p for p in settings.check_precisions if not p.startswith("full")}
    for outcome in outcomes:  # every LoRA of a plain precision that trained: the generator in that precision
        if outcome.ok and outcome.name in lora_runs:
            generation.append(pool.submit(generation_outcome, settings, ws, outcome, lora_runs[outcome.name]))
    if not generation:
        skips.append(skipped("gen_img_diffusers + LoRA", "no LoRA trained"))
    for future in generation:
        outcome = future.result()
        logger.info("check %s: %s %s", outcome.name, "ok" if outcome.ok else "FAIL", outcome.problem)
        outcomes.append(outcome)
    return [*outcomes, *skips]


# --- FLOPs ------------------------------------------------------------------------------
def unet_training_flops(model: Path, batch: int, size: int) -> int:
    """FLOPs of one U-Net forward + backward (all weight gradients) on `batch` latents of a
    `size`² image, counted by torch.utils.flop_counter on meta tensors (no memory, no device).
    On meta tensors attention runs as PyTorch's math path, so it counts as its matrix products:
    the same FLOPs a fused kernel does."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from library import sd_config
    from library.checkpoint_tensors import open_checkpoint_tensors

    with open_checkpoint_tensors(model) as checkpoint:
        config = sd_config.infer_unet_config(checkpoint.shapes, checkpoint.v2)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        latents = torch.randn(batch, unet.config.in_channels, size // 8, size // 8)
        timesteps = torch.randint(0, 1000, (batch,))
        states = torch.randn(batch, 77, unet.config.cross_attention_dim)
    counter = FlopCounterMode(display=False)
    with counter:
        prediction = unet(latents, timesteps, states, return_dict=False)[0]
        prediction.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


# --- rows -------------------------------------------------------------------------------
def training_row(settings: Settings, name: str, script: str, argv: list[str], steps: int,
                 params: dict[str, Any], flops_per_step: Optional[int] = None) -> tuple[Row, Outcome]:
    outcome = train_outcome(settings, name, script, argv, steps)
    report, measured = outcome.report, outcome.measured
    metrics: dict[str, Any] = {}
    times = report.get("step_times") or []
    if times:
        metrics["s_per_step"] = median_after_warmup(times)
    setup, loop = report.get("cuda_setup_peak") or {}, report.get("cuda_loop_peak") or {}
    if setup or loop:
        metrics["peak_alloc_GiB"] = max(setup.get("allocated", 0), loop.get("allocated", 0)) / GIB
        metrics["peak_reserved_GiB"] = max(setup.get("reserved", 0), loop.get("reserved", 0)) / GIB
        metrics["loop_alloc_GiB"] = loop.get("allocated", 0) / GIB
    if measured is not None:
        metrics["peak_rss_MiB"] = measured.peak_rss_mib
        metrics["wall_s"] = measured.wall_s
    metrics.update(phase_metrics(report))
    if flops_per_step and "s_per_step" in metrics:
        achieved = flops_per_step / metrics["s_per_step"]
        metrics["TFLOP/s"] = achieved / 1e12
        peak = settings.peak_tflops or bf16_peak_tflops(report.get("device_name"))
        metrics["MFU"] = achieved / (peak * 1e12) if peak else "unknown"
        params["unet_flops_per_step"] = flops_per_step
        params["peak_tflops"] = peak
    params["device"] = report.get("device_name") or report.get("device")
    note = "" if outcome.ok else f"FAILED: {outcome.problem}"
    if not outcome.ok:
        metrics["result"] = "FAIL"
    return Row(SUITE_ROWS, name, params=params, metrics=metrics, note=note), outcome


def phase_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Wall time split: start-up, loading, caching, other set-up, loop, save (seconds)."""
    phases = report.get("phases") or {}
    if "run_training_s" not in report or "train_start_s" not in report:
        return {}
    setup = report["train_start_s"] - report["run_training_s"]
    loading, caching = phases.get("loading", 0.0), phases.get("caching", 0.0)
    metrics = {"startup_s": report["run_training_s"], "loading_s": loading, "caching_s": caching,
               "setup_other_s": setup - loading - caching}
    if "train_end_s" in report:
        save = phases.get("save", 0.0)
        metrics["loop_s"] = report["train_end_s"] - report["train_start_s"] - save
        metrics["save_s"] = save
    return metrics


@dataclass
class RowRun:
    """One training row: what runs and how it is reported. `optional` rows give way to the time budget."""

    name: str
    script: str
    argv: list[str]
    params: dict[str, Any]
    optional: bool = False
    flops_per_step: Optional[int] = None


def lora_plan(settings: Settings, ws: Workspace, model: Path) -> list[RowRun]:
    """LoRA 512², batch 1, each row precision, gradient checkpointing, SDPA; then the optional variants."""
    images = (ws.row_db_images, ws.row_ft_images, ws.row_ft_meta)
    base = ["--gradient_checkpointing", "--sdpa"]
    variants = [(f"LoRA {settings.size}² b1 {p}", p, [*PRECISIONS[p], *base], False) for p in settings.row_precisions]
    if settings.cuda:
        best = settings.row_precisions[-1]
        best_flags = [*PRECISIONS[best], *base]
        variants.append((f"LoRA {settings.size}² b1 {best} fused AdamW", best, [*best_flags, "--optimizer_args", "fused=True"], True))
        for flag in ("fp8_base", "channels_last", "torch_compile"):  # those the trainer has
            if flag_supported("train_network.py", flag):
                variants.append((f"LoRA {settings.size}² b1 {best} {flag}", best, [*best_flags, f"--{flag}"], True))
    runs = []
    for name, precision, extra, optional in variants:
        out = settings.out_dir / "row_out" / slug(name)
        argv = trainer_argv("train_network.py", model, images, out, settings.size, 1, settings.row_steps, extra)
        params = {"script": "train_network.py", "resolution": settings.size, "batch": 1, "precision": precision,
                  "flags": shlex.join(extra), "target_alloc_bytes": LORA_TARGET_BYTES}
        runs.append(RowRun(name, "train_network.py", argv, params, optional))
    return runs


def fine_tune_plan(settings: Settings, ws: Workspace, model: Path, flops_per_step: Optional[int]) -> list[RowRun]:
    """Full U-Net fine-tune (fine_tune.py, text encoder frozen), batch 16, bf16, SDPA; then fused AdamW."""
    images = (ws.row_db_images, ws.row_ft_images, ws.row_ft_meta)
    batch = settings.ft_batch
    precision = "bf16" if settings.cuda else "fp32"
    base = [*PRECISIONS[precision], "--sdpa", "--save_precision", "bf16" if settings.cuda else "float"]
    variants = [(f"full U-Net fine-tune {settings.size}² b{batch} {precision}", base, False)]
    if settings.cuda:
        variants.append((f"full U-Net fine-tune {settings.size}² b{batch} {precision} fused AdamW",
                         [*base, "--optimizer_args", "fused=True"], True))
    runs = []
    for name, extra, optional in variants:
        out = settings.out_dir / "row_out" / slug(name)
        argv = trainer_argv("fine_tune.py", model, images, out, settings.size, batch, settings.row_steps, extra)
        params = {"script": "fine_tune.py", "resolution": settings.size, "batch": batch, "precision": precision,
                  "flags": shlex.join(extra), "target_mfu": MFU_TARGET}
        runs.append(RowRun(name, "fine_tune.py", argv, params, optional, flops_per_step))
    return runs


def run_rows(settings: Settings, runs: Sequence[RowRun]) -> list[tuple[Row, Optional[Outcome]]]:
    results: list[tuple[Row, Optional[Outcome]]] = []
    for run in runs:
        if run.optional and settings.over_budget():
            results.append((Row(SUITE_ROWS, run.name, params=run.params, metrics={"result": "skipped: time budget"}), None))
            continue
        results.append(training_row(settings, run.name, run.script, run.argv, settings.row_steps, dict(run.params),
                                    run.flops_per_step))
    return results


def generation_row(settings: Settings, model: Path) -> tuple[Row, Outcome]:
    precision = "fp16" if settings.cuda else "fp32"
    name = f"generation {settings.size}² {settings.gen_steps} steps {precision}"
    report_path = settings.out_dir / "reports" / f"{slug(name)}.json"
    report_path.unlink(missing_ok=True)
    outdir = settings.out_dir / "row_out" / slug(name)
    argv = ["benchmarks/gen_probe.py", str(report_path), "--ckpt", str(model), "--outdir", str(outdir),
            "--size", str(settings.size), "--steps", str(settings.gen_steps), "--images", str(settings.gen_images),
            "--precision", precision]
    params = {"script": "gen_img_diffusers.py (library.gen_img)", "resolution": settings.size,
              "steps": settings.gen_steps, "precision": precision, "sampler": "ddim", "scale": 7.5, "batch": 1}
    try:
        measured = run_measured(argv, context(settings, name), timeout=settings.timeout_s)
    except Exception as err:  # noqa: BLE001
        outcome = Outcome(name, False, f"{type(err).__name__}: {err}", None, {})
        return Row(SUITE_ROWS, name, params=params, metrics={"result": "FAIL"}, note=outcome.problem), outcome
    save_log(settings, name, measured)
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    problem = f"exit status {measured.returncode}: {last_error_line(measured.stderr)}" if measured.returncode else ""
    if not problem:
        problem = images_problem([Path(p) for p in report["ours_images"]]) or images_problem(
            [Path(p) for p in report["diffusers_images"]])
    metrics: dict[str, Any] = {}
    if report:
        metrics = {"s_per_image": report["median_s"]["ours"], "diffusers_s_per_image": report["median_s"]["diffusers"],
                   "vs_diffusers": report["ratio"], "peak_rss_MiB": measured.peak_rss_mib, "wall_s": measured.wall_s}
        peaks = report.get("cuda_peak_allocated") or {}
        if peaks:
            metrics["peak_alloc_GiB"] = peaks["ours"] / GIB
            metrics["diffusers_alloc_GiB"] = peaks["diffusers"] / GIB
    if problem:
        metrics["result"] = "FAIL"
    outcome = Outcome(name, not problem, problem, measured, report)
    return Row(SUITE_ROWS, name, params=params, metrics=metrics, note=f"FAILED: {problem}" if problem else ""), outcome


# --- the whole run ----------------------------------------------------------------------
PARTS = ("checks", "lora", "fine_tune", "generation")


def make_settings(args: argparse.Namespace, cuda: bool) -> Settings:
    smoke = bool(args.cpu_smoke)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    return Settings(
        out_dir=Path(args.out_dir).resolve(), cuda=cuda, smoke=smoke,
        threads=args.threads or (1 if smoke else 4), jobs=args.jobs or (2 if smoke else 4),
        check_steps=args.check_steps or (2 if smoke else 3), row_steps=args.steps or (2 if smoke else 20),
        size=64 if smoke else 512, ft_batch=2 if smoke else 16,
        gen_steps=2 if smoke else 20, gen_images=1 if smoke else 3,
        model=Path(args.model).resolve() if args.model else None, peak_tflops=args.peak_tflops,
        time_budget_s=args.time_budget_s, timeout_s=args.timeout_s, parts=parts,
    )


def counted_flops(settings: Settings, model: Path) -> Optional[int]:
    """unet_training_flops of the fine-tune row, or None (logged) when the model cannot be read:
    the row's own run then reports what is wrong with it."""
    try:
        return unet_training_flops(model, settings.ft_batch, settings.size)
    except Exception as err:  # noqa: BLE001
        logger.warning("U-Net FLOPs not counted: %s: %s", type(err).__name__, err)
        return None


def run(settings: Settings, on_part_done: Optional[Callable[[list[Row]], None]] = None) -> tuple[list[Row], list[Outcome]]:
    """Every part asked for; (table rows, outcomes that decide the exit status). `on_part_done`
    gets the rows so far after each part (the JSON is rewritten then, so a run killed at a time
    limit still leaves what it measured)."""
    def done() -> None:
        if on_part_done is not None:
            on_part_done(list(rows))

    rows: list[Row] = []
    outcomes: list[Outcome] = []
    ws = build_workspace(settings)
    row_parts = [part for part in PARTS[1:] if part in settings.parts]
    with ThreadPoolExecutor(max_workers=max(1, settings.jobs)) as pool:
        # the full-size model is written while the (small) checks run
        model_future = pool.submit(full_model, settings) if row_parts else None
        if "checks" in settings.parts:
            for item in run_checks(settings, ws, pool):
                if isinstance(item, Outcome):
                    outcomes.append(item)
                    rows.append(item.row())
                else:
                    rows.append(item)
            done()
        try:
            model = model_future.result() if model_future is not None else None
        except Exception as err:  # noqa: BLE001 - no model, no rows; the checks above still count
            failed = Outcome("random SD 1.5 model", False, f"{type(err).__name__}: {err}", None, {})
            return [*rows, failed.row()], [*outcomes, failed]
    # the optional variants (fused AdamW, fp8 base, torch.compile: minutes of compiling) run after
    # every required row, so a slow one cannot push the targets' rows past the time limit
    optional: list[RowRun] = []

    def required_rows(plan: list[RowRun]) -> list[tuple[Row, Optional[Outcome]]]:
        optional.extend(run for run in plan if run.optional)
        return run_rows(settings, [run for run in plan if not run.optional])

    makers: dict[str, Callable[[], list[tuple[Row, Optional[Outcome]]]]] = {
        "lora": lambda: required_rows(lora_plan(settings, ws, model)),
        "fine_tune": lambda: required_rows(fine_tune_plan(settings, ws, model, counted_flops(settings, model))),
        "generation": lambda: [generation_row(settings, model)],
    }

    def add(results: list[tuple[Row, Optional[Outcome]]]) -> None:
        for row, outcome in results:
            rows.append(row)
            if outcome is not None:
                outcomes.append(outcome)
        done()

    for part in row_parts:
        add(makers[part]())
    if optional:
        add(run_rows(settings, optional))
    return rows, outcomes


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=str, default="gpu_check_output",
                        help="models, data, outputs, logs and reports go here (default: %(default)s)")
    parser.add_argument("--json", type=str, default=None, help="results file (default: <out_dir>/gpu_check.json)")
    parser.add_argument("--cpu_smoke", action="store_true",
                        help="the same code path on CPU: tiny / small models, 64 px, 1-2 steps, CUDA-only runs skipped")
    parser.add_argument("--parts", type=str, default=",".join(PARTS),
                        help=f"comma-separated, from: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--model", type=str, default=None,
                        help="SD 1.x / 2.x checkpoint for the rows (default: random-weight SD 1.5 built in --out_dir)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each row (default: 20; 2 with --cpu_smoke)")
    parser.add_argument("--check_steps", type=int, default=None, help="steps of each correctness run (default: 3; 2 with --cpu_smoke)")
    parser.add_argument("--jobs", type=int, default=None, help="correctness runs at once (default: 4; 1 with --cpu_smoke)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every child process (default: 4; 1 with --cpu_smoke)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: from the device name; 'unknown' if not listed)")
    parser.add_argument("--time_budget_s", type=float, default=420.0,
                        help="optional rows are skipped once this much time has passed (default: %(default)s)")
    parser.add_argument("--timeout_s", type=float, default=300.0, help="limit for any one child process (default: %(default)s)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = setup_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    unknown = [p for p in args.parts.split(",") if p.strip() and p.strip() not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part {unknown[0]!r} (known: {', '.join(PARTS)})")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        parser.error("no CUDA device: this check is for CUDA machines (use --cpu_smoke to run its code path on CPU)")
    settings = make_settings(args, cuda and not args.cpu_smoke)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    command = ("python3 benchmarks/gpu_check.py " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()
    json_path = Path(args.json) if args.json else settings.out_dir / "gpu_check.json"
    rows, outcomes = run(settings, lambda so_far: write_json(so_far, json_path, command + "  (partial)"))
    print(format_table(rows))
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        print(f"FAILED {outcome.name}: {outcome.problem}")
        if outcome.measured is not None and outcome.measured.stderr.strip():
            print("  " + "\n  ".join(outcome.measured.stderr.strip().splitlines()[-15:]))
    path = write_json(rows, json_path, command)
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} checks and rows passed in {settings.elapsed():.0f} s; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
