"""Peak memory (RSS) of merge_lora.py into a model and of extract_lora_from_models.py.

    python3 benchmarks/lora_tools_memory.py --out_dir bench_output --channels 128,256,512,512

Builds an SD 1.x-shaped single-file model (U-Net width set by --channels; 320,640,1280,1280
is the full SD 1.5 U-Net) and a C3Lier LoRA for it, then runs each tool in its own process
and reads that process's peak resident memory. The design target: a tool's peak minus the
peak of the same script doing nothing (`--help`: Python, torch, diffusers loaded) stays well
below the model's size - one model plus 1.5 GB at most.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusers import UNet2DConditionModel  # noqa: E402

from library.model_util import save_stable_diffusion_checkpoint  # noqa: E402
from library.tiny_sd import build_tiny_models, tiny_unet_config  # noqa: E402
from networks import lora  # noqa: E402


# Runs the script in a fresh interpreter and reports VmHWM, the peak RSS of the process image
# after exec (getrusage of a child would also count the pages it shared with this parent).
_WRAPPER = """
import runpy, sys
script, report = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
sys.path.insert(0, ".")
try:
    runpy.run_path(script, run_name="__main__")
finally:
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(report, "w").write(peak.split()[1])
"""


def peak_rss_mib(argv: Sequence[str], report: Path) -> float:
    """Peak RSS (MiB) of a fresh process running the script `argv[0]` with `argv[1:]` (must succeed)."""
    result = subprocess.run(
        [sys.executable, "-c", _WRAPPER, argv[0], str(report), *argv[1:]],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {result.stderr.decode('utf-8', 'replace')[-2000:]}")
    return int(report.read_text(encoding="utf-8")) / 1024  # kB


def build_files(out_dir: Path, channels: list[int], layers_per_block: int) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    _, vae, text_encoder = build_tiny_models(False, seed=0)
    config = {**tiny_unet_config(False), "block_out_channels": channels, "layers_per_block": layers_per_block}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    model = save_stable_diffusion_checkpoint(False, out_dir / "bench_model.safetensors", text_encoder, unet, vae)
    network = lora.create_network(1.0, 16, 8.0, vae, copy.deepcopy(text_encoder), copy.deepcopy(unet), conv_dim="8", conv_alpha="4")
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.normal_(0, 0.1)
    lora_file = out_dir / "bench_lora.safetensors"
    network.save_weights(lora_file, None, {"ss_network_module": "networks.lora"})
    return model, lora_file


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=str, default="bench_output", help="folder for the model, LoRA and outputs")
    parser.add_argument("--channels", type=str, default="128,256,512,512", help="U-Net block_out_channels")
    parser.add_argument("--layers_per_block", type=int, default=2, help="U-Net layers per block (SD: 2)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    model, lora_file = build_files(out_dir, [int(c) for c in args.channels.split(",")], args.layers_per_block)
    merged = out_dir / "bench_merged.safetensors"
    size = model.stat().st_size / 2**20
    runs = {
        "baseline (merge_lora.py --help)": ["networks/merge_lora.py", "--help"],
        "merge_lora.py into the model": [
            "networks/merge_lora.py", "--sd_model", str(model), "--models", str(lora_file), "--save_to", str(merged),
        ],
        "extract_lora_from_models.py": [
            "networks/extract_lora_from_models.py", "--model_org", str(model), "--model_tuned", str(merged),
            "--save_to", str(out_dir / "bench_extracted.safetensors"), "--dim", "16", "--conv_dim", "8",
        ],
    }
    print(f"model: {model.name}, {size:.0f} MiB")
    baseline = None
    for label, run_argv in runs.items():
        peak = peak_rss_mib(run_argv, out_dir / "peak_rss.txt")
        baseline = peak if baseline is None else baseline
        print(f"{label}: peak RSS {peak:.0f} MiB (+{peak - baseline:.0f} MiB over the baseline)")


if __name__ == "__main__":
    main()
