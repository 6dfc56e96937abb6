"""Latent-caching rows: images/s through the VAE on the trainer's caching path, and the time to
re-check an existing disk cache.

    python3 benchmarks/run.py --suites latents --out_dir /work/bench_models

- `cache <size>², vae_batch_size <b>`: a DreamBooth folder of procedural PNGs (library/shape_scenes)
  goes through what `train_network.py --cache_latents --vae_batch_size b` runs: its flags parsed by
  its own parser, `config_util.build_dataset_group`, then `DatasetGroup.cache_latents` (image
  loading and bucket resize, VAE encode, posterior sample). Own process per batch size, with only
  the VAE loaded (the trainer's caching step uses nothing else). One image is encoded first as
  warm-up; images/s = images ÷ caching seconds. `image_load_share` is the part of those seconds
  spent loading and resizing images (what loading in a background thread can hide).
- `re-check <n> npz`: a folder of n small images whose `.npz` caches already exist; the trainer's
  `--cache_latents_to_disk` path is run again on a freshly built dataset and must encode nothing
  (every file is opened and its shape and date checked). One image is then made newer than its
  cache and exactly that one must be re-encoded. This part uses the small (quick) model's VAE at
  64×64: it measures the check, not the VAE.

This file is also the child process of those rows (`python3 benchmarks/suite_latents.py
cache|recheck ...`, results as JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Context, Row, write_random_sd_model  # noqa: E402
from benchmarks.suite_generation import run_child_json  # noqa: E402

SUITE = "latents"
# full: one process per batch size (own peak RSS); quick (tests): both in one process
FULL = {"size": 512, "images": 8, "batch_sizes": (1, 8), "process_per_batch_size": True, "check_files": 1000,
        "check_size": 64}
QUICK = {"size": 64, "images": 4, "batch_sizes": (1, 4), "process_per_batch_size": False, "check_files": 40,
         "check_size": 64}


def image_folder(root: Path, count: int, size: int) -> Path:
    """`root/1_bench` with `count` size² PNGs and captions (made once; a complete folder is kept)."""
    from library.shape_scenes import make_scenes, write_scene_folder

    folder = root / "1_bench"
    if len(list(folder.glob("*.png"))) != count:
        write_scene_folder(folder, make_scenes(count, seed=7), size=size)
    return root


def run(ctx: Context) -> list[Row]:
    cfg = QUICK if ctx.quick else FULL
    out = ctx.out_dir / SUITE
    ckpt = ctx.model_file()
    rows = []
    data_root = image_folder(out / f"images_{cfg['size']}_{cfg['images']}", cfg["images"], cfg["size"])
    groups = [[b] for b in cfg["batch_sizes"]] if cfg["process_per_batch_size"] else [list(cfg["batch_sizes"])]
    for batch_sizes in groups:
        data, measured = _child(ctx, "cache", [
            "--model", str(ckpt), "--train_data_dir", str(data_root), "--size", str(cfg["size"]),
            "--vae_batch_sizes", ",".join(str(b) for b in batch_sizes),
        ], out / "cache.json")
        for batch_size in batch_sizes:
            result = data[str(batch_size)]
            rows.append(Row(SUITE, f"cache {cfg['size']}², vae_batch_size {batch_size}", {
                "size": cfg["size"], "images": cfg["images"], "vae_batch_size": batch_size, "model": ckpt.name,
                "threads": ctx.threads,
            }, {
                "images_per_s": result["images_per_s"], "s_per_image": 1 / result["images_per_s"],
                "caching_s": result["caching_s"], "image_load_share": result["image_load_share"],
                "peak_rss_mib": measured.peak_rss_mib,
            }, note="DatasetGroup.cache_latents (in memory), VAE only loaded"))

    # the check of an existing cache: a small VAE, many files
    small = ckpt if ctx.quick else write_random_sd_model(ctx.out_dir / "sd15_random_quick.safetensors", quick=True)
    check_root = image_folder(out / f"check_{cfg['check_size']}_{cfg['check_files']}", cfg["check_files"], cfg["check_size"])
    data, measured = _child(ctx, "recheck", [
        "--model", str(small), "--train_data_dir", str(check_root), "--size", str(cfg["check_size"]),
    ], out / "recheck.json")
    rows.append(Row(SUITE, f"re-check {cfg['check_files']} npz", {
        "files": cfg["check_files"], "size": cfg["check_size"], "model": small.name,
    }, {
        "check_s": data["check_s"], "dataset_build_s": data["dataset_build_s"], "encoded": data["encoded"],
        "stale_reencoded": data["stale_reencoded"], "peak_rss_mib": measured.peak_rss_mib,
    }, note="--cache_latents_to_disk over valid caches: checked, none re-encoded (small VAE)"))
    return rows


def _child(ctx: Context, mode: str, argv: Sequence[str], result: Path) -> tuple[dict[str, Any], Any]:
    return run_child_json(ctx, "benchmarks/suite_latents.py", mode, argv, result)


# -- the child processes -------------------------------------------------------------------------
def _dataset_group(train_data_dir: str, size: int, vae_batch_size: int, to_disk: bool):
    """The dataset exactly as train_network.py builds it from these flags."""
    import train_network
    from library import config_util, train_util

    argv = [
        "--train_data_dir", train_data_dir, "--resolution", str(size), "--train_batch_size", "1",
        "--caption_extension", ".txt", "--cache_latents", "--vae_batch_size", str(vae_batch_size), "--seed", "1",
    ] + (["--cache_latents_to_disk"] if to_disk else [])
    args = train_util.parse_args_with_config(train_network.setup_parser(), argv)
    train_util.prepare_dataset_args(args, True)
    return config_util.build_dataset_group(args, True, True, True, seed=args.seed), args


def _timed_image_loading(group) -> list[float]:
    """Wrap every dataset's prepare_image (what the cache calls per image) to sum its seconds."""
    spent = [0.0]
    for dataset in group.datasets:
        prepare = dataset.prepare_image

        def timed(info, rng=None, _prepare=prepare):
            started = time.perf_counter()
            try:
                return _prepare(info, rng)
            finally:
                spent[0] += time.perf_counter() - started

        dataset.prepare_image = timed
    return spent


