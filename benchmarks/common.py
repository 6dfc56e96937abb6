"""What every benchmark suite shares: the random-weight models, measured child processes, rows.

A suite is a module `benchmarks/suite_<name>.py` with `run(ctx: Context) -> list[Row]`;
`benchmarks/run.py` runs the suites asked for, prints one table and writes one JSON file.
Timings come from child processes started fresh (a script run as a user runs it) or from code
timed in this process; memory is the child's peak resident set (VmHWM), read by the child
itself so that pages shared with this parent are not counted.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

# U-Net widths of the quick mode (tests run every suite with it in seconds)
QUICK_UNET_CHANNELS = (32, 64, 64, 64)


@dataclass
class Row:
    """One measured configuration: `params` say what ran, `metrics` what was measured."""

    suite: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class Measured:
    returncode: int
    wall_s: float
    peak_rss_mib: Optional[float]
    stdout: str
    stderr: str

    def check(self, what: str) -> "Measured":
        if self.returncode != 0:
            raise RuntimeError(f"{what} failed with exit status {self.returncode}:\n{self.stderr[-3000:]}")
        return self


@dataclass
class Context:
    """What a suite gets: where to write, how big, how many threads."""

    out_dir: Path
    quick: bool = False
    threads: int = 2
    steps: int = 20
    options: dict[str, Any] = field(default_factory=dict)

    def model_file(self, v2: bool = False) -> Path:
        """The random-weight SD single file (full size; small U-Net in quick mode), made once."""
        name = f"sd{'21' if v2 else '15'}_random{'_quick' if self.quick else ''}.safetensors"
        return write_random_sd_model(self.out_dir / name, v2=v2, quick=self.quick)

    def model_folder(self, v2: bool = False) -> Path:
        """The same model as a Diffusers folder, made once."""
        single = self.model_file(v2)
        folder = single.with_suffix("")
        if not (folder / "model_index.json").is_file():
            from library import model_util

            models = model_util.load_target_model(single)
            model_util.save_diffusers_checkpoint(v2, folder, models.text_encoder, models.unet, models.vae, use_safetensors=True)
        return folder

    def child_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["OMP_NUM_THREADS"] = str(self.threads)
        env["MKL_NUM_THREADS"] = str(self.threads)
        env.update(extra)
        return env


def write_random_sd_model(path: Path, v2: bool = False, quick: bool = False, seed: int = 0) -> Path:
    """An SD 1.5 (or 2.1) single file with random fp32 weights; kept if it already exists."""
    if path.is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library import model_util, sd_config

    unet_config = dict(sd_config.SD21_UNET_CONFIG if v2 else sd_config.SD15_UNET_CONFIG)
    te_config = dict(sd_config.SD21_TEXT_ENCODER_CONFIG if v2 else sd_config.SD15_TEXT_ENCODER_CONFIG)
    if quick:
        unet_config["block_out_channels"] = list(QUICK_UNET_CHANNELS)
        unet_config["layers_per_block"] = 1
        te_config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1)
        unet_config["cross_attention_dim"] = 64
        if v2:
            unet_config["attention_head_dim"] = [1, 1, 1, 1]
    logger.info("building random-weight %s model %s", "SD2.1" if v2 else "SD1.5", path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_config).eval()
    vae_config = dict(sd_config.SD_VAE_CONFIG)
    if quick:
        vae_config["block_out_channels"] = [32, 32, 32, 32]
        vae_config["layers_per_block"] = 1
    vae = AutoencoderKL.from_config(vae_config).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_config)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    model_util.save_stable_diffusion_checkpoint(v2, path, text_encoder, unet, vae)
    return path


def write_random_lora(
    model_file: Path, path: Path, dim: int = 8, alpha: float = 8.0, conv_dim: Optional[int] = None,
    conv_alpha: float = 1.0, up_std: float = 0.01, seed: int = 0,
) -> Path:
    """A `networks.lora` file (U-Net and text encoder; C3Lier with `conv_dim`) with random weights for
    the model in `model_file`; kept if it already exists.

    The model is built on the meta device from the configs its header implies, so a full-size
    model costs no memory here.
    """
    if path.is_file():
        return path
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library import sd_config
    from library.model_util import LdmFile
    from networks import lora

    with LdmFile(model_file) as ldm:
        shapes = dict(ldm.shapes)
    v2 = sd_config.is_v2_ldm(shapes)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(sd_config.infer_unet_config(shapes, v2))
        text_encoder = CLIPTextModel(CLIPTextConfig(**sd_config.infer_text_encoder_config(shapes, v2)))
    torch.manual_seed(seed)
    conv_args = {} if conv_dim is None else {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}
    network = lora.create_network(1.0, dim, alpha, None, text_encoder, unet, **conv_args)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:  # zero by default: a LoRA that changes nothing would hide bugs
                param.normal_(0.0, up_std)
    path.parent.mkdir(parents=True, exist_ok=True)
    network.save_weights(path, None, {"ss_network_module": "networks.lora"})
    return path


# Runs a script (or `-m module`) in this fresh interpreter and writes its peak RSS (kB) to a file
# at exit, whatever the exit status: the report is the child's own, not shared parent pages.
_PEAK_WRAPPER = r"""
import atexit, runpy, sys
report, target = sys.argv[1], sys.argv[2]
def _write_peak():
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            kb = next(l for l in status if l.startswith("VmHWM:")).split()[1]
    except OSError:
        import psutil
        info = psutil.Process().memory_info()
        kb = str(int(getattr(info, "peak_wset", info.rss)) // 1024)
    with open(report, "w", encoding="utf-8") as out:
        out.write(kb)
atexit.register(_write_peak)
sys.argv = [target, *sys.argv[3:]]
sys.path.insert(0, ".")
runpy.run_path(target, run_name="__main__")
"""


_REPORT_NUMBERS = itertools.count()


def run_measured(
    argv: Sequence[str],
    ctx: Context,
    env: Optional[Mapping[str, str]] = None,
    timeout: Optional[float] = None,
) -> Measured:
    """Run script `argv[0]` (a path relative to the repository) with `argv[1:]` in a fresh process.

    Returns the exit status, wall time, peak RSS (MiB) and the captured output.
    """
    # unique per call, also across threads of one process
    report = ctx.out_dir / f".peak_rss_{os.getpid()}_{threading.get_ident()}_{next(_REPORT_NUMBERS)}.txt"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, str(report), *argv],
        cwd=ROOT, env=dict(env) if env is not None else ctx.child_env(),
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
    )
    wall = time.perf_counter() - start
    peak = int(report.read_text(encoding="utf-8")) / 1024 if report.is_file() else None
    report.unlink(missing_ok=True)
    return Measured(result.returncode, wall, peak, result.stdout, result.stderr)


def proc_status_mib(field_name: str) -> Optional[float]:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB; None where there is none."""
    return proc_status_fields_mib((field_name,))[field_name]


# The highest VmHWM this process read since its peak was last reset. The kernel stores its peak
# (`hiwater_rss`) only when RSS is about to fall, and from per-CPU counters that can lag the exact
# sum /proc shows as the current RSS; a VmHWM read is max(stored peak, current RSS), so a later read
# can be a few pages below an earlier one (seen in CI: 32 KiB). Every read is a true lower bound of
# the peak, so the peak reported is the highest one seen.
_highest_peak_read_mib = 0.0


def proc_status_fields_mib(field_names: Sequence[str]) -> dict[str, Optional[float]]:
    """Several memory fields of one read of /proc/self/status, in MiB (None where missing): the
    kernel computes them together, so VmHWM >= VmRSS holds between them. VmHWM is the highest read
    since the last `reset_peak_rss`, so it never falls between reads."""
    global _highest_peak_read_mib
    found: dict[str, Optional[float]] = dict.fromkeys(field_names)
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                name = line.split(":", 1)[0]
                if name in found:
                    found[name] = int(line.split()[1]) / 1024
    except OSError:
        pass
    if found.get("VmHWM") is not None:
        _highest_peak_read_mib = max(_highest_peak_read_mib, found["VmHWM"])
        found["VmHWM"] = _highest_peak_read_mib
    return found


def reset_peak_rss() -> bool:
    """Start this process's VmHWM again from its current RSS (Linux >= 4.0: write 5 to
    /proc/self/clear_refs); False where the kernel does not allow it."""
    global _highest_peak_read_mib
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as refs:
            refs.write("5")
        _highest_peak_read_mib = 0.0
        return True
    except OSError:
        return False


def median_after_warmup(times: Sequence[float], warmup: int = 2) -> float:
    """Median of the step times after the first `warmup` (all of them when there are fewer)."""
    kept = list(times[warmup:]) or list(times)
    return statistics.median(kept)


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in ("diffusers", "transformers", "accelerate"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table: suite, name, then every metric any row has (blank where absent)."""
    metric_names: list[str] = []
    for row in rows:
        metric_names += [name for name in row.metrics if name not in metric_names]
    header = ["suite", "row", *metric_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.suite, row.name, *(_cell(row.metrics[name]) if name in row.metrics else "" for name in metric_names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(rows: Sequence[Row], path: Path, command: str) -> Path:
    from library.io_util import write_text_atomic

    document = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command,
        "machine": machine_info(),
        "rows": [asdict(row) for row in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    return path
