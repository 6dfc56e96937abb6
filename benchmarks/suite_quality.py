"""Suite `quality`: what the shipped tiny shapes model draws, and what the shapes demos teach it.

    python3 benchmarks/run.py --suites quality                # the figures of docs/tiny_model.md
    python3 benchmarks/run.py --suites quality --quick        # a few images, 2-step demo runs (tests)

Rows (figures in [0, 1], judged by `library.shape_scenes.judge_image`):
- `base <sampler>`: for every (shape, colour) pair, `prompts_per_pair` prompts (8 for the first
  sampler, 2 for the others; 1 in quick mode) written like the
  training captions (random background, position, size); the fraction of images whose colour,
  shape and both are as asked. `base <sampler> <shape|colour>` break the first sampler down.
- `lora demo` / `db demo` / `ti demo`: each demo config of examples/shapes_demo/ is trained as a
  user runs it (a child process), then held-out prompts ask for the new shape (a cross; for
  `ti demo` the square under its new word, judged among the base shapes: textual inversion
  cannot add a shape to a frozen U-Net);
  `new_before` and `new_after` are the fractions of images the judge reads as that shape (out of all five shapes)
  before and after training. Before: the base model (LoRA at multiplier 0 / the base model
  file / the embedding as initialised, i.e. the init word). `base_both_after` is the base-shape
  figure once the demo's result is applied (what the new shape cost the old ones).
Training times are wall times of the child processes (noisy on a shared machine).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.common import Context, Row, run_measured
from library import shape_demos
from library.samplers import SAMPLER_NAMES
from library.shape_quality import (
    SHIPPED_MODEL, GenModels, apply_lora, generate, judge_scenes, load_models, new_shape_prompts, pair_scenes,
    shape_fraction,
)  # fmt: skip
from library.shape_scenes import BASE_SHAPES, COLOURS, SHAPES, caption

logger = logging.getLogger(__name__)

SUITE = "quality"
GUIDANCE = 6.0
BASE_SEED = 5  # scenes of the base-model prompts (held out: the training data used seed 0)
DEMO_SEED = 7  # scenes of the new-shape prompts (the demo pictures used shape_demos.IMAGE_SEED)
DEMO_SAMPLER = "euler_a"


def _base_figures(models: GenModels, sampler: str, steps: int, per_pair: int):
    scenes = pair_scenes(per_pair, BASE_SEED)
    images = generate(models, [caption(s) for s in scenes], list(range(len(scenes))), sampler, steps, GUIDANCE)
    return scenes, images


def base_rows(ctx: Context, models: GenModels) -> list[Row]:
    # the demos' sampler first: it is the one broken down by shape and colour
    samplers = ["euler_a", "ddim"] if ctx.quick else [DEMO_SAMPLER] + [s for s in SAMPLER_NAMES if s != DEMO_SAMPLER]
    rows = []
    for index, sampler in enumerate(samplers):
        # the first sampler is the one broken down by shape and colour: more prompts for it
        per_pair = 1 if ctx.quick else (8 if index == 0 else 2)
        params = {"steps": ctx.steps, "scale": GUIDANCE, "prompts_per_pair": per_pair, "size": 64}
        scenes, images = _base_figures(models, sampler, ctx.steps, per_pair)
        rows.append(Row(SUITE, f"base {sampler}", {**params, "sampler": sampler}, judge_scenes(images, scenes).as_dict()))
        if index == 0:  # where the first sampler's errors are
            groups = {s: [sc.shape == s for sc in scenes] for s in BASE_SHAPES}
            groups.update({c: [sc.colour == c for sc in scenes] for c in COLOURS})
            for name, picked in groups.items():
                figures = judge_scenes([i for i, p in zip(images, picked) if p], [s for s, p in zip(scenes, picked) if p])
                rows.append(Row(SUITE, f"base {sampler} {name}", {**params, "sampler": sampler}, figures.as_dict()))
    return rows


def _train_demo(ctx: Context, script: str, config: str, name: str) -> tuple[Path, float]:
    """Run a demo config as a user would (its own process); returns its output folder and wall time."""
    out = ctx.out_dir / name
    argv = [script, "--config_file", f"examples/shapes_demo/{config}", "--output_dir", str(out)]
    if script != "train_textual_inversion.py":
        argv += ["--logging_dir", str(ctx.out_dir / "logs")]
    if ctx.quick:
        argv += ["--max_train_epochs", "0", "--max_train_steps", "2"]  # 0: the steps win over the epochs
    measured = run_measured(argv, ctx).check(f"{script} {config}")
    return out, measured.wall_s


def _new_shape_fraction(
    models: GenModels, prompts: list[str], seeds: list[int], steps: int,
    shape: str = shape_demos.NEW_SHAPE, shapes: Sequence[str] = SHAPES,
) -> float:
    """Fraction of the prompts' images the judge reads as `shape` (out of `shapes`)."""
    return shape_fraction(generate(models, prompts, seeds, DEMO_SAMPLER, steps, GUIDANCE), shape, shapes)


