"""Run a trainer script as a user runs it, and write what it did to a JSON report.

    python3 benchmarks/train_probe.py REPORT.json train_network.py --pretrained_model_name_or_path ...

The script runs unchanged (`runpy`, `__main__`, its own `sys.exit(run_main(main))`); the probe
only wraps `library.train_core.run_training` to add timing hooks. The report holds the exit
status, the step losses, the saved model's path, one wall time per optimizer step (the device
is synchronised first, so a step's time is its GPU time too), the phases of the run (start-up
= imports and flag parsing, loading, latent caching, the rest of the set-up, loop, final save)
and, on CUDA, the peak allocated / reserved memory of the set-up and of the loop. The report is
written however the script ends, so a failing run still says how far it got.
"""
from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Callable

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent


def _now() -> float:
    return time.perf_counter() - STARTED


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _cuda_peaks() -> dict[str, int]:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"allocated": int(torch.cuda.max_memory_allocated()), "reserved": int(torch.cuda.max_memory_reserved())}


def _timed(owner: Any, name: str, phase: str, phases: dict[str, float]) -> None:
    """Replace `owner.name` by a wrapper adding its wall time to `phases[phase]` (no-op if absent:
    the probe must keep working when the core's internals are renamed)."""
    original = getattr(owner, name, None)
    if original is None:
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _synchronize()
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def install(report: dict[str, Any]) -> None:
    """Wrap the training core so that `report` fills in while the script runs."""
    from library import train_core

    phases: dict[str, float] = {}
    report["phases"] = phases
    report["step_times"] = []
    _timed(train_core._Runner, "load_models", "loading", phases)
    _timed(train_core, "_cache_latents", "caching", phases)
    _timed(train_core._Runner, "_final_save", "save", phases)
    original_run = train_core.run_training

    def on_train_start(ctx: Any) -> None:
        _synchronize()
        report["train_start_s"] = _now()
        report["cuda_setup_peak"] = _cuda_peaks()
        report["device"] = str(ctx.accelerator.device)
        if report["cuda_setup_peak"]:
            import torch

            report["device_name"] = torch.cuda.get_device_name(ctx.accelerator.device)
            torch.cuda.reset_peak_memory_stats()
        scheduler_step: Callable[..., Any] = ctx.lr_scheduler.step
        last = [time.perf_counter()]

        def timed_step(*args: Any, **kwargs: Any) -> Any:  # once per optimizer step (also a skipped one)
            result = scheduler_step(*args, **kwargs)
            _synchronize()
            now = time.perf_counter()
            report["step_times"].append(now - last[0])
            last[0] = now
            return result

        ctx.lr_scheduler.step = timed_step

    def on_train_end(ctx: Any) -> None:
        _synchronize()
        report["train_end_s"] = _now()
        report["cuda_loop_peak"] = _cuda_peaks()

    def probed_run_training(args: Any, method: Any, hooks: Any = None) -> Any:
        hooks = hooks or train_core.TrainHooks()
        for name, ours in (("on_train_start", on_train_start), ("on_train_end", on_train_end)):
            theirs = getattr(hooks, name)

            def chained(ctx: Any, ours: Callable = ours, theirs: Any = theirs) -> None:
                ours(ctx)
                if theirs is not None:
                    theirs(ctx)

            setattr(hooks, name, chained)
        report["run_training_s"] = _now()
        result = original_run(args, method, hooks)
        report["losses"] = [float(value) for value in result.step_losses]
        report["global_step"] = int(result.global_step)
        report["final_model_path"] = str(result.final_model_path) if result.final_model_path else None
        return result

    train_core.run_training = probed_run_training


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: train_probe.py REPORT.json SCRIPT.py [script flags...]", file=sys.stderr)
        return 2
    report_path, script = Path(argv[0]), argv[1]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    report: dict[str, Any] = {"script": script, "argv": argv[2:]}
    status: Any = 0
    try:
        install(report)
        sys.argv = [script, *argv[2:]]
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as stop:
        status = stop.code
    except BaseException:  # a bug: the traceback goes to stderr, the report still says how far it got
        status = 1
        raise
    finally:
        from library.io_util import write_text_atomic

        report["exit_status"] = status if isinstance(status, int) else (0 if status is None else 1)
        report["end_s"] = _now()
        report_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(report_path, json.dumps(report, indent=1) + "\n")
    return report["exit_status"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
