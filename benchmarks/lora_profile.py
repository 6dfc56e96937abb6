"""Profile one LoRA training run: where a step's time goes and where memory peaks.

    python3 benchmarks/lora_profile.py                      # full-size SD 1.5 (random weights), 20 steps
    python3 benchmarks/lora_profile.py --floor              # + the bare fwd+bwd floor, side by side
    python3 benchmarks/lora_profile.py --measured           # + train_network.py in a fresh child (peak RSS)
    python3 benchmarks/lora_profile.py --quick --floor      # small model, seconds (what the tests run)

The run is the LoRA bench of ../shared/BASELINE.md (64 px, batch 1, dim 8, fp32, AdamW,
--cache_latents, SDPA, OMP_NUM_THREADS=2), trained in this process through the same stages as
`train_core.run_training`. Reported:

- per stage (set-up, model loading + latent caching, prepare, loop, after the last step): seconds,
  resident memory at its end and the peak within it (VmHWM, reset between stages through
  /proc/self/clear_refs where the kernel allows it);
- per step (median over steps after warm-up): data + forward + loss, backward, optimizer step and
  the rest of the loop;
- with `--floor`: after every training step, one bare forward + backward of the same frozen text
  encoder and U-Net on the same shapes (gradients carried through every layer of both, no weight
  gradients; LoRA routed out), and one of the U-Net alone. Interleaving makes the ratio
  step / floor robust on a noisy machine;
- with `--torch_profile`: the top operators of the loop (torch.profiler), by self CPU time; with
  `--floor` also the operators of a LoRA step side by side with those of the floor it is compared
  with (the U-Net floor with `--network_train_unet_only`), per run, largest difference first.

Memory figures of the in-process run include this script's own few MiB; `--measured` gives the
number to quote (the script run as a user runs it, peak RSS read by the child itself).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import proc_status_fields_mib, reset_peak_rss  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_MODEL = Path("/work/bench_models/sd15_random.safetensors")
WARMUP_STEPS = 2


# --- memory of this process ---------------------------------------------------------------
@dataclass
class Stage:
    name: str
    seconds: float
    rss_end_mib: Optional[float]
    peak_mib: Optional[float]  # within the stage when peaks can be reset, else since start


@dataclass
class Profile:
    stages: list[Stage] = field(default_factory=list)
    peak_resets: bool = False
    step_parts: dict[str, list[float]] = field(default_factory=dict)
    floor_both: list[float] = field(default_factory=list)
    floor_unet: list[float] = field(default_factory=list)
    after_last_step: dict[str, float] = field(default_factory=dict)
    top_ops: list[dict[str, Any]] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)
    rss_trace: list[dict[str, Any]] = field(default_factory=list)
    op_table: list[dict[str, Any]] = field(default_factory=list)  # --torch_profile --floor
    imports: dict[str, Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.peak_resets = reset_peak_rss()
        start = time.perf_counter()
        try:
            yield
        finally:
            # one read: the kernel shows VmHWM >= VmRSS within a read, not across two
            memory = proc_status_fields_mib(("VmRSS", "VmHWM"))
            self.stages.append(Stage(name, time.perf_counter() - start, memory["VmRSS"], memory["VmHWM"]))

    def add(self, part: str, seconds: float) -> None:
        self.step_parts.setdefault(part, []).append(seconds)


def median_after_warmup(values: Sequence[float]) -> Optional[float]:
    kept = list(values[WARMUP_STEPS:]) or list(values)
    return statistics.median(kept) if kept else None


# --- fine-grained memory trace (--rss_trace) -------------------------------------------------
MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
# loading steps of model_util / sd_keys timed by --rss_trace (module, function name)
LOADING_STEPS = (
    ("library.model_util", "load_vae"), ("library.model_util", "_vae_from_shapes"),
    ("library.model_util", "_use_then_release"), ("library.model_util", "release_weights"),
    ("library.model_util", "return_freed_memory"), ("library.model_util", "_unet_from_ldm"),
    ("library.model_util", "_text_encoder_from_ldm"), ("library.diffusers_folder", "load_folder_models"),
    ("library.model_util", "assign_weights"), ("library.model_util", "finish_model"),
    ("library.sd_keys", "ldm_to_model"),
)


def memory_point() -> dict[str, Optional[float]]:
    """RSS (anonymous = heap and tensors; file = mapped libraries and files), peak, MiB."""
    return proc_status_fields_mib(MEMORY_FIELDS)


class RssTrace:
    """Memory at named points of the run: stage marks, every step (up to `steps`), before / after
    each loading step."""

    def __init__(self, steps: int = 1000) -> None:
        self.points: list[dict[str, Any]] = []
        self._steps, self._seen_steps = steps, 0

    def add(self, label: str) -> None:
        self.points.append({"point": label, **memory_point()})

    def on_mark(self, stage: str) -> None:  # a stage_timer observer
        if stage == "step":
            self._seen_steps += 1
            if self._seen_steps > self._steps:
                return
            stage = f"step {self._seen_steps} done"
        else:
            stage = f"stage '{stage}' begins"
        self.add(stage)

    def wrap(self, module: Any, name: str) -> Callable[[], None]:
        """Record memory before and after every call of `module.name`; returns the undo."""
        original = getattr(module, name)

        def traced(*args: Any, **kwargs: Any) -> Any:
            what = next((a for a in args if isinstance(a, str) and a in ("UNet", "VAE", "text encoder")), "")
            label = f"{name}({what})" if what else name
            self.add(f"before {label}")
            try:
                return original(*args, **kwargs)
            finally:
                self.add(f"after {label}")

        setattr(module, name, traced)
        return lambda: setattr(module, name, original)

    def install(self) -> Callable[[], None]:
        import importlib

        from library import stage_timer

        undo = [self.wrap(importlib.import_module(module), name) for module, name in LOADING_STEPS]
        stage_timer.add_observer(self.on_mark)

        def uninstall() -> None:
            for step in undo:
                step()
            if self.on_mark in stage_timer._observers:
                stage_timer._observers.remove(self.on_mark)

        return uninstall


IMPORT_STEPS = (
    ("torch", "import torch"),
    ("train_network (script)", "import train_network"),
    ("library.train_core", "import library.train_core"),
    ("accelerate.Accelerator", "from accelerate import Accelerator"),
    ("diffusers UNet2DConditionModel", "from diffusers import UNet2DConditionModel"),
    ("diffusers AutoencoderKL", "from diffusers import AutoencoderKL"),
    ("transformers CLIPTextModel", "from transformers import CLIPTextModel"),
    ("transformers CLIPTokenizer", "from transformers import CLIPTokenizer"),
    ("networks.lora", "import networks.lora"),
    ("library.optimizers", "import library.optimizers"),
    ("library.custom_train_functions, samplers", "import library.custom_train_functions, library.samplers"),
)
HEAVY_MODULES = ("torch._dynamo", "torch._inductor", "torch.distributed", "transformers.generation", "transformers.pipelines",
                 "diffusers.pipelines", "diffusers.loaders", "peft", "tokenizers", "scipy", "sklearn", "pandas",
                 "cv2", "PIL.Image", "huggingface_hub", "safetensors", "jinja2", "triton", "sympy", "numba")


def import_costs() -> dict[str, Any]:
    """RSS after each import a LoRA run makes, in that order, in a fresh interpreter; and which
    heavy modules the run's imports pull in (`sys.modules` at the end)."""
    import subprocess

    script = "\n".join([
        "import json, sys, time",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "def mib(field):",
        "    for line in open('/proc/self/status', encoding='utf-8'):",
        "        if line.startswith(field + ':'):",
        "            return int(line.split()[1]) / 1024",
        "rows = [['interpreter', 0.0, mib('VmRSS'), mib('RssAnon'), mib('RssFile')]]",
        f"for label, statement in {list(IMPORT_STEPS)!r}:",
        "    start = time.perf_counter()",
        "    exec(statement)",
        "    rows.append([label, time.perf_counter() - start, mib('VmRSS'), mib('RssAnon'), mib('RssFile')])",
        f"heavy = {{name: name in sys.modules for name in {list(HEAVY_MODULES)!r}}}",
        "print(json.dumps({'rows': rows, 'heavy': heavy, 'modules': len(sys.modules)}))",
    ])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=str(ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_import_costs(costs: dict[str, Any]) -> str:
    lines = ["| after importing | s | VmRSS | RssAnon | RssFile | + VmRSS |", "|---|---|---|---|---|---|"]
    previous = None
    for label, seconds, rss, anon, file in costs["rows"]:
        delta = "" if previous is None else f"{rss - previous:+.0f}"
        lines.append(f"| {label} | {seconds:.2f} | {rss:.0f} | {anon:.0f} | {file:.0f} | {delta} |")
        previous = rss
    loaded = [name for name, present in costs["heavy"].items() if present]
    lines.append(f"\n{costs['modules']} modules loaded; of the heavy ones: {', '.join(loaded) or 'none'}")
    return "\n".join(lines)


def format_rss_trace(points: Sequence[dict[str, Any]]) -> str:
    lines = ["| point | VmRSS | RssAnon | RssFile | peak |", "|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['point']} | {p['VmRSS'] or 0:.0f} | {p['RssAnon'] or 0:.0f} | {p['RssFile'] or 0:.0f} | {p['VmHWM'] or 0:.0f} |")
    return "\n".join(lines)


# --- the bench data --------------------------------------------------------------------
def write_bench_images(folder: Path, count: int = 8) -> Path:
    """BASELINE's data: `10_sks dog` with 64x64 and 96x64 PNGs and .txt captions; returns the parent."""
    import numpy as np
    from PIL import Image

    images = folder / "10_sks dog"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        width = 64 if index % 2 == 0 else 96
        pixels = rng.integers(0, 256, size=(64, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{index}.png")
        (images / f"img{index}.txt").write_text(f"sks dog, photo {index}", encoding="utf-8")
    return folder


def bench_argv(model: Path, data: Path, out: Path, steps: int, resolution: int, extra: Sequence[str]) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
        "--caption_extension", ".txt", "--resolution", str(resolution), "--output_dir", str(out),
        "--output_name", "lora", "--network_module", "networks.lora", "--network_dim", "8",
        "--network_alpha", "8", "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--seed", "42",
        "--mixed_precision", "no", "--cache_latents", "--sdpa", "--max_data_loader_n_workers", "0",
        "--save_model_as", "safetensors", *extra,
    ]


# --- the floor ---------------------------------------------------------------------------
class Floor:
    """Bare forward + backward of the frozen models on the training shapes (LoRA routed out)."""

    def __init__(self, ctx: Any, network: Any, latent_hw: tuple[int, int], batch: int):
        import torch

        self.torch = torch
        self.text_encoder, self.unet = ctx.models.text_encoder, ctx.models.unet
        self.loras = list(network.text_encoder_loras) + list(network.unet_loras)
        self.device = ctx.accelerator.device
        tokenizer = ctx.models.tokenizer
        self.input_ids = tokenizer(
            ["sks dog, photo 0"] * batch, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        channels = self.unet.config.in_channels
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn((batch, channels, *latent_hw), generator=generator).to(self.device)
        self.timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(self.device)
        self.fixed_states: Any = None

    def _states(self, carry_grad: bool) -> Any:
        from library import model_util

        torch = self.torch
        if not carry_grad:
            if model_util.weights_released(self.text_encoder):
                # the run freed the encoder after caching its outputs: states of the same shape
                # (values do not change the U-Net's time)
                shape = (*self.input_ids.shape, self.text_encoder.config.hidden_size)
                return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(self.device, self.unet.dtype)
            with torch.no_grad():
                return self.text_encoder(self.input_ids)[0]
        # make the embedding output a leaf that needs a gradient: every encoder layer then
        # carries the gradient back, as a LoRA on the text encoder needs, without weight grads
        embeddings = self.text_encoder.get_input_embeddings()  # the token embedding
        handle = embeddings.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_(True))
        try:
            return self.text_encoder(self.input_ids)[0]
        finally:
            handle.remove()

    def step(self, with_text_encoder: bool) -> float:
        torch = self.torch
        for lora in self.loras:
            lora.restore()
        try:
            if not with_text_encoder and self.fixed_states is None:
                # the U-Net floor runs on text states computed once, as a run with cached
                # text-encoder outputs does (no text-encoder forward inside the timed step)
                self.fixed_states = self._states(carry_grad=False)
            start = time.perf_counter()
            states = self._states(carry_grad=True) if with_text_encoder else self.fixed_states
            latents = self.latents.detach().requires_grad_(True)
            out = self.unet(latents, self.timesteps, states, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(out.float(), self.latents.float())
            loss.backward()
            seconds = time.perf_counter() - start
        finally:
            for lora in self.loras:
                lora.apply_to()
        return seconds


# --- the profiled run ----------------------------------------------------------------------
def _timed(profile: Profile, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            profile.add(part, time.perf_counter() - start)

    return wrapper


STEP_LABEL, FLOOR_LABELS = "LoRA step", {True: "floor U-Net + TE", False: "floor U-Net"}
OUTSIDE_OPS = "(outside operators: Python, module calls)"


def _labelled(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` inside a torch.profiler range named `label` (ops are attributed to their nearest range)."""
    import torch

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def ops_by_range(events: Any, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Self CPU ms per operator within each labelled range (an op counts for its nearest labelled
    ancestor), and how many times each range ran; ranges `<label>: <part>` count as `<label>`."""
    def label_of(name: str) -> Optional[str]:
        head = name.split(":", 1)[0]
        return head if head in labels else None

    out: dict[str, dict[str, Any]] = {label: {"ranges": {}, "ops": {}} for label in labels}
    for event in events:
        own = label_of(event.name)
        if own is not None:
            ranges = out[own]["ranges"]
            ranges[event.name] = ranges.get(event.name, 0) + 1
            ops = out[own]["ops"]  # the range's own time: Python, module calls, anything not an operator
            ops[OUTSIDE_OPS] = ops.get(OUTSIDE_OPS, 0.0) + event.self_cpu_time_total / 1000
            continue
        parent = event.cpu_parent
        while parent is not None and label_of(parent.name) is None:
            parent = parent.cpu_parent
        if parent is None:
            continue
        ops = out[label_of(parent.name)]["ops"]
        ops[event.name] = ops.get(event.name, 0.0) + event.self_cpu_time_total / 1000
    for entry in out.values():
        entry["count"] = max(entry["ranges"].values(), default=0)  # ranges of one step run once each
    return out


def op_table(by_range: dict[str, dict[str, Any]], first: str, second: str, rows: int = 25) -> list[dict[str, Any]]:
    """Side by side: ms per run of each operator in range `first` and in `second`, largest difference first."""
    a, b = by_range.get(first, {}), by_range.get(second, {})
    na, nb = max(a.get("count", 0), 1), max(b.get("count", 0), 1)
    names = set(a.get("ops", {})) | set(b.get("ops", {}))
    table = [{"op": n, first: a.get("ops", {}).get(n, 0.0) / na, second: b.get("ops", {}).get(n, 0.0) / nb} for n in names]
    for row in table:
        row["difference"] = row[first] - row[second]
    table.sort(key=lambda row: abs(row["difference"]), reverse=True)
    total = {"op": "(all self CPU time in the range)", first: sum(r[first] for r in table), second: sum(r[second] for r in table)}
    total["difference"] = total[first] - total[second]
    return [total, *table[:rows]]


def profile_run(argv: Sequence[str], with_floor: bool, torch_profile_steps: int = 0, rss_trace: bool = False) -> Profile:
    """Train once in this process, stage by stage, timing the parts of every step."""
    import torch

    import train_network
    from library import model_util, train_core, train_util

    profile = Profile()
    trace = RssTrace() if rss_trace else None
    uninstall = trace.install() if trace is not None else (lambda: None)
    if trace is not None:
        trace.add("imports done")
    args = train_util.parse_args_with_config(train_network.setup_parser(), list(argv))
    floor_holder: dict[str, Floor] = {}
    marks: dict[str, float] = {"floor_total": 0.0}

    class ProfiledMethod(train_network.NetworkTrainingMethod):
        def on_step_end(self, ctx: Any) -> None:
            super().on_step_end(ctx)
            if not with_floor:
                return
            start = time.perf_counter()
            floor = floor_holder.get("floor")
            if floor is None:
                reso = args.resolution if isinstance(args.resolution, (tuple, list)) else (args.resolution,) * 2
                hw = (int(reso[1]) // 8, int(reso[0]) // 8)
                floor = floor_holder["floor"] = Floor(ctx, self.network, hw, args.train_batch_size)
            for both, times in ((True, profile.floor_both), (False, profile.floor_unet)):
                if both and model_util.weights_released(ctx.models.text_encoder):
                    continue  # the run freed the text encoder after caching its outputs: U-Net floor only
                step = _labelled(FLOOR_LABELS[both], floor.step) if torch_profile_steps else floor.step
                times.append(step(with_text_encoder=both))
            marks["floor_total"] += time.perf_counter() - start  # not part of the training step

        def setup(self, ctx: Any) -> None:
            super().setup(ctx)
            if trace is not None:
                trace.add("network built and applied")

    method = ProfiledMethod(args)
    runner = train_core._Runner(args, method, train_core.TrainHooks())
    with profile.stage("set-up (flags, accelerate, dataset)"):
        runner.setup()
    with profile.stage("model loading + latent caching"):
        runner.load_models()  # with cached latents and no samples, caching happens in here
    if trace is not None:
        trace.add("models loaded")
    with profile.stage("prepare (network, optimizer, accelerate)"):
        runner.prepare()
    if trace is not None:
        trace.add("prepared")

    def label(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return _labelled(f"{STEP_LABEL}: {part}", fn) if torch_profile_steps else fn

    runner._loss = _timed(profile, "data + forward + loss", label("forward", runner._loss))
    original_step = label("optimizer", runner._optimizer_step)

    def optimizer_step(*step_args: Any) -> None:
        start, floor_before = time.perf_counter(), marks["floor_total"]
        original_step(*step_args)
        end = time.perf_counter()
        floor_seconds = marks["floor_total"] - floor_before
        profile.add("optimizer step + bookkeeping", end - start - floor_seconds)
        if "step_end" in marks:  # a step: from the end of one optimizer step to the end of the next
            profile.add("step", end - marks["step_end"] - floor_seconds)
        marks["step_end"] = marks["last_step_end_wall"] = end

    runner._optimizer_step = optimizer_step
    accelerator = runner.ctx.accelerator
    accelerator.backward = _timed(profile, "backward", label("backward", accelerator.backward))
    saves: dict[str, float] = {}
    original_save = runner._final_save

    def final_save(ext: str) -> Any:
        start = time.perf_counter()
        try:
            return original_save(ext)
        finally:
            saves["final save"] = time.perf_counter() - start

    runner._final_save = final_save
    original_end = accelerator.end_training

    def end_training() -> Any:
        start = time.perf_counter()
        try:
            return original_end()
        finally:
            saves["accelerator.end_training"] = time.perf_counter() - start

    accelerator.end_training = end_training

    profiler_cm: Any = contextlib.nullcontext()
    if torch_profile_steps:
        profiler_cm = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with profile.stage("training loop + final save"):
        with profiler_cm as prof:
            runner.train()
        done = time.perf_counter()
    if "last_step_end_wall" in marks:
        profile.after_last_step = {"total": done - marks["last_step_end_wall"], **saves}
    uninstall()
    if trace is not None:
        trace.add("training done")
        profile.rss_trace = trace.points
    if torch_profile_steps and prof is not None:
        averages = prof.key_averages()
        rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
        profile.top_ops = [
            {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000} for e in rows
        ]
        if with_floor:
            by_range = ops_by_range(prof.events(), [STEP_LABEL, *FLOOR_LABELS.values()])
            unet_only = "--network_train_unet_only" in argv
            profile.op_table = op_table(by_range, STEP_LABEL, FLOOR_LABELS[not unet_only])
    return profile


def measured_run(argv: Sequence[str], out_dir: Path, threads: int) -> dict[str, Any]:
    """train_network.py in a fresh child process: exit status, wall, peak RSS (the child's VmHWM)."""
    from benchmarks.common import Context, run_measured

    ctx = Context(out_dir=out_dir, threads=threads)
    result = run_measured(["train_network.py", *argv], ctx).check("train_network.py")
    return {"wall_s": result.wall_s, "peak_rss_mib": result.peak_rss_mib}


# --- micro-benchmarks (no model weights: full-size shapes only) ------------------------------
def micro_optimizer(steps: int = 30) -> dict[str, Any]:
    """AdamW step time over the full-size SD 1.5 LoRA (dim 8, 528 tensors): default (for-loop),
    foreach and fused, and whether each gives bit-identical weights to the default."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import networks.lora as lora
    from library import sd_config

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(sd_config.SD15_UNET_CONFIG))
        text_encoder = CLIPTextModel(CLIPTextConfig(**sd_config.SD15_TEXT_ENCODER_CONFIG))
    shapes = [p.shape for p in lora.create_network(1.0, 8, 8, None, text_encoder, unet).parameters()]

    def run(option: Optional[str]) -> tuple[float, list[Any]]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        optimizer = torch.optim.AdamW(params, lr=1e-4, **({option: True} if option else {}))
        times = []
        for _ in range(steps):
            for param in params:
                param.grad = torch.randn_like(param) * 1e-3
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times[3:]), params

    base_s, base = run(None)
    out: dict[str, Any] = {"tensors": len(shapes), "params": sum(int(torch.Size(s).numel()) for s in shapes),
                           "default_ms": base_s * 1000}
    for option in ("foreach", "fused"):
        seconds, params = run(option)
        out[f"{option}_ms"] = seconds * 1000
        out[f"{option}_bit_identical"] = all(torch.equal(a, b) for a, b in zip(base, params))
        out[f"{option}_max_abs_diff"] = max(float((a - b).detach().abs().max()) for a, b in zip(base, params))
    return out


def micro_lora_layers(layers: int = 264, width: int = 320, tokens: int = 64, repeats: int = 30) -> dict[str, Any]:
    """Forward + backward of `layers` frozen Linear layers with and without a dim-8 LoRA on each,
    interleaved: the per-module cost of the LoRA path on the small shapes of a 64 px step."""
    import torch

    import networks.lora as lora

    torch.manual_seed(0)
    stack = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).requires_grad_(False)
    modules = [lora.LoRAModule(f"m{i}", layer, 1.0, 8, 8) for i, layer in enumerate(stack)]
    x0 = torch.randn(1, tokens, width)

    def step(with_lora: bool) -> float:
        for module in modules:
            (module.apply_to if with_lora else module.restore)()
        x = x0.clone().requires_grad_(True)
        start = time.perf_counter()
        stack(x).square().mean().backward()
        return time.perf_counter() - start

    for _ in range(3):
        step(True), step(False)
    pairs = [(step(True), step(False)) for _ in range(repeats)]
    return {
        "lora_ms": statistics.median(a for a, _ in pairs) * 1000,
        "bare_ms": statistics.median(b for _, b in pairs) * 1000,
        "lora_over_bare": statistics.median(a / b for a, b in pairs),
    }


# --- report -----------------------------------------------------------------------------------
def summary(profile: Profile) -> dict[str, Any]:
    parts = {name: median_after_warmup(values) for name, values in profile.step_parts.items()}
    step = parts.get("step")
    known = sum(v for k, v in parts.items() if k != "step" and v is not None)
    if step is not None:
        parts["rest of the loop (data loader, seeds, logging)"] = step - known
    out: dict[str, Any] = {"step_parts_median_s": parts}
    if profile.floor_unet and profile.step_parts.get("step"):
        steps = profile.step_parts["step"]
        # ratios per interleaved pair, then the median: noise common to a pair cancels
        unet_pairs = list(zip(steps, profile.floor_unet[1:]))
        out["floor_unet_s"] = median_after_warmup(profile.floor_unet)
        out["step_over_unet_floor"] = median_after_warmup([s / f for s, f in unet_pairs])
        if profile.floor_both:
            pairs = list(zip(steps, profile.floor_both[1:]))
            out["floor_te_unet_s"] = median_after_warmup(profile.floor_both)
            out["step_over_floor"] = median_after_warmup([s / f for s, f in pairs])
    return out


def format_report(profile: Profile, info: dict[str, Any]) -> str:
    lines = ["| stage | s | RSS at end (MiB) | peak in stage (MiB) |", "|---|---|---|---|"]
    for stage in profile.stages:
        lines.append(f"| {stage.name} | {stage.seconds:.2f} | {stage.rss_end_mib or 0:.0f} | {stage.peak_mib or 0:.0f} |")
    if not profile.peak_resets:
        lines.append("(peaks could not be reset between stages: each is the peak since start)")
    lines += ["", "| part of a step (median) | s |", "|---|---|"]
    for name, value in info["step_parts_median_s"].items():
        lines.append(f"| {name} | {value:.4f} |")
    if "step_over_floor" in info:
        lines += [
            "", f"floor (TE + U-Net fwd+bwd): {info['floor_te_unet_s']:.4f} s; U-Net alone: {info['floor_unet_s']:.4f} s",
            f"LoRA step / floor: {info['step_over_floor']:.3f}; / U-Net floor: {info['step_over_unet_floor']:.3f}",
        ]
    elif "step_over_unet_floor" in info:  # the text encoder was freed: no TE + U-Net floor
        lines += ["", f"U-Net floor: {info['floor_unet_s']:.4f} s", f"LoRA step / U-Net floor: {info['step_over_unet_floor']:.3f}"]
    if profile.after_last_step:
        lines += ["", "after the last step: " + ", ".join(f"{k} {v:.3f} s" for k, v in profile.after_last_step.items())]
    if profile.top_ops:
        lines += ["", "| operator | calls | self CPU ms |", "|---|---|---|"]
        lines += [f"| {op['op']} | {op['calls']} | {op['self_cpu_ms']:.1f} |" for op in profile.top_ops]
    if profile.op_table:
        first, second = [k for k in profile.op_table[0] if k not in ("op", "difference")]
        lines += ["", f"| operator (self CPU ms per run) | {first} | {second} | difference |", "|---|---|---|---|"]
        lines += [f"| {r['op']} | {r[first]:.1f} | {r[second]:.1f} | {r['difference']:+.1f} |" for r in profile.op_table]
    if profile.rss_trace:
        lines += ["", format_rss_trace(profile.rss_trace)]
    if profile.imports:
        lines += ["", format_import_costs(profile.imports)]
    if profile.measured:
        lines += ["", f"train_network.py in a fresh process: wall {profile.measured['wall_s']:.1f} s, "
                      f"peak RSS {profile.measured['peak_rss_mib']:.0f} MiB"]
    return "\n".join(lines)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=str, default=None, help=f"SD single file or Diffusers folder (default {DEFAULT_MODEL})")
    parser.add_argument("--out_dir", type=str, default="bench_output/lora_profile", help="data, outputs and profile.json")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution (square)")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    parser.add_argument("--quick", action="store_true", help="small random model and 4 steps (seconds)")
    parser.add_argument("--floor", action="store_true", help="interleave the bare fwd+bwd floor with every step")
    parser.add_argument("--torch_profile", action="store_true", help="also list the top operators (torch.profiler)")
    parser.add_argument("--measured", action="store_true", help="also run train_network.py in a fresh child (peak RSS)")
    parser.add_argument("--micro", action="store_true",
                        help="only the micro-benchmarks: AdamW default/foreach/fused on the full-size LoRA shapes, LoRA layer overhead")
    parser.add_argument("--rss_trace", action="store_true",
                        help="memory (VmRSS, RssAnon, RssFile, peak) before / after every loading step, at stage marks and the first steps")
    parser.add_argument("--imports", action="store_true", help="also the RSS after each import of a LoRA run, in a fresh interpreter")
    parser.add_argument("--train_args", type=str, nargs=argparse.REMAINDER, default=[],
                        help="extra train_network.py flags (last; e.g. --network_train_unet_only)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.common import write_random_sd_model
    from library.io_util import write_text_atomic

    out_dir = Path(args.out_dir).resolve()
    if args.micro:
        micro = {"optimizer": micro_optimizer(), "lora_layers": micro_lora_layers()}
        print(json.dumps(micro, indent=2))
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "micro.json", json.dumps(micro, indent=2) + "\n")
        return 0
    steps = 4 if args.quick and args.steps == 20 else args.steps
    if args.model:
        model = Path(args.model)
    elif args.quick:
        model = write_random_sd_model(out_dir / "sd15_random_quick.safetensors", quick=True)
    else:
        model = write_random_sd_model(DEFAULT_MODEL)
    data = write_bench_images(out_dir / "data")
    train_argv = bench_argv(model, data, out_dir / "output", steps, args.resolution, args.train_args)
    profile = profile_run(train_argv, args.floor, steps if args.torch_profile else 0, args.rss_trace)
    if args.imports:
        profile.imports = import_costs()
    if args.measured:
        profile.measured = measured_run(bench_argv(model, data, out_dir / "output_measured", steps, args.resolution, args.train_args),
                                        out_dir, args.threads)
    info = summary(profile)
    print(format_report(profile, info))
    write_text_atomic(out_dir / "profile.json", json.dumps({**asdict(profile), "summary": info}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
