"""Suite `training`: LoRA, DreamBooth and fine-tuning steps on the SD 1.5 architecture (random weights).

Every row is one fresh process (`benchmarks/train_child.py` under `common.run_measured`) that
trains like a user's run and then times the floor in the same process. A row reports:
- `s_per_step`: median seconds per optimizer step over the steps after the first two;
- `floor_s`, `floor_ratio`: the bare forward + backward of the frozen U-Net and text encoder on
  the same batch (gradient to the inputs through every layer, no weight gradients) and
  s_per_step ÷ that; `unet_floor_s`, `unet_floor_ratio`: the same for the U-Net alone (the
  only floor of the `--network_train_unet_only` row, whose run frees the text encoder);
- `peak_rss_mib`: the training's peak resident set (VmHWM, read before the floor runs; no
  memory sampler thread slows the steps);
- for the whole-model trainers, `memory_floor_mib` = weights of the U-Net and text encoder +
  gradients of what trains + the optimizer state (as held by the optimizer after the run), and
  `rss_over_floor` = peak_rss_mib ÷ memory_floor_mib (issue 7: at most 1.10);
- the wall split `startup_s` (process start to model loading: imports, flags, dataset scan),
  `loading_s`, `caching_s`, `setup_s` (network, optimizer, accelerate), `loop_s`, `save_s`, and
  `wall_s` of the whole process (the floor included).

Full size: the LoRA bench flags of shared BASELINE.md (64 px, batch 1, dim 8, fp32, AdamW,
--cache_latents, SDPA, `--steps` steps); the whole-model rows use SGDNesterov and a few steps.
`--quick`: the same rows on the small model, 3 steps.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.common import Context, Row, median_after_warmup, run_measured

logger = logging.getLogger(__name__)

SUITE = "training"
CAPTIONS = (
    "sks dog, red, sitting", "sks dog, blue, running", "sks dog, green, lying", "sks dog, yellow, standing",
    "sks dog, white, jumping", "sks dog, black, sleeping", "sks dog, brown, playing", "sks dog, grey, waiting",
)
FULL_MODEL_STEPS = 5  # whole-model rows: a step is 3-4x a LoRA step; 5 leaves 3 after warm-up
QUICK_STEPS = 3
WARMUP_STEPS = 2  # steps 1-2 are left out of the median (BASELINE: median over steps >= 3)


def make_dataset(root: Path) -> Path:
    """BASELINE's data: 8 PNGs (64x64 and 96x64) with .txt captions in `<root>/img/10_sks dog`."""
    import numpy as np
    from PIL import Image

    folder = root / "img" / "10_sks dog"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(CAPTIONS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    for index, caption in enumerate(CAPTIONS):
        width = 64 if index < 4 else 96
        pixels = rng.integers(0, 256, size=(64, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(caption, encoding="utf-8")
    return folder


def make_metadata(folder: Path, target: Path) -> Path:
    """fine_tune.py's metadata JSON (stem keys, captions only) for the images of `folder`."""
    from library.io_util import write_text_atomic

    metadata = {
        image.stem: {"caption": image.with_suffix(".txt").read_text(encoding="utf-8").strip()}
        for image in sorted(folder.glob("*.png"))
    }
    write_text_atomic(target, json.dumps(metadata, indent=2) + "\n")
    return target


def lora_argv(model: Path, data: Path, out: Path, steps: int, resolution: int, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data.parent),
        "--caption_extension", ".txt", "--resolution", str(resolution),
        "--output_dir", str(out), "--output_name", "lora",
        "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8",
        "--learning_rate", "1e-4", "--optimizer_type", "AdamW", "--train_batch_size", "1",
        "--max_train_steps", str(steps), "--seed", "42", "--mixed_precision", "no",
        "--cache_latents", "--sdpa", "--max_data_loader_n_workers", "0",
        *extra,
    ]


def full_model_argv(model: Path, out: Path, steps: int, *data_flags: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), *data_flags,
        "--resolution", "64", "--output_dir", str(out), "--output_name", "model",
        "--save_model_as", "safetensors",
        "--learning_rate", "1e-6", "--optimizer_type", "SGDNesterov", "--train_batch_size", "1",
        "--max_train_steps", str(steps), "--seed", "42", "--mixed_precision", "no",
        "--cache_latents", "--sdpa", "--max_data_loader_n_workers", "0",
    ]


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass
class RowPlan:
    """One row: which script runs with which flags, which floor follows, what the row says."""

    name: str
    script: str
    argv: list[str]
    floor: str
    floor_steps: int
    params: dict[str, Any]
    note: str = ""

    def report_path(self, ctx: Context) -> Path:
        return ctx.out_dir / SUITE / self.name / "report.json"

    def child_argv(self, ctx: Context) -> list[str]:
        return ["benchmarks/train_child.py", "--script", self.script, "--report", str(self.report_path(ctx)),
                "--floor", self.floor, "--floor_steps", str(self.floor_steps), "--", *self.argv]


def to_row(plan: RowPlan, report: dict[str, Any], wall_s: float) -> Row:
    """A row's child report as a Row (metrics as the module docstring lists them)."""
    steps = report["step_seconds"]
    s_per_step = median_after_warmup(steps, WARMUP_STEPS)
    metrics: dict[str, Any] = {"s_per_step": s_per_step}
    floors = report["floor_median_s"]
    if "unet_te" in floors:
        metrics["floor_s"] = floors["unet_te"]
        metrics["floor_ratio"] = s_per_step / floors["unet_te"]
    if "unet" in floors:
        metrics["unet_floor_s"] = floors["unet"]
        metrics["unet_floor_ratio"] = s_per_step / floors["unet"]
    metrics["peak_rss_mib"] = report["peak_rss_train_mib"]
    memory = report["memory"]
    if plan.script != "train_network":
        floor_mib = (memory["unet_weights_mib"] + memory["text_encoder_weights_mib"]
                     + memory["gradients_mib"] + memory["optimizer_state_mib"])
        metrics["memory_floor_mib"] = floor_mib
        metrics["rss_over_floor"] = report["peak_rss_train_mib"] / floor_mib
    stages = report["stage_seconds"]
    for stage in ("startup", "loading", "caching", "setup", "loop", "save"):
        metrics[f"{stage}_s"] = stages.get(stage, 0.0)
    metrics["wall_s"] = wall_s
    extra = {
        "steps": len(steps), "step_seconds": steps, "losses": report["losses"],
        "floor_step_seconds": report["floor_step_seconds"], "memory": memory,
        "peak_rss_process_mib": report.get("peak_rss_exit_mib"), "rss_trace": report.get("rss_trace"),
        "argv": list(plan.argv),
    }
    bad = [key for key in ("s_per_step", "peak_rss_mib") if not _finite_positive(metrics[key])]
    if bad:
        raise RuntimeError(f"training row {plan.name}: no valid {bad[0]} ({metrics[bad[0]]!r})")
    return Row(SUITE, plan.name, {**plan.params, **extra}, metrics, plan.note)


def _read_report(plan: RowPlan, ctx: Context) -> dict[str, Any]:
    return json.loads(plan.report_path(ctx).read_text(encoding="utf-8"))


def measure(ctx: Context, plan: RowPlan) -> Row:
    """One row in its own fresh process (start-up, imports and peak RSS as a user's run has them)."""
    plan.report_path(ctx).parent.mkdir(parents=True, exist_ok=True)
    plan.report_path(ctx).unlink(missing_ok=True)
    logger.info("training row %s: %s", plan.name, " ".join(plan.argv))
    measured = run_measured(plan.child_argv(ctx), ctx).check(f"training row {plan.name}")
    return to_row(plan, _read_report(plan, ctx), measured.wall_s)


def measure_forked(ctx: Context, plans: Sequence[RowPlan]) -> list[Row]:
    """All rows from one process that imports once and forks a process per row (--quick)."""
    from library.io_util import write_text_atomic

    specs = []
    for plan in plans:
        plan.report_path(ctx).parent.mkdir(parents=True, exist_ok=True)
        plan.report_path(ctx).unlink(missing_ok=True)
        specs.append({"name": plan.name, "script": plan.script, "report": str(plan.report_path(ctx)),
                      "floor": plan.floor, "floor_steps": plan.floor_steps, "argv": plan.argv})
    plan_file = ctx.out_dir / SUITE / "plan.json"
    write_text_atomic(plan_file, json.dumps(specs, indent=2) + "\n")
    run_measured(["benchmarks/train_child.py", "--plan", str(plan_file)], ctx).check("training rows (forked)")
    rows = []
    for plan in plans:
        report = _read_report(plan, ctx)
        rows.append(to_row(plan, report, report["wall_s"]))
    return rows


def _remove_outputs(folder: Path) -> None:
    """Whole-model outputs are 4 GB each at full size: they are measured, not kept."""
    for path in folder.glob("model*"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def row_plans(ctx: Context) -> list[RowPlan]:
    """The suite's rows, in order (models and data are made here)."""
    steps = QUICK_STEPS if ctx.quick else ctx.steps
    full_steps = QUICK_STEPS if ctx.quick else min(FULL_MODEL_STEPS, ctx.steps)
    floor_steps = 2 if ctx.quick else 8
    full_floor_steps = 2 if ctx.quick else 4
    root = ctx.out_dir / SUITE
    data = make_dataset(root)
    model = ctx.model_file()
    folder = ctx.model_folder()
    size = "small (quick)" if ctx.quick else "SD1.5 full size"
    lora = {"model": size, "batch": 1, "dim": 8, "precision": "fp32", "optimizer": "AdamW",
            "attention": "sdpa", "cache_latents": True, "workers": 0, "steps": steps}
    full = {"model": size, "resolution": 64, "batch": 1, "precision": "fp32", "optimizer": "SGDNesterov",
            "attention": "sdpa", "cache_latents": True, "workers": 0, "steps": full_steps}
    out = root / "out"
    dreambooth_data = ("--train_data_dir", str(data.parent), "--caption_extension", ".txt")
    metadata = make_metadata(data, root / "meta.json")
    return [
        RowPlan("lora_single_file_64", "train_network", lora_argv(model, data, out / "a", steps, 64), "unet_te",
                floor_steps, {**lora, "resolution": 64, "source": "single file"}),
        RowPlan("lora_diffusers_64", "train_network", lora_argv(folder, data, out / "b", steps, 64), "unet_te",
                floor_steps, {**lora, "resolution": 64, "source": "Diffusers folder"}),
        RowPlan("lora_single_file_128", "train_network", lora_argv(model, data, out / "c", steps, 128), "unet_te",
                floor_steps, {**lora, "resolution": 128, "source": "single file"}),
        RowPlan("lora_gradient_checkpointing_64", "train_network",
                lora_argv(model, data, out / "d", steps, 64, "--gradient_checkpointing"), "unet_te", floor_steps,
                {**lora, "resolution": 64, "source": "single file", "gradient_checkpointing": True},
                note="floor without checkpointing"),
        RowPlan("lora_unet_only_64", "train_network",
                lora_argv(model, data, out / "e", steps, 64, "--network_train_unet_only"), "unet", floor_steps,
                {**lora, "resolution": 64, "source": "single file", "network_train_unet_only": True,
                 "text_encoder_outputs": "cached per caption (fixed captions)"},
                note="TE outputs cached per caption by the core, then the TE is freed (so no U-Net + TE floor); "
                "there is no --cache_text_encoder_outputs flag"),
        RowPlan("train_db_full", "train_db", full_model_argv(model, out / "f", full_steps, *dreambooth_data),
                "unet_te", full_floor_steps, {**full, "trains": "U-Net + text encoder"}),
        RowPlan("fine_tune_full", "fine_tune",
                full_model_argv(model, out / "g", full_steps, "--train_data_dir", str(data), "--in_json", str(metadata)),
                "unet", full_floor_steps, {**full, "trains": "U-Net"}),
    ]


def run(ctx: Context, only: Optional[Sequence[str]] = None) -> list[Row]:
    """Every row (or the rows named in `only`), in order; --quick forks them from one process."""
    plans = row_plans(ctx)
    unknown = sorted(set(only or ()) - {plan.name for plan in plans})
    if unknown:
        raise ValueError(f"unknown training rows: {unknown}")
    plans = [plan for plan in plans if not only or plan.name in only]
    out = ctx.out_dir / SUITE / "out"
    if ctx.quick:
        rows = measure_forked(ctx, plans)
    else:
        rows = []
        for plan in plans:
            rows.append(measure(ctx, plan))
            _remove_outputs(out / "f")  # a whole model is 4 GB at full size
            _remove_outputs(out / "g")
    _remove_outputs(out / "f")
    _remove_outputs(out / "g")
    return rows
