"""The `training` benchmark suite in --quick mode (small model, 3 steps): every row measures real
numbers, and the stage timer behind its wall split writes what SD_TRAINER_TIMINGS asks for."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import run as bench_run  # noqa: E402
from library import stage_timer  # noqa: E402

ROWS = [
    "lora_single_file_64", "lora_diffusers_64", "lora_single_file_128", "lora_gradient_checkpointing_64",
    "lora_unet_only_64", "train_db_full", "fine_tune_full",
]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    started = time.perf_counter()
    assert bench_run.main(["--quick", "--suites", "training", "--out_dir", str(out), "--threads", "1"]) == 0
    elapsed = time.perf_counter() - started
    return json.loads((out / "results.json").read_text(encoding="utf-8")), elapsed, out


def test_quick_suite_measures_every_row(quick_results):
    document, _, _ = quick_results
    assert document["command"].startswith("python3 benchmarks/run.py --quick")
    rows = {row["name"]: row for row in document["rows"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        metrics, params = row["metrics"], row["params"]
        assert row["suite"] == "training"
        assert params["steps"] == 3 and len(params["step_seconds"]) == 3, name
        assert all(_positive(t) for t in params["step_seconds"]), name
        assert all(math.isfinite(loss) for loss in params["losses"]) and len(params["losses"]) == 3, name
        for key in ("s_per_step", "peak_rss_mib", "loop_s", "loading_s", "startup_s", "wall_s"):
            assert _positive(metrics[key]), (name, key, metrics.get(key))
        # the wall split lies within the process's wall time
        split = sum(metrics[f"{stage}_s"] for stage in ("startup", "loading", "caching", "setup", "loop", "save"))
        assert split <= metrics["wall_s"] + 0.5, (name, split, metrics["wall_s"])
        assert metrics["loop_s"] >= sum(params["step_seconds"]) - 1e-6, name
        assert metrics["caching_s"] > 0, name  # --cache_latents on every row
        floor = metrics.get("floor_ratio", metrics.get("unet_floor_ratio"))
        assert _positive(floor), name
        # RSS traced at every stage mark and step (where the peak comes): peaks only grow
        trace = params["rss_trace"]
        names = [point[0] for point in trace]
        assert names.count("step") == 3 and {"loading", "caching", "loop", "save"} <= set(names), (name, names)
        peaks = [point[2] for point in trace]
        assert peaks == sorted(peaks) and peaks[-1] <= metrics["peak_rss_mib"] + 1e-6, name
        # VmHWM of the training alone cannot exceed the whole process's
        assert metrics["peak_rss_mib"] <= params["peak_rss_process_mib"] + 1e-6, name
    unet_only = rows["lora_unet_only_64"]
    # the run frees the text encoder once its outputs are cached: the U-Net floor only
    assert _positive(unet_only["metrics"]["unet_floor_ratio"]) and "floor_ratio" not in unet_only["metrics"]
    assert list(unet_only["params"]["floor_step_seconds"]) == ["unet"]
    assert all(len(times) == 2 for times in unet_only["params"]["floor_step_seconds"].values())


def test_memory_account_of_the_whole_model_rows(quick_results):
    document, _, _ = quick_results
    rows = {row["name"]: row for row in document["rows"]}
    db, ft = rows["train_db_full"], rows["fine_tune_full"]
    db_memory, ft_memory = db["params"]["memory"], ft["params"]["memory"]
    # train_db trains the U-Net and the text encoder; SGD with Nesterov momentum keeps one buffer per weight
    assert db_memory["gradients_mib"] == pytest.approx(db_memory["unet_weights_mib"] + db_memory["text_encoder_weights_mib"], rel=1e-3)
    assert db_memory["optimizer_state_mib"] == pytest.approx(db_memory["gradients_mib"], rel=1e-6)
    # fine_tune trains the U-Net only
    assert ft_memory["gradients_mib"] == pytest.approx(ft_memory["unet_weights_mib"], rel=1e-3)
    assert ft_memory["optimizer_state_mib"] == pytest.approx(ft_memory["gradients_mib"], rel=1e-6)
    for row in (db, ft):
        metrics, memory = row["metrics"], row["params"]["memory"]
        expected = (memory["unet_weights_mib"] + memory["text_encoder_weights_mib"]
                    + memory["gradients_mib"] + memory["optimizer_state_mib"])
        assert metrics["memory_floor_mib"] == pytest.approx(expected)
        assert metrics["rss_over_floor"] == pytest.approx(metrics["peak_rss_mib"] / expected)
    lora = rows["lora_single_file_64"]["params"]["memory"]
    assert 0 < lora["network_weights_mib"] == pytest.approx(lora["gradients_mib"])  # only the network trains


def test_quick_outputs_and_table(quick_results, capsys):
    _, _, out = quick_results
    assert (out / "training" / "out" / "a" / "lora.safetensors").is_file()
    assert not list((out / "training" / "out" / "f").glob("model*"))  # whole models are measured, not kept


def test_stage_timer_writes_what_the_env_var_asks(tmp_path, monkeypatch):
    target = tmp_path / "timings.json"
    monkeypatch.setenv(stage_timer.ENV_VAR, str(target))
    stage_timer.reset()
    stage_timer.mark("loading")
    time.sleep(0.02)
    stage_timer.mark("loop")
    for _ in range(3):
        time.sleep(0.01)
        stage_timer.step_done()
    stage_timer.mark("save")
    assert stage_timer.finish() == target
    report = json.loads(target.read_text(encoding="utf-8"))
    assert len(report["step_seconds"]) == 3 and all(t >= 0.009 for t in report["step_seconds"])
    stages = report["stage_seconds"]
    assert set(stages) == {"startup", "loading", "loop", "save"}
    assert stages["loading"] >= 0.019 and stages["loop"] >= sum(report["step_seconds"]) - 1e-6
    assert stages["startup"] > 0  # from the process start to the first mark
    stage_timer.reset()
    monkeypatch.delenv(stage_timer.ENV_VAR)
    stage_timer.mark("loading")
    assert stage_timer.finish() is None  # nothing written unless asked


def test_peak_rss_reads_never_fall_until_reset(monkeypatch):
    """The kernel's VmHWM can read a few pages below an earlier read (its stored peak lags the
    exact RSS /proc shows); the benchmarks report the highest read since the last reset."""
    import builtins
    import io

    from benchmarks import common

    real_open = builtins.open
    status = {"VmHWM": 0, "VmRSS": 0}

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/self/status":
            return io.StringIO("".join(f"{name}:\t{kb} kB\n" for name, kb in status.items()))
        if str(path) == "/proc/self/clear_refs":
            return io.StringIO()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(common, "_highest_peak_read_mib", 0.0)
    readings = []
    for hwm_kb, rss_kb in ((471_824, 471_824), (471_792, 400_000), (480_000, 480_000)):
        status.update(VmHWM=hwm_kb, VmRSS=rss_kb)
        readings.append(common.proc_status_fields_mib(("VmRSS", "VmHWM")))
    assert [r["VmHWM"] for r in readings] == [471_824 / 1024, 471_824 / 1024, 480_000 / 1024]
    assert [r["VmRSS"] for r in readings] == [471_824 / 1024, 400_000 / 1024, 480_000 / 1024]
    assert common.reset_peak_rss()
    status.update(VmHWM=300_000, VmRSS=300_000)
    assert common.proc_status_mib("VmHWM") == 300_000 / 1024  # the peak starts again after a reset
