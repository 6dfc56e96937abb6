"""Generation rows: `gen_img_diffusers.py` side by side with diffusers' `StableDiffusionPipeline`,
the script's peak RSS with and without a LoRA, and the peak memory of a large VAE decode with
and without `--vae_slices`.

    python3 benchmarks/run.py --suites generation --out_dir /work/bench_models

Full size: the random-weight SD 1.5 single file (and its Diffusers folder for diffusers), 64×64,
10 DDIM steps, CFG 7.5, batch 1, fp32, on CPU. Three kinds of rows:

- `side by side <phase>`: one process loads our generator (from the single file) and diffusers'
  pipeline (from the Diffusers folder of the same weights) and alternates them image by image
  (who goes first swaps every round), so machine load hits both alike. Phases, in this order on
  the one loaded model: no LoRA, a LoRA hooked, `--network_pre_calc`, `--network_merge` (each
  loaded by `library.gen_networks.load_networks`, the script's own code; diffusers always runs
  without a LoRA). s/image is the median over the rounds; one image each is generated first as
  warm-up and compared pixel by pixel (the two must give the same picture).
- `gen_img_diffusers.py <phase>` / `diffusers pipeline`: the script as a user runs it (one image),
  each in its own process: peak RSS and wall time. The target is 0.6 × sd-scripts' 8,632 MiB.
- `decode <size>² slices <n>`: only the VAE loaded, one latent of `<size>/8` decoded through the
  generator's `decode_latents` after `set_vae_slices` (what `--vae_slices` does), each in its own
  process: peak RSS and the part of it above the loaded state.

This file is also the child process of those rows (`python3 benchmarks/suite_generation.py
side_by_side|diffusers|decode ...`, results as JSON).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Context, Row, proc_status_mib, reset_peak_rss, run_measured, write_random_lora  # noqa: E402

# children never look for the hub (diffusers / transformers would otherwise try, and wait, when offline)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def offline_env(ctx: Context) -> dict[str, str]:
    return ctx.child_env(**OFFLINE)

SUITE = "generation"
PROMPT = "a photo of a cat sitting on a sofa, highly detailed"
SD_SCRIPTS_GEN_PEAK_MIB = 8632  # ../shared/BASELINE.md: sd-scripts' generator, 64×64, single file, with LoRA
RSS_TARGET_SHARE = 0.6
PHASES = ("none", "lora", "pre_calc", "merge")  # pre_calc and merge last: they change the loaded weights
PHASE_FLAGS = {"none": [], "lora": [], "pre_calc": ["--network_pre_calc"], "merge": ["--network_merge"]}
FULL = {"size": 64, "steps": 10, "rounds": 4, "script_phases": PHASES, "diffusers_rss": True,
        "decode_size": 512, "decode_slices": (None, 4)}
# quick (tests): every code path once, in as few processes as possible (each start imports torch + diffusers)
QUICK = {"size": 64, "steps": 2, "rounds": 2, "script_phases": ("lora",), "diffusers_rss": False,
         "decode_size": 128, "decode_slices": (4,)}


def gen_flags(ckpt: Path, outdir: Path, size: int, steps: int, phase: str = "none", lora: Optional[Path] = None) -> list[str]:
    """The gen_img_diffusers.py flags of one configuration (the same for the script rows and side by side)."""
    flags = [
        "--ckpt", str(ckpt), "--outdir", str(outdir), "--W", str(size), "--H", str(size), "--steps", str(steps),
        "--scale", "7.5", "--sampler", "ddim", "--batch_size", "1", "--images_per_prompt", "1", "--seed", "1",
        "--prompt", PROMPT,
    ]
    if phase != "none":
        flags += ["--network_module", "networks.lora", "--network_weights", str(lora), *PHASE_FLAGS[phase]]
    return flags


def run(ctx: Context) -> list[Row]:
    cfg = QUICK if ctx.quick else FULL
    out = ctx.out_dir / SUITE
    out.mkdir(parents=True, exist_ok=True)
    ckpt, folder = ctx.model_file(), ctx.model_folder()
    lora = write_random_lora(ckpt, out / f"lora_d8{'_quick' if ctx.quick else ''}.safetensors", dim=8, alpha=8.0)
    params = {"size": cfg["size"], "steps": cfg["steps"], "scale": 7.5, "sampler": "ddim", "dtype": "fp32",
              "model": ckpt.name, "threads": ctx.threads}
    rows = side_by_side_rows(ctx, cfg, ckpt, folder, lora, out, params)
    rows += script_rows(ctx, cfg, ckpt, folder, lora, out, params)
    rows += decode_rows(ctx, cfg, ckpt, out)
    return rows


def run_child_json(ctx: Context, script: str, mode: str, argv: Sequence[str], result: Path) -> tuple[dict[str, Any], Any]:
    """Run a suite file as its own measured child (`script mode argv --json result`): (its JSON, Measured)."""
    result.unlink(missing_ok=True)
    measured = run_measured([script, mode, *argv, "--json", str(result)], ctx, offline_env(ctx))
    measured.check(f"{script} {mode}")
    return json.loads(result.read_text(encoding="utf-8")), measured


def _child(ctx: Context, mode: str, argv: Sequence[str], result: Path) -> tuple[dict[str, Any], Any]:
    return run_child_json(ctx, "benchmarks/suite_generation.py", mode, argv, result)


def side_by_side_rows(ctx: Context, cfg: dict, ckpt: Path, folder: Path, lora: Path, out: Path, params: dict) -> list[Row]:
    data, measured = _child(ctx, "side_by_side", [
        "--ckpt", str(ckpt), "--diffusers", str(folder), "--lora", str(lora), "--outdir", str(out / "side_by_side"),
        "--size", str(cfg["size"]), "--steps", str(cfg["steps"]), "--rounds", str(cfg["rounds"]),
    ], out / "side_by_side.json")
    rows = []
    for phase in PHASES:
        times = data["phases"][phase]
        ours, theirs = statistics.median(times["ours"]), statistics.median(times["diffusers"])
        metrics = {"s_per_image": ours, "diffusers_s_per_image": theirs, "ratio_vs_diffusers": ours / theirs}
        if phase == "none":
            metrics["max_pixel_diff"] = data["max_pixel_diff"]
        rows.append(Row(SUITE, f"side by side, {phase}", {**params, "rounds": cfg["rounds"], "phase": phase}, metrics,
                        note="ours/diffusers alternated image by image in one process; diffusers without LoRA"))
    rows[0].metrics["load_s"] = data["ours_load_s"]
    rows[0].metrics["diffusers_load_s"] = data["diffusers_load_s"]
    return rows


def script_rows(ctx: Context, cfg: dict, ckpt: Path, folder: Path, lora: Path, out: Path, params: dict) -> list[Row]:
    rows = []
    target = RSS_TARGET_SHARE * SD_SCRIPTS_GEN_PEAK_MIB
    for phase in cfg["script_phases"]:
        argv = gen_flags(ckpt, out / f"script_{phase}", cfg["size"], cfg["steps"], phase, lora)
        measured = run_measured(["gen_img_diffusers.py", *argv], ctx, offline_env(ctx))
        measured.check(f"gen_img_diffusers.py ({phase})")
        rows.append(Row(SUITE, f"gen_img_diffusers.py, {phase}", {**params, "phase": phase}, {
            "peak_rss_mib": measured.peak_rss_mib, "wall_s": measured.wall_s,
            "rss_vs_sd_scripts": measured.peak_rss_mib / SD_SCRIPTS_GEN_PEAK_MIB, "rss_target_mib": target,
        }, note="one image, own process; sd-scripts 8,632 MiB (BASELINE.md)"))
    if not cfg["diffusers_rss"]:
        return rows
    data, measured = _child(ctx, "diffusers", [
        "--diffusers", str(folder), "--outdir", str(out / "diffusers"), "--size", str(cfg["size"]),
        "--steps", str(cfg["steps"]),
    ], out / "diffusers.json")
    rows.append(Row(SUITE, "diffusers pipeline", {**params, "model": folder.name}, {
        "peak_rss_mib": measured.peak_rss_mib, "wall_s": measured.wall_s, "load_s": data["load_s"],
    }, note="StableDiffusionPipeline.from_pretrained + one image, own process"))
    return rows


def decode_rows(ctx: Context, cfg: dict, ckpt: Path, out: Path) -> list[Row]:
    rows = []
    size = cfg["decode_size"]
    for slices in cfg["decode_slices"]:
        argv = ["--ckpt", str(ckpt), "--size", str(size)] + ([] if slices is None else ["--vae_slices", str(slices)])
        data, measured = _child(ctx, "decode", argv, out / "decode.json")
        rows.append(Row(SUITE, f"decode {size}², slices {slices or 'off'}", {"size": size, "vae_slices": slices}, {
            "peak_rss_mib": measured.peak_rss_mib, "decode_extra_mib": data["decode_extra_mib"],
            "decode_s": data["decode_s"],
        }, note="VAE only; decode_extra = peak during the decode minus RSS before it"))
    return rows


# -- the child processes -------------------------------------------------------------------------


def _load_diffusers(folder: str):
    import torch
    from diffusers import StableDiffusionPipeline

    from library.samplers import get_sampler

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, local_files_only=True,
    )
    pipe.scheduler = get_sampler("ddim")  # the very scheduler our side builds for "ddim"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_image(pipe, size: int, steps: int, seed: int, target: Path):
    import torch

    image = pipe(
        PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    image.save(target)
    return image


def _ours_image(generator, args: argparse.Namespace, seed: int) -> Path:
    from library import gen_img
    from library.gen_jobs import JobDefaults, SeedSource

    defaults = JobDefaults(
        width=args.W, height=args.H, steps=args.steps, scale=args.scale, sampler=args.sampler,
        negative_scale=args.negative_scale, strength=args.strength, images_per_prompt=1,
    )
    generator.run_lines([args.prompt], SeedSource(seed, False), defaults, gen_img.ImageSources([], [], []))
    return generator.written[-1]


def _enter_phase(generator, argv: list[str]) -> None:
    """Load the phase's networks onto the loaded model, as load_generator does for these flags."""
    import torch

    from library import gen_args, gen_networks

    args = gen_args.parse_args(argv)
    models = generator.models
    generator.networks = gen_networks.load_networks(
        args, models.text_encoder, models.unet, models.vae, torch.float32, torch.device("cpu")
    )