def _base_both(models: GenModels, steps: int) -> float:
    scenes, images = _base_figures(models, DEMO_SAMPLER, steps, 1)
    return judge_scenes(images, scenes).both


def demo_rows(ctx: Context) -> list[Row]:
    count = 4 if ctx.quick else 24
    params = {"prompts": count, "sampler": DEMO_SAMPLER, "steps": ctx.steps, "scale": GUIDANCE}
    rows = []

    # LoRA: before = multiplier 0 on the same hooked models (exactly the base model)
    out, seconds = _train_demo(ctx, "train_network.py", "lora.toml", "shapes_lora")
    models = load_models()
    prompts, seeds = new_shape_prompts(count, DEMO_SEED, shape_demos.LORA_WORD)
    network = apply_lora(models, out / "sks_cross.safetensors", 0.0)
    before = _new_shape_fraction(models, prompts, seeds, ctx.steps)
    network.set_multiplier(1.0)
    after = _new_shape_fraction(models, prompts, seeds, ctx.steps)
    metrics = {"new_before": before, "new_after": after, "base_both_after": _base_both(models, ctx.steps), "train_s": seconds}
    rows.append(Row(SUITE, "lora demo", params, metrics))
    network.restore()

    # DreamBooth: before = the base model, after = the trained model file
    out, seconds = _train_demo(ctx, "train_db.py", "db.toml", "shapes_db")
    trained = load_models(out / "sks_cross_db.safetensors")
    metrics = {
        "new_before": before,
        "new_after": _new_shape_fraction(trained, prompts, seeds, ctx.steps),
        "base_both_after": _base_both(trained, ctx.steps),
        "train_s": seconds,
    }
    rows.append(Row(SUITE, "db demo", params, metrics))

    # textual inversion: before = the embedding as initialised (the init word's vectors)
    from library import embedding_files

    out, seconds = _train_demo(ctx, "train_textual_inversion.py", "ti.toml", "shapes_ti")
    token = shape_demos.TI_TOKEN
    prompts, seeds = new_shape_prompts(count, DEMO_SEED, token, shape_demos.TI_SHAPE)
    init_prompts = [p.replace(token, shape_demos.TI_INIT_WORD) for p in prompts]
    # judged out of the base shapes: the TI shape is one of them
    before = _new_shape_fraction(models, init_prompts, seeds, ctx.steps, shape_demos.TI_SHAPE, BASE_SHAPES)
    embedding_files.load_embedding_into(models.tokenizer, models.text_encoder, out / f"{token}.safetensors")
    after = _new_shape_fraction(models, prompts, seeds, ctx.steps, shape_demos.TI_SHAPE, BASE_SHAPES)
    rows.append(Row(SUITE, "ti demo", params, {"new_before": before, "new_after": after, "train_s": seconds}))
    return rows


def run(ctx: Context) -> list[Row]:
    previous = torch.get_num_threads()
    torch.set_num_threads(ctx.threads)
    try:
        logger.info("judging %s", SHIPPED_MODEL)
        return base_rows(ctx, load_models()) + demo_rows(ctx)
    finally:
        torch.set_num_threads(previous)
