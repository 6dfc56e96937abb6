"""benchmarks/run.py --suites quality --quick: the suite runs end to end and its figures are fractions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quality_suite_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--suites", "quality", "--quick", "--steps", "6", "--threads", "1",
         "--out_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["rows"]}
    assert {"base euler_a", "base ddim", "base euler_a circle", "base euler_a red", "lora demo", "db demo", "ti demo"} <= set(rows)
    assert rows["base euler_a"]["metrics"]["images"] == 18  # one prompt per (shape, colour)
    assert rows["base euler_a red"]["metrics"]["images"] == 3
    for row in rows.values():
        for name, value in row["metrics"].items():
            if name != "images" and not name.endswith("_s"):
                assert 0.0 <= value <= 1.0, (row["name"], name, value)
    # 2 training steps change next to nothing: no cross appears from them
    assert rows["lora demo"]["metrics"]["new_before"] <= 0.25
    assert "| quality | lora demo |" in result.stdout
