"""LoRA-tool rows: peak RSS and time of `networks/merge_lora.py` (a LoRA into the model) and
`networks/extract_lora_from_models.py` (the model vs that merged model), each in its own process.

    python3 benchmarks/run.py --suites tools --out_dir /work/bench_models

The model is the random-weight SD 1.5 single file (the small one with `--quick`); the LoRA a
random C3Lier `networks.lora` file (rank 16 / alpha 8, conv rank 8 / alpha 4, U-Net and text
encoder) made for it. Targets (issue 9): a tool's peak RSS at most one model size + 1.5 GiB;
`margin_mib` is that bound minus the measured peak. A `--help` run of the same script gives the
floor (Python, torch, diffusers imported). The merged and extracted outputs are deleted after
the run (the model and the LoRA are kept for the next one).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Context, Row, run_measured, write_random_lora  # noqa: E402
from benchmarks.suite_generation import offline_env  # noqa: E402

SUITE = "tools"
HEADROOM_MIB = 1536  # issue 9: at most one model size + 1.5 GB
LORA = {"dim": 16, "alpha": 8.0, "conv_dim": 8, "conv_alpha": 4.0, "up_std": 0.1}


def run(ctx: Context) -> list[Row]:
    out = ctx.out_dir / SUITE
    model = ctx.model_file()
    lora = write_random_lora(model, out / f"lora_c3lier_d16{'_quick' if ctx.quick else ''}.safetensors", **LORA)
    merged, extracted = out / "merged.safetensors", out / "extracted.safetensors"
    model_mib = model.stat().st_size / 2**20
    runs = {
        "merge_lora.py into the model": [
            "networks/merge_lora.py", "--sd_model", str(model), "--models", str(lora), "--save_to", str(merged),
        ],
        "extract_lora_from_models.py": [
            "networks/extract_lora_from_models.py", "--model_org", str(model), "--model_tuned", str(merged),
            "--save_to", str(extracted), "--dim", "16", "--conv_dim", "8",
        ],
    }
    if not ctx.quick:  # the floor: one more process start, which the quick mode (tests) saves
        runs = {"merge_lora.py --help (floor)": ["networks/merge_lora.py", "--help"], **runs}
    rows = []
    floor = None
    try:
        for name, argv in runs.items():
            measured = run_measured(argv, ctx, offline_env(ctx)).check(name)
            peak = measured.peak_rss_mib
            metrics = {"peak_rss_mib": peak, "wall_s": measured.wall_s}
            if "--help" in argv:
                floor = peak
            else:
                target = model_mib + HEADROOM_MIB
                metrics.update(model_mib=model_mib, target_mib=target, margin_mib=target - peak)
                if floor is not None:
                    metrics["over_floor_mib"] = peak - floor
            rows.append(Row(SUITE, name, {"model": model.name, "lora": lora.name, "threads": ctx.threads}, metrics,
                            note="own process; target: model size + 1.5 GiB"))
    finally:
        merged.unlink(missing_ok=True)
        extracted.unlink(missing_ok=True)
    return rows
