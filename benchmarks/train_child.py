"""One measured training run and its floor, in one process (run by benchmarks/suite_training.py).

    python benchmarks/train_child.py --script train_network --report out.json \\
        --floor unet_te --floor_steps 8 -- <the trainer's own flags>

Trains with the script's own parser and `train()` entry point, so the run is the one a user
starts. Then, in the same process (machine noise hits both alike), it times the floor: a bare
forward + backward of the same frozen U-Net (and text encoder) on a batch of the same data,
the gradient flowing to the inputs through every layer, no weight gradients. The report (JSON)
holds the step times and stage seconds (`library.stage_timer`), the peak RSS of the training
(VmHWM read before the floor runs), the floor step times and the memory account: bytes of the
weights, of the trained parameters' gradients and of the optimizer state.

    python benchmarks/train_child.py --plan rows.json

runs several rows (the suite's `--quick` mode): the libraries are imported once, then each row
trains in a process forked from this one (its peak RSS counted from the fork: Linux
`clear_refs`), so a row costs seconds instead of the imports' start-up each time. `rows.json`
is a list of {"name", "script", "report", "floor", "floor_steps", "argv"}; each row's exit
status and wall seconds are added to its report as `returncode` / `wall_s`.
"""
from __future__ import annotations

import time

CHILD_STARTED = time.time()  # before the heavy imports: they belong to the run's start-up

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import proc_status_fields_mib, proc_status_mib, reset_peak_rss  # noqa: E402
from library import model_util, stage_timer, text_encoding, train_core, train_util  # noqa: E402

MIB = 1024 * 1024
FLOORS = ("none", "unet_te", "unet", "both")


def vm_hwm_mib() -> Optional[float]:
    """Peak resident set of this process so far (Linux VmHWM), MiB."""
    return proc_status_mib("VmHWM")


class RssTrace:
    """RSS and peak RSS (MiB) at every stage mark and step of the run: where the peak comes."""

    def __init__(self) -> None:
        self.points: list[list[Any]] = []

    def __call__(self, stage: str) -> None:
        memory = proc_status_fields_mib(("VmRSS", "VmHWM"))
        self.points.append([stage, memory["VmRSS"], memory["VmHWM"]])


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_account(ctx: train_core.TrainContext) -> dict[str, float]:
    """MiB of what the run must hold: weights per model, gradients of what trains, optimizer state."""
    models = ctx.models
    optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    state = [v for per_param in optimizer.state.values() for v in per_param.values() if torch.is_tensor(v) and v.dim() > 0]
    weights = {
        name: _tensor_bytes([*model.parameters(), *model.buffers()]) / MIB
        for name, model in (("unet", models.unet), ("text_encoder", models.text_encoder), ("vae", models.vae))
    }
    network = _network(ctx)
    network_mib = _tensor_bytes(network.parameters()) / MIB if network is not None else 0.0
    return {
        "unet_weights_mib": weights["unet"],
        "text_encoder_weights_mib": weights["text_encoder"],
        "vae_weights_mib": weights["vae"],
        "network_weights_mib": network_mib,
        "trained_params": float(sum(p.numel() for p in trained)),
        "gradients_mib": _tensor_bytes(trained) / MIB,  # one gradient per trained parameter
        "optimizer_state_mib": _tensor_bytes(state) / MIB,
    }


def _network(ctx: train_core.TrainContext) -> Any:
    step_module = ctx.accelerator.unwrap_model(ctx.step_module)
    trainable = getattr(step_module, "trainable", {})
    return trainable["network"] if "network" in trainable else None


def _floor_batch(ctx: train_core.TrainContext) -> tuple[torch.Tensor, list[str]]:
    """Scaled latents and captions of the run's first batch."""
    batch = ctx.dataset_group[(0, 0)]  # batches are keyed (epoch, batch_index)
    vae = ctx.models.vae
    latents = batch.get("latents")
    if latents is None:  # latents not cached: encode them as the loop would
        with torch.no_grad():
            latents = vae.encode(batch["images"].to(vae.dtype)).latent_dist.mean
    return latents.to(ctx.weight_dtype) * vae.config.scaling_factor, list(batch["captions"])


