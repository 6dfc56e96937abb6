"""Wall-clock marks at the training stages (start-up, loading, caching, set-up, loop, save).

The training core calls `mark(stage)` when a stage begins and `step_done()` after each optimizer
step; the marks cost one list append, so they are always on. A run started with the environment
variable `SD_TRAINER_TIMINGS=<file.json>` writes them to that file at the end (`finish`), e.g.

    SD_TRAINER_TIMINGS=timings.json python train_network.py ...

The benchmark suite (`benchmarks/train_child.py`) reads them in-process with `report()`.
Times are `time.time()` seconds; the start-up stage runs from the process start (psutil) to the
first mark, so it includes the interpreter, the imports and the dataset scan.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

ENV_VAR = "SD_TRAINER_TIMINGS"

_marks: list[tuple[str, float]] = []
_step_ends: list[float] = []
# called with the stage name (or "step") at every mark: e.g. the benchmark reads RSS there
_observers: list[Callable[[str], None]] = []
# set by a process forked to run one training (psutil's start time is the parent's boot-relative
# clock, up to a second off; a fork knows its own start exactly)
_process_start: Optional[float] = None


def set_process_start(when: Optional[float]) -> None:
    """Count start-up from `when` (epoch seconds) instead of the process start psutil reports."""
    global _process_start
    _process_start = when


def add_observer(observer: Callable[[str], None]) -> None:
    """Call `observer(stage)` at every mark and `observer("step")` after every step."""
    _observers.append(observer)


def reset() -> None:
    """Forget earlier marks (a new run in the same process)."""
    _marks.clear()
    _step_ends.clear()


def mark(stage: str) -> None:
    """Stage `stage` begins now (it ends at the next mark)."""
    _marks.append((stage, time.time()))
    for observer in _observers:
        observer(stage)


def step_done() -> None:
    """An optimizer step ended now."""
    _step_ends.append(time.time())
    for observer in _observers:
        observer("step")


def process_start_time() -> Optional[float]:
    """When this process started (epoch seconds), or None when psutil cannot tell."""
    if _process_start is not None:
        return _process_start
    try:
        import psutil

        return float(psutil.Process().create_time())
    except (ImportError, OSError):
        return None


def step_times(start: Optional[float] = None) -> list[float]:
    """Seconds of each optimizer step; the first one counts from `start` (default: the loop mark)."""
    if start is None:
        start = next((t for stage, t in _marks if stage == "loop"), None)
    ends = list(_step_ends)
    if not ends:
        return []
    previous = [start if start is not None else ends[0], *ends[:-1]]
    times = [end - begin for begin, end in zip(previous, ends)]
    return times if start is not None else times[1:]


def stage_seconds(end: Optional[float] = None) -> dict[str, float]:
    """Seconds per stage name (a stage entered twice is summed); `startup` from the process start."""
    stages: dict[str, float] = {}
    started = process_start_time()
    if _marks and started is not None:
        stages["startup"] = max(0.0, _marks[0][1] - started)
    following = [t for _, t in _marks[1:]] + [end if end is not None else time.time()]
    for (stage, begin), finish in zip(_marks, following):
        stages[stage] = stages.get(stage, 0.0) + max(0.0, finish - begin)
    stages.pop("end", None)  # the closing mark, not a stage
    return stages


def report() -> dict[str, Any]:
    """Everything recorded, as plain JSON-able values."""
    return {
        "process_start": process_start_time(),
        "marks": [[stage, t] for stage, t in _marks],
        "step_ends": list(_step_ends),
        "step_seconds": step_times(),
        "stage_seconds": stage_seconds(_marks[-1][1] if _marks else None),
    }


def finish() -> Optional[Path]:
    """Mark the end of the run; write the report where `SD_TRAINER_TIMINGS` says (if set)."""
    mark("end")
    target = os.environ.get(ENV_VAR)
    if not target:
        return None
    from library.io_util import write_text_atomic

    path = Path(target)
    write_text_atomic(path, json.dumps(report(), indent=2) + "\n")
    return path
