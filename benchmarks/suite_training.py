"""Suite `training`: LoRA, DreamBooth and fine-tuning steps on the SD 1.5 architecture (random weights).

Every row is one fresh process (`benchmarks/train_child.py` under `common.run_measured`) that
trains like a user's run and then times the floor in the same process. A row reports:
- `s_per_step`: median seconds per optimizer step over the steps after the first two;
- `floor_s`, `floor_ratio`: the bare forward + backward of the frozen U-Net and text encoder on
  the same batch (gradient to the inputs through every layer, no weight gradients) and
  s_per_step ÷ that; `unet_floor_s`, `unet_floor_ratio`: the same for the U-Net alone;
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


def measure(
    ctx: Context, name: str, script: str, train_argv: Sequence[str], floor: str, params: dict[str, Any],
    floor_steps: int, note: str = "",
) -> Row:
    """Run one row's child process and turn its report into a Row."""
    work = ctx.out_dir / SUITE / name
    report_path = work / "report.json"
    report_path.unlink(missing_ok=True)
    child = ["benchmarks/train_child.py", "--script", script, "--report", str(report_path),
             "--floor", floor, "--floor_steps", str(floor_steps), "--", *train_argv]
    logger.info("training row %s: %s", name, " ".join(train_argv))
    measured = run_measured(child, ctx).check(f"training row {name}")
    report = json.loads(report_path.read_text(encoding="utf-8"))
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
    if script != "train_network":
        floor_mib = (memory["unet_weights_mib"] + memory["text_encoder_weights_mib"]
                     + memory["gradients_mib"] + memory["optimizer_state_mib"])
        metrics["memory_floor_mib"] = floor_mib
        metrics["rss_over_floor"] = report["peak_rss_train_mib"] / floor_mib
    stages = report["stage_seconds"]
    for stage in ("startup", "loading", "caching", "setup", "loop", "save"):
        metrics[f"{stage}_s"] = stages.get(stage, 0.0)
    metrics["wall_s"] = measured.wall_s
    extra = {
        "steps": len(steps), "step_seconds": steps, "losses": report["losses"],
        "floor_step_seconds": report["floor_step_seconds"], "memory": memory,
        "peak_rss_process_mib": measured.peak_rss_mib, "argv": list(train_argv),
    }
    row = Row(SUITE, name, {**params, **extra}, metrics, note)
    bad = [key for key in ("s_per_step", "peak_rss_mib") if not _finite_positive(metrics[key])]
    if bad:
        raise RuntimeError(f"training row {name}: no valid {bad[0]} ({metrics[bad[0]]!r})")
    return row


def _remove_outputs(folder: Path) -> None:
    """Whole-model outputs are 4 GB each at full size: they are measured, not kept."""
    for path in folder.glob("model*"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def run(ctx: Context, only: Optional[Sequence[str]] = None) -> list[Row]:
    """Every row (or the rows named in `only`), in order."""
    steps = QUICK_STEPS if ctx.quick else ctx.steps
    full_steps = QUICK_STEPS if ctx.quick else min(FULL_MODEL_STEPS, ctx.steps)
    floor_steps = 2 if ctx.quick else 8
    root = ctx.out_dir / SUITE
    data = make_dataset(root)
    model = ctx.model_file()
    size = "small (quick)" if ctx.quick else "SD1.5 full size"
    lora_params = {"model": size, "batch": 1, "dim": 8, "precision": "fp32", "optimizer": "AdamW",
                   "attention": "sdpa", "cache_latents": True, "steps": steps}
    full_params = {"model": size, "resolution": 64, "batch": 1, "precision": "fp32", "optimizer": "SGDNesterov",
                   "attention": "sdpa", "cache_latents": True, "steps": full_steps}
    out = root / "out"
    plans: list[tuple[str, Any]] = [
        ("lora_single_file_64", lambda: measure(
            ctx, "lora_single_file_64", "train_network", lora_argv(model, data, out / "a", steps, 64), "unet_te",
            {**lora_params, "resolution": 64, "source": "single file"}, floor_steps)),
        ("lora_diffusers_64", lambda: measure(
            ctx, "lora_diffusers_64", "train_network", lora_argv(ctx.model_folder(), data, out / "b", steps, 64),
            "unet_te", {**lora_params, "resolution": 64, "source": "Diffusers folder"}, floor_steps)),
        ("lora_single_file_128", lambda: measure(
            ctx, "lora_single_file_128", "train_network", lora_argv(model, data, out / "c", steps, 128), "unet_te",
            {**lora_params, "resolution": 128, "source": "single file"}, floor_steps)),
        ("lora_gradient_checkpointing_64", lambda: measure(
            ctx, "lora_gradient_checkpointing_64", "train_network",
            lora_argv(model, data, out / "d", steps, 64, "--gradient_checkpointing"), "unet_te",
            {**lora_params, "resolution": 64, "source": "single file", "gradient_checkpointing": True}, floor_steps,
            note="floor without checkpointing")),
        ("lora_unet_only_64", lambda: measure(
            ctx, "lora_unet_only_64", "train_network",
            lora_argv(model, data, out / "e", steps, 64, "--network_train_unet_only"), "both",
            {**lora_params, "resolution": 64, "source": "single file", "network_train_unet_only": True,
             "text_encoder_outputs": "cached per caption (fixed captions)"}, floor_steps,
            note="TE outputs cached per caption by the core; no --cache_text_encoder_outputs flag")),
        ("train_db_full", lambda: measure(
            ctx, "train_db_full", "train_db",
            full_model_argv(model, out / "f", full_steps, "--train_data_dir", str(data.parent), "--caption_extension", ".txt"),
            "unet_te", {**full_params, "trains": "U-Net + text encoder"}, max(2, floor_steps // 2))),
        ("fine_tune_full", lambda: measure(
            ctx, "fine_tune_full", "fine_tune",
            full_model_argv(model, out / "g", full_steps, "--train_data_dir", str(data),
                            "--in_json", str(make_metadata(data, root / "meta.json"))),
            "unet", {**full_params, "trains": "U-Net"}, max(2, floor_steps // 2))),
    ]
    unknown = sorted(set(only or ()) - {name for name, _ in plans})
    if unknown:
        raise ValueError(f"unknown training rows: {unknown}")
    rows = []
    for name, plan in plans:
        if only and name not in only:
            continue
        rows.append(plan())
        _remove_outputs(out / "f")
        _remove_outputs(out / "g")
    return rows