def floor_step_times(ctx: train_core.TrainContext, through_text_encoder: bool, steps: int, warmup: int = 1) -> list[float]:
    """Seconds per bare forward + backward of the frozen U-Net (and text encoder) after `warmup` steps.

    The base models are left frozen, without the network's hooks and without gradient
    checkpointing: the floor is the work any trainer of this batch must do."""
    args, models = ctx.args, ctx.models
    network = _network(ctx)
    if network is not None:
        network.restore()
    unet, text_encoder, tokenizer = models.unet, models.text_encoder, models.tokenizer
    for model in (unet, text_encoder):
        model.requires_grad_(False)
        for param in model.parameters():
            param.grad = None
    if getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    disable_te_checkpointing = getattr(text_encoder, "gradient_checkpointing_disable", None)
    if disable_te_checkpointing is not None:
        disable_te_checkpointing()
    if through_text_encoder and model_util.weights_released(text_encoder):
        raise RuntimeError("the run freed the text encoder after caching its outputs: there is no U-Net + text "
                           "encoder floor to time in this process (use the floor 'unet')")
    latents, captions = _floor_batch(ctx)
    max_token_length, clip_skip = getattr(args, "max_token_length", None), getattr(args, "clip_skip", None)
    input_ids = text_encoding.tokenize_captions(tokenizer, captions, max_token_length)
    embedding = getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding
    # the token embeddings become the leaf the gradient flows back to, through every encoder layer
    hook = embedding.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_(True))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator).to(latents.dtype)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    fixed_states = None
    if not through_text_encoder:
        cache = ctx.accelerator.unwrap_model(ctx.step_module)._encode_text
        if model_util.weights_released(text_encoder):  # freed after caching: the run's own cached states
            fixed_states = cache(captions)
        else:
            with torch.no_grad():
                fixed_states = text_encoding.encode_input_ids(
                    text_encoder, input_ids, tokenizer, max_token_length, clip_skip, ctx.weight_dtype
                )
    times: list[float] = []
    try:
        for _ in range(warmup + steps):
            started = time.perf_counter()
            if fixed_states is None:
                states = text_encoding.encode_input_ids(text_encoder, input_ids, tokenizer, max_token_length, clip_skip, ctx.weight_dtype)
            else:
                states = fixed_states
            noisy = (latents + noise).requires_grad_(True)
            prediction = unet(noisy, timesteps, states, return_dict=False)[0]
            F.mse_loss(prediction.float(), noise.float()).backward()
            times.append(time.perf_counter() - started)
    finally:
        hook.remove()
    return times[warmup:]


def run(script: str, train_argv: Sequence[str], floor: str, floor_steps: int) -> dict[str, Any]:
    module = importlib.import_module(script)
    args = train_util.parse_args_with_config(module.setup_parser(), list(train_argv))
    captured: dict[str, Any] = {}
    hooks = train_core.TrainHooks(on_train_start=lambda ctx: captured.update(ctx=ctx))
    trace = RssTrace()
    stage_timer.add_observer(trace)
    result = module.train(args, hooks)
    trace("after")
    timings = stage_timer.report()
    report: dict[str, Any] = {
        "child_started": CHILD_STARTED,
        "global_step": result.global_step,
        "losses": result.step_losses,
        "step_seconds": timings["step_seconds"],
        "stage_seconds": timings["stage_seconds"],
        "peak_rss_train_mib": vm_hwm_mib(),  # before the floor adds anything
        "rss_trace": trace.points,
    }
    ctx = captured["ctx"]
    report["memory"] = memory_account(ctx)
    floors: dict[str, list[float]] = {}
    if floor in ("unet_te", "both"):
        floors["unet_te"] = floor_step_times(ctx, through_text_encoder=True, steps=floor_steps)
    if floor in ("unet", "both"):
        floors["unet"] = floor_step_times(ctx, through_text_encoder=False, steps=floor_steps)
    report["floor_step_seconds"] = floors
    report["floor_median_s"] = {name: statistics.median(times) for name, times in floors.items() if times}
    return report


def run_to_file(script: str, train_argv: Sequence[str], floor: str, floor_steps: int, report_path: Path) -> None:
    from library.io_util import write_text_atomic

    report = run(script, train_argv, floor, floor_steps)
    report["peak_rss_exit_mib"] = vm_hwm_mib()  # the floor included
    write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")




def run_plan(plan_path: Path) -> int:
    """Every row of the plan in its own forked process; returns how many failed."""
    import os

    for script in ("train_network", "train_db", "fine_tune"):  # imported once, before any fork
        importlib.import_module(script)
    failed = 0
    for row in json.loads(plan_path.read_text(encoding="utf-8")):
        report_path = Path(row["report"])
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the row: no torch op ran in the parent, so its thread pool starts fresh here
            status = 1
            try:
                stage_timer.reset()
                stage_timer.set_process_start(time.time())
                if not reset_peak_rss():
                    print("warning: cannot reset VmHWM; peak RSS includes earlier rows", file=sys.stderr)
                run_to_file(row["script"], row["argv"], row["floor"], row["floor_steps"], report_path)
                status = 0
            except BaseException:  # noqa: B036 - a forked row must never return into the loop
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        returncode = os.waitstatus_to_exitcode(wait_status)
        wall = time.perf_counter() - started
        if returncode != 0 or not report_path.is_file():
            failed += 1
            print(f"error: row {row['name']} failed with exit status {returncode}", file=sys.stderr)
            continue
        report = json.loads(report_path.read_text(encoding="utf-8"))
        report.update(returncode=returncode, wall_s=wall)
        report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return failed


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=None, help="JSON list of rows to run, each forked from this process")
    parser.add_argument("--script", default=None, choices=("train_network", "train_db", "fine_tune"))
    parser.add_argument("--report", default=None, help="JSON file the measurements go to")
    parser.add_argument("--floor", default="unet_te", choices=FLOORS, help="which floor to time after training")
    parser.add_argument("--floor_steps", type=int, default=8, help="timed floor steps (after one warm-up step)")
    opts = parser.parse_args(argv[:split])
    from library.cli import setup_logging

    setup_logging()
    if opts.plan:
        return 1 if run_plan(Path(opts.plan)) else 0
    if not (opts.script and opts.report):
        parser.error("--script and --report are required without --plan")
    run_to_file(opts.script, argv[split + 1:], opts.floor, opts.floor_steps, Path(opts.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