def _leave_phase(phase: str, generator) -> None:
    for loaded in generator.networks:
        network = loaded.network
        if phase == "lora":
            network.restore()
        # pre_calc and merge wrote into the weights in place (nothing to undo for timing: the
        # next phases cost the same on changed weights)
    generator.networks = []


def child_side_by_side(opts: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from library import gen_args, gen_img

    outdir = Path(opts.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    flags = gen_flags(Path(opts.ckpt), outdir, opts.size, opts.steps)
    # the weights mapped as gen_img_diffusers.py maps them for this size
    generator = gen_img.load_generator(gen_args.parse_args(flags), [(opts.size, opts.size)])
    ours_load = time.perf_counter() - started
    started = time.perf_counter()
    pipe = _load_diffusers(opts.diffusers)
    diffusers_load = time.perf_counter() - started
    args = generator.args

    # warm-up, and the check that both sides make the same picture
    ours_png = _ours_image(generator, args, 1)
    theirs = _diffusers_image(pipe, opts.size, opts.steps, 1, outdir / "diffusers_warmup.png")
    with Image.open(ours_png) as image:
        mine = np.asarray(image.convert("RGB"), dtype=np.float32)
    pixel_diff = float(np.abs(mine - np.asarray(theirs, dtype=np.float32)).max() / 255.0)

    def ours_fn(seed: int) -> None:
        _ours_image(generator, args, seed)

    def diffusers_fn(seed: int) -> None:
        _diffusers_image(pipe, opts.size, opts.steps, seed, outdir / f"diffusers_{seed}.png")

    phases: dict[str, dict[str, list[float]]] = {}
    for phase in PHASES:
        if phase != "none":
            _enter_phase(generator, gen_flags(Path(opts.ckpt), outdir, opts.size, opts.steps, phase, Path(opts.lora)))
        times: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for index in range(opts.rounds):
            order = [("ours", ours_fn), ("diffusers", diffusers_fn)]
            for name, fn in order if index % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                fn(100 + index)
                times[name].append(time.perf_counter() - started)
        phases[phase] = times
        _leave_phase(phase, generator)
    return {"ours_load_s": ours_load, "diffusers_load_s": diffusers_load, "max_pixel_diff": pixel_diff, "phases": phases}


def child_diffusers(opts: argparse.Namespace) -> dict[str, Any]:
    outdir = Path(opts.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = _load_diffusers(opts.diffusers)
    load = time.perf_counter() - started
    started = time.perf_counter()
    _diffusers_image(pipe, opts.size, opts.steps, 1, outdir / "diffusers.png")
    return {"load_s": load, "image_s": time.perf_counter() - started}


def child_decode(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    from library.gen_pipeline import GenModels, decode_latents
    from library.model_util import load_vae
    from library.slicing_vae import set_vae_slices

    vae = load_vae(opts.ckpt).requires_grad_(False)
    set_vae_slices(vae, opts.vae_slices)  # as load_generator does for --vae_slices
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(1, vae.config.latent_channels, opts.size // factor, opts.size // factor,
                          generator=torch.Generator().manual_seed(0)) * vae.config.scaling_factor
    models = GenModels(None, vae, None, None)
    before = proc_status_mib("VmRSS")
    reset = reset_peak_rss()
    started = time.perf_counter()
    images = decode_latents(models, latents)
    decode_s = time.perf_counter() - started
    peak = proc_status_mib("VmHWM")
    if images[0].size != (opts.size, opts.size):
        raise RuntimeError(f"decoded {images[0].size}, expected {opts.size}²")
    # without the reset, VmHWM may still hold the loading peak: then only an upper bound
    return {"decode_s": decode_s, "rss_before_mib": before, "decode_extra_mib": peak - before,
            "peak_reset": reset}


def child_main(argv: Optional[Sequence[str]] = None) -> int:
    from library.io_util import write_text_atomic

    parser = argparse.ArgumentParser(description="generation benchmark child process")
    parser.add_argument("mode", choices=["side_by_side", "diffusers", "decode"])
    parser.add_argument("--ckpt", type=str, default=None)
    parser.add_argument("--diffusers", type=str, default=None)
    parser.add_argument("--lora", type=str, default=None)
    parser.add_argument("--outdir", type=str, default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vae_slices", type=int, default=None)
    parser.add_argument("--json", type=str, required=True)
    opts = parser.parse_args(argv)
    work = {"side_by_side": child_side_by_side, "diffusers": child_diffusers, "decode": child_decode}[opts.mode]
    write_text_atomic(Path(opts.json), json.dumps(work(opts)))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
