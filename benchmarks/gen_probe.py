"""Generation side by side: gen_img_diffusers.py's generator and diffusers.StableDiffusionPipeline.

    python3 benchmarks/gen_probe.py REPORT.json --ckpt model.safetensors --size 512 --steps 20 --fp16

One process, one copy of the weights: the toolkit's generator is loaded from the file as
`gen_img_diffusers.py` loads it (`library.gen_img.load_generator`), and the diffusers pipeline
is built from the very same U-Net, VAE, text encoder and tokenizer with the same DDIM scheduler,
so the two differ only in the code that runs the denoising loop. Each side makes one warm-up
image, then they take turns, image by image (prompt to PNG on disk, guidance scale 7.5, batch
1); the report holds every timing, the medians, their ratio and each side's CUDA peak memory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "a red circle on a blue background"
SCALE = 7.5


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(make_image: Callable[[], None]) -> tuple[float, Optional[int]]:
    """(seconds, CUDA peak allocated bytes or None) of one image."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _synchronize()
    start = time.perf_counter()
    make_image()
    _synchronize()
    return time.perf_counter() - start, (int(torch.cuda.max_memory_allocated()) if cuda else None)


def side_by_side(ckpt: str, outdir: Path, size: int, steps: int, images: int, precision: str) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionPipeline

    from library import gen_args, gen_img, samplers
    from library.gen_jobs import JobDefaults, SeedSource

    flags = ["--ckpt", ckpt, "--outdir", str(outdir / "ours"), "--W", str(size), "--H", str(size),
             "--steps", str(steps), "--sampler", "ddim", "--scale", str(SCALE), "--sdpa", "--seed", "1",
             "--prompt", PROMPT]
    if precision in ("fp16", "bf16"):
        flags.append(f"--{precision}")
    args = gen_args.parse_args(flags)
    generator = gen_img.load_generator(args, [(size, size)])  # as gen_img_diffusers.py maps for this size
    defaults = JobDefaults(
        width=args.W, height=args.H, steps=args.steps, scale=args.scale, sampler=args.sampler,
        negative_scale=args.negative_scale, strength=args.strength, images_per_prompt=1,
    )
    seeds = SeedSource(args.seed, args.iter_same_seed)
    sources = gen_img.ImageSources([], [], [])

    models = generator.models
    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=samplers.get_sampler("ddim"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs_dir = outdir / "diffusers"
    theirs_dir.mkdir(parents=True, exist_ok=True)
    device = models.device
    counter = [0]

    def ours() -> None:
        seeds.start_iteration()
        generator.run_lines([PROMPT], seeds, defaults, sources)

    def theirs() -> None:
        counter[0] += 1
        result = pipe(
            PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=SCALE,
            generator=torch.Generator(device=device).manual_seed(counter[0]),
        )
        result.images[0].save(theirs_dir / f"{counter[0]:04d}.png")

    with torch.no_grad():
        _timed(ours)  # warm-up: kernels chosen, caches filled
        _timed(theirs)
        timings: dict[str, list[float]] = {"ours": [], "diffusers": []}
        peaks: dict[str, list[int]] = {"ours": [], "diffusers": []}
        for _ in range(images):
            for name, make in (("ours", ours), ("diffusers", theirs)):
                seconds, peak = _timed(make)
                timings[name].append(seconds)
                if peak is not None:
                    peaks[name].append(peak)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "size": size, "steps": steps, "images": images, "precision": precision, "device": str(device),
        "timings": timings, "median_s": medians, "ratio": medians["ours"] / medians["diffusers"],
        "cuda_peak_allocated": {name: max(values) for name, values in peaks.items() if values},
        "ours_images": [str(p) for p in generator.written],
        "diffusers_images": [str(p) for p in sorted(theirs_dir.glob("*.png"))],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=str, help="JSON report to write")
    parser.add_argument("--ckpt", type=str, required=True, help="SD 1.x / 2.x model (any format the generator loads)")
    parser.add_argument("--outdir", type=str, required=True, help="the images of both sides go here")
    parser.add_argument("--size", type=int, default=512, help="width and height (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: %(default)s)")
    parser.add_argument("--images", type=int, default=3, help="timed images per side after the warm-up (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16", help="model dtype (default: %(default)s)")
    args = parser.parse_args(argv)
    from library.cli import setup_logging
    from library.io_util import write_text_atomic

    setup_logging()
    report = side_by_side(args.ckpt, Path(args.outdir), args.size, args.steps, args.images, args.precision)
    write_text_atomic(Path(args.report), json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
