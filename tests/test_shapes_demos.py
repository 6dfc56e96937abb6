"""The shapes demos (examples/shapes_demo/) and the README demo command that runs one of them.

The demos themselves are judged by the quality suite (`benchmarks/suite_quality.py`: the
fraction of crosses before / after each full demo) and the LoRA picture test; here every demo
config runs for a few steps from the repository root, as a user runs it, and the committed
pictures are checked against the generator that drew them.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train_helpers  # noqa: F401 - puts the repository root on sys.path

import train_db  # noqa: E402
import train_network  # noqa: E402
import train_textual_inversion  # noqa: E402
from library import embedding_files, shape_demos  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.shape_scenes import judge_image, SHAPES  # noqa: E402

ROOT = train_helpers.REPO_ROOT
DEMO = ROOT / "examples" / "shapes_demo"
# 2 steps instead of 10 epochs (0 epochs: the demo's max_train_epochs no longer overrides the steps)
QUICK = ["--max_train_epochs", "0", "--max_train_steps", "2"]


def test_committed_pictures_are_the_generators(tmp_path):
    written = shape_demos.write_demo_data(tmp_path)
    for folder, paths in written.items():
        committed = sorted(p.name for p in (DEMO / folder).iterdir())
        assert committed == sorted(f for p in paths for f in (p.name, p.with_suffix(".txt").name)), folder
        for path in paths:
            with Image.open(path) as fresh, Image.open(DEMO / folder / path.name) as kept:
                np.testing.assert_array_equal(np.asarray(fresh), np.asarray(kept))
            assert (DEMO / folder / path.with_suffix(".txt").name).read_text(encoding="utf-8") == path.with_suffix(
                ".txt"
            ).read_text(encoding="utf-8")
    # the judge reads every demo picture as the new shape, and the regularisation pictures as base shapes
    shapes = [judge_image(Image.open(p), SHAPES).shape for p in written[shape_demos.LORA_FOLDER]]
    assert shapes == [shape_demos.NEW_SHAPE] * shape_demos.NUM_IMAGES
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in written[shape_demos.TI_FOLDER]]
    assert all(f" {shape_demos.TI_TOKEN} on a " in c for c in captions)


def _readme_demo_argv() -> list[str]:
    """The training part of the README's first command (after the pip installs)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    parts = [shlex.split(part) for part in block.split(" && ")]
    assert [p[:4] for p in parts[:2]] == [["python3", "-m", "pip", "install"]] * 2
    launch = parts[-1]
    assert launch[:2] == ["accelerate", "launch"] and "train_network.py" in launch, launch
    assert len(parts) == 3, "the demo needs no model-making step: the model ships in models/"
    return launch[launch.index("train_network.py") + 1 :]


def _samples(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "sample").glob("*.png"))


def test_readme_demo_runs(tmp_path, monkeypatch):
    """The README demo (2 steps instead of 10 epochs): samples before training and the LoRA."""
    argv = _readme_demo_argv()
    assert argv == ["--config_file", "examples/shapes_demo/lora.toml"]
    monkeypatch.chdir(ROOT)  # the demo's paths are relative to the repository root
    out = tmp_path / "lora"
    assert run_main(train_network.main, [*argv, "--output_dir", str(out), "--logging_dir", str(tmp_path / "logs"), *QUICK]) == 0
    assert (out / "sks_cross.safetensors").is_file()
    first = [name for name in _samples(out) if "_e000000_" in name]  # --sample_at_first: step 0
    assert len(first) == 4, _samples(out)


@pytest.mark.parametrize("script,config,output", [
    ("db", "db.toml", "sks_cross_db.safetensors"), ("ti", "ti.toml", "myshape.safetensors"),
])  # fmt: skip
def test_db_and_ti_demos_run(tmp_path, monkeypatch, script, config, output):
    monkeypatch.chdir(ROOT)
    out = tmp_path / script
    argv = ["--config_file", f"examples/shapes_demo/{config}", "--output_dir", str(out), *QUICK]
    if script == "db":
        argv += ["--logging_dir", str(tmp_path / "logs")]
    module = train_db if script == "db" else train_textual_inversion
    assert run_main(module.main, argv) == 0
    assert (out / output).is_file()
    assert len([name for name in _samples(out) if "_e000000_" in name]) == 4
    if script == "ti":
        assert embedding_files.read_embedding(out / output).vectors.shape == (1, 64)


def test_docs_list_the_demo_commands():
    doc = (ROOT / "docs" / "tiny_model.md").read_text(encoding="utf-8")
    for script, config in (("train_network.py", "lora"), ("train_db.py", "db"), ("train_textual_inversion.py", "ti")):
        assert f"accelerate launch {script} --config_file examples/shapes_demo/{config}.toml" in doc