def child_cache(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    from library.model_util import load_vae

    vae = load_vae(opts.model).requires_grad_(False)
    with torch.no_grad():  # warm-up: the first call of each convolution shape is slower
        vae.encode(torch.zeros(1, 3, opts.size, opts.size))
    results = {}
    for batch_size in (int(b) for b in opts.vae_batch_sizes.split(",")):
        group, args = _dataset_group(opts.train_data_dir, opts.size, batch_size, False)
        spent = _timed_image_loading(group)
        started = time.perf_counter()
        with torch.no_grad():  # as train_core._cache_latents
            encoded = group.cache_latents(vae, args.vae_batch_size, False, True)
        caching = time.perf_counter() - started
        if encoded != group.num_train_images:
            raise RuntimeError(f"encoded {encoded} of {group.num_train_images} images")
        results[str(batch_size)] = {"caching_s": caching, "images_per_s": encoded / caching, "encoded": encoded,
                                    "image_load_share": spent[0] / caching}
    return results


def child_recheck(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    from library.latent_cache import npz_paths_for_image
    from library.model_util import load_vae

    vae = load_vae(opts.model).requires_grad_(False)
    group, args = _dataset_group(opts.train_data_dir, opts.size, 8, True)
    with torch.no_grad():
        first = group.cache_latents(vae, args.vae_batch_size, True, True)  # writes what is missing or stale
    started = time.perf_counter()
    group, args = _dataset_group(opts.train_data_dir, opts.size, 8, True)  # a new run over the same folder
    built = time.perf_counter()
    with torch.no_grad():
        encoded = group.cache_latents(vae, args.vae_batch_size, True, True)
    done = time.perf_counter()
    if encoded != 0:
        raise RuntimeError(f"a valid disk cache was re-encoded ({encoded} images)")
    # one image newer than its cache: exactly that one must be encoded again
    image = sorted(Path(opts.train_data_dir).glob("*/*.png"))[0]
    original = os.stat(image)
    npz_time = os.stat(npz_paths_for_image(image)[0]).st_mtime
    os.utime(image, (npz_time + 1, npz_time + 1))
    try:
        group, args = _dataset_group(opts.train_data_dir, opts.size, 8, True)
        with torch.no_grad():
            stale = group.cache_latents(vae, args.vae_batch_size, True, True)
    finally:  # the folder stays a valid cache for the next run
        os.utime(image, ns=(original.st_atime_ns, original.st_mtime_ns))
    if stale != 1:
        raise RuntimeError(f"one stale cache: {stale} images re-encoded")
    return {"first_pass_encoded": first, "dataset_build_s": built - started, "check_s": done - built,
            "encoded": encoded, "stale_reencoded": stale, "files": group.num_train_images}


def child_main(argv: Optional[Sequence[str]] = None) -> int:
    from library.io_util import write_text_atomic

    parser = argparse.ArgumentParser(description="latent-caching benchmark child process")
    parser.add_argument("mode", choices=["cache", "recheck"])
    parser.add_argument("--model", type=str, required=True)
    parser.add_argument("--train_data_dir", type=str, required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--vae_batch_sizes", type=str, default="1", help="comma-separated, run in turn")
    parser.add_argument("--json", type=str, required=True)
    opts = parser.parse_args(argv)
    work = {"cache": child_cache, "recheck": child_recheck}[opts.mode]
    write_text_atomic(Path(opts.json), json.dumps(work(opts)))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
