"""benchmarks/gpu_check.sh / gpu_check.py cannot rot: the CPU smoke run of docs/benchmarks.md goes
through the same code as the CUDA run; the package check installs nothing here and fails
clearly when a wheel is missing; every third-party import is covered by the package lists;
the FLOP count, the peak table and the judges of a run's outputs give the right answers."""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check, gpu_packages  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
TRAINER_STEMS = [Path(s).stem for s in gpu_check.TRAINERS]


def doc_example(section: str) -> list[list[str]]:
    """The command lines of the first bash block under `## <section>` of docs/benchmarks.md."""
    text = DOC.read_text(encoding="utf-8").split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def absolute(command: list[str]) -> list[str]:
    """A doc command runnable from any folder: the interpreter of this test, scripts by full path."""
    program = {"python3": sys.executable, "bash": "bash"}[command[0]]
    return [program, str(ROOT / command[1]), *command[2:]]


def run(command: list[str], cwd: Path, env: dict | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, encoding="utf-8", timeout=timeout)


# --- the smoke run of the docs ----------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The worked example of docs/benchmarks.md, run as written in a temporary folder."""
    cwd = tmp_path_factory.mktemp("gpu_check")
    commands = doc_example("Worked example: the GPU check on CPU")
    assert [c[:2] for c in commands] == [["bash", "benchmarks/gpu_check.sh"], ["python3", "benchmarks/gpu_check.py"]]
    results = [run(absolute(command), cwd) for command in commands]
    document = json.loads((cwd / "gpu_check_smoke" / "gpu_check.json").read_text(encoding="utf-8"))
    return results, document, cwd


def test_smoke_run_passes_every_check(smoke):
    results, document, _ = smoke
    assert results[0].returncode == 0 and "packages: nothing to install" in results[0].stdout, results[0].stderr
    assert results[1].returncode == 0, results[1].stdout[-3000:] + results[1].stderr[-3000:]
    checks = {row["name"]: row for row in document["rows"] if row["suite"] == "check"}
    for stem in TRAINER_STEMS:  # every trainer ran in the precision a CPU has, and passed
        assert checks[f"{stem} bf16"]["metrics"]["result"] == "ok", checks[f"{stem} bf16"]
        assert checks[f"{stem} fp16"]["metrics"]["result"] == "skipped: needs CUDA"
        assert checks[f"{stem} full_fp16"]["metrics"]["result"] == "skipped: needs CUDA"
    assert checks["gen_img_diffusers bf16 + LoRA"]["metrics"]["result"] == "ok"
    assert checks["train_network bf16 Prodigy"]["metrics"]["result"] == "skipped: needs CUDA"
    assert checks["train_network bf16 fp8_base"]["metrics"]["result"] == "ok"
    assert "checks and rows passed" in results[1].stdout and "| check | train_db bf16 | ok |" in results[1].stdout


def test_smoke_rows_have_their_numbers(smoke):
    _, document, cwd = smoke
    rows = {row["name"]: row for row in document["rows"] if row["suite"] == "cuda"}
    lora = rows["LoRA 64² b1 fp32"]
    assert "--gradient_checkpointing --sdpa" in lora["params"]["flags"]
    metrics = lora["metrics"]
    assert 0 < metrics["s_per_step"] < metrics["loop_s"] <= metrics["wall_s"]
    assert metrics["peak_rss_MiB"] > 100 and metrics["startup_s"] > 0 and metrics["caching_s"] > 0
    assert "peak_alloc_GiB" not in metrics  # no CUDA memory figures on CPU
    fine_tune = rows["full U-Net fine-tune 64² b2 fp32"]
    assert fine_tune["params"]["unet_flops_per_step"] == gpu_check.unet_training_flops(
        cwd / "gpu_check_smoke" / "sd15_random_quick.safetensors", 2, 64)
    assert fine_tune["metrics"]["MFU"] == "unknown" and fine_tune["metrics"]["TFLOP/s"] > 0
    generation = rows["generation 64² 2 steps fp32"]["metrics"]
    assert generation["s_per_image"] > 0 and generation["diffusers_s_per_image"] > 0
    assert generation["vs_diffusers"] == pytest.approx(generation["s_per_image"] / generation["diffusers_s_per_image"])
    assert document["machine"]["cuda"] is None and document["command"].startswith("python3 benchmarks/gpu_check.py --cpu_smoke")


def test_a_failing_row_fails_the_script_after_the_rest(tmp_path, capsys):
    status = gpu_check.main(["--cpu_smoke", "--parts", "lora,generation", "--model", str(tmp_path / "missing.safetensors"),
                             "--out_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAILED LoRA 64² b1 fp32: exit status 1: error:" in out and "missing.safetensors" in out
    assert "FAILED generation 64² 2 steps fp32" in out  # the next part still ran
    assert "0 of 2 checks and rows passed" in out


# --- the package check ------------------------------------------------------------------
def test_package_check_installs_nothing_here(tmp_path):
    result = run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--check_packages"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "packages: nothing to install"


def test_package_check_names_a_missing_wheel(tmp_path):
    env = {"GPU_CHECK_REQUIRE": "gpu_check_absent_module=gpu-check-absent", "GPU_CHECK_WHEELS": str(tmp_path / "wheels")}
    result = run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--check_packages"], tmp_path, env)
    assert result.returncode == 2
    assert "installing from" in result.stdout and "gpu-check-absent" in result.stdout
    assert "error: could not install gpu-check-absent" in result.stderr and "fetch_wheels.py" in result.stderr


def test_missing_packages_and_wheel_lookup(tmp_path):
    required = {"json": "stdlib-json", "gpu_check_absent_a": "absent-a"}
    optional = {"gpu_check_absent_b": "absent.b", "gpu_check_absent_c": "absent-c"}
    assert gpu_packages.missing_packages(tmp_path, required, optional) == ["absent-a"]
    (tmp_path / "absent_b-1.0-py3-none-any.whl").write_bytes(b"")  # a wheel makes an optional package wanted
    assert gpu_packages.missing_packages(tmp_path, required, optional) == ["absent-a", "absent.b"]
    (tmp_path / "lion_pytorch-0.2.5-py3-none-any.whl").write_bytes(b"")
    assert gpu_packages.wheel_for("lion-pytorch", tmp_path).name == "lion_pytorch-0.2.5-py3-none-any.whl"
    assert gpu_packages.wheel_for("lion", tmp_path) is None
    assert gpu_packages.extra_requirements(" a=b-c, d ") == {"a": "b-c", "d": "d"}


def _third_party_imports() -> dict[str, str]:
    local = {"library", "networks", "finetune", "tools", "benchmarks", "tests"} | {p.stem for p in ROOT.glob("*.py")}
    files = [*ROOT.glob("*.py"), *(p for d in ("library", "networks", "finetune", "tools", "benchmarks") for p in (ROOT / d).rglob("*.py"))]
    found: dict[str, str] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_import_is_on_the_gpu_machine_or_in_a_wheel():
    from library.optimizers import _BUILTIN_OPTIMIZERS

    covered = set(gpu_packages.REQUIRED) | set(gpu_packages.OPTIONAL) | gpu_packages.GPU_MACHINE_HAS | gpu_packages.NOT_ON_CHECK_PATH
    imports = _third_party_imports()
    assert {"torch", "diffusers", "toml", "voluptuous"} <= set(imports)  # the scan sees the code
    uncovered = {name: where for name, where in imports.items() if name not in covered}
    assert not uncovered, f"add these to benchmarks/gpu_packages.py (REQUIRED, or GPU_MACHINE_HAS if the GPU machine has them): {uncovered}"
    optimizer_modules = {module.split(".")[0] for module, _, _ in _BUILTIN_OPTIMIZERS.values()}
    assert optimizer_modules - covered == set()


# --- FLOPs, peaks, judges --------------------------------------------------------------
def test_flops_on_meta_equal_flops_of_a_real_run(tiny_model_files_v1):
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model_files_v1["safetensors"]
    counted = gpu_check.unet_training_flops(model, batch=2, size=64)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_files_v1["diffusers"], subfolder="unet")
    counter = FlopCounterMode(display=False)
    # the math backend: attention as the matrix products the counter knows (meta tensors take it
    # too; FlopCounterMode has no formula for PyTorch's CPU flash-attention kernel)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, unet.config.cross_attention_dim)).sample
        forward = counter.get_total_flops()
        out.float().pow(2).mean().backward()
    assert counted == counter.get_total_flops()
    assert 2.5 * forward < counted < 3.5 * forward  # backward with weight gradients: about twice the forward
    assert gpu_check.unet_training_flops(model, batch=4, size=64) == 2 * counted


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Tesla T4", None), (None, None),
])
def test_bf16_peak_table(name, peak):
    assert gpu_check.bf16_peak_tflops(name) == peak


def test_output_judges(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    assert gpu_check.output_problem("lora", tmp_path / "none.safetensors").startswith("no output file")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.tensor([[1.0, float("nan")]])}, str(lora), {"ss_network_module": "networks.lora"})
    assert "non-finite values in lora_unet_x.lora_down.weight" in gpu_check.output_problem("lora", lora)
    save_file({"lora_unet_x.lora_down.weight": torch.ones(1, 2)}, str(lora), {})
    assert "no ss_network_module" in gpu_check.output_problem("lora", lora)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a model")
    assert "does not load" in gpu_check.output_problem("model", tmp_path / "garbage.safetensors")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "flat.png")
    assert "flat colour" in gpu_check.images_problem([tmp_path / "flat.png"])
    assert gpu_check.losses_problem({"losses": [0.1, float("nan")]}, 2) == "non-finite loss at step 2"
    assert gpu_check.losses_problem({"losses": [0.1]}, 2) == "1 losses for 2 steps"
    assert gpu_check.losses_problem({"losses": [0.1, 0.2]}, 2) == ""


def test_every_flag_is_documented():
    text = DOC.read_text(encoding="utf-8")
    for section, parser in (("`benchmarks/gpu_check.py`", gpu_check.setup_parser()),):
        body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
        flags = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--") and opt != "--help"]
        for flag in flags:
            assert f"`{flag}`" in body, f"{flag} is not in the {section} section of docs/benchmarks.md"
    from benchmarks import fetch_wheels, run as bench_run  # noqa: F401

    for module, section in ((bench_run, "`benchmarks/run.py`"), (fetch_wheels, "`benchmarks/fetch_wheels.py`")):
        body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
        source = Path(module.__file__).read_text(encoding="utf-8")
        for flag in re.findall(r'add_argument\("(--[a-z_]+)"', source):
            assert f"`{flag}`" in body, f"{flag} is not in the {section} section of docs/benchmarks.md"


# --- the CUDA plan, checked here -----------------------------------------------------------
def cuda_settings(tmp_path: Path) -> "gpu_check.Settings":
    args = gpu_check.setup_parser().parse_args(["--out_dir", str(tmp_path)])
    return gpu_check.make_settings(args, cuda=True)


def test_cuda_plan_command_lines_pass_the_trainers_flag_checks(tmp_path, monkeypatch):
    """What only a CUDA machine runs is at least parsed and checked here, so its first run does
    not stop at a flag: every correctness run, every row, the generator check."""
    import importlib

    from library import gen_args, train_util

    monkeypatch.setattr(gpu_check, "importable", lambda module: False)  # no xformers / bitsandbytes
    settings = cuda_settings(tmp_path)
    assert (settings.size, settings.ft_batch, settings.row_steps, settings.jobs) == (512, 16, 20, 4)
    ws = gpu_check.Workspace(*(tmp_path / name for name in ("tiny.safetensors", "db", "ft", "meta.json", "rdb", "rft", "rmeta.json")))
    jobs, skips = gpu_check.check_jobs(settings, ws)
    names = [job.name for job in jobs]
    assert len(names) == 5 * 4 + 2 + 3 and "train_textual_inversion_XTI full_fp16" in names and "train_network bf16 Prodigy" in names
    assert "train_network fp16 fp8_base" in names and "train_network bf16 fp8_base" in names
    assert {row.metrics["result"] for row in skips} == {"skipped: xformers not importable", "skipped: bitsandbytes not importable"}
    model = tmp_path / "sd15.safetensors"
    rows = gpu_check.lora_plan(settings, ws, model) + gpu_check.fine_tune_plan(settings, ws, model, 10**12)
    assert [run.name for run in rows] == [
        "LoRA 512² b1 fp16", "LoRA 512² b1 bf16", "LoRA 512² b1 bf16 fused AdamW", "LoRA 512² b1 bf16 fp8_base",
        "LoRA 512² b1 bf16 torch_compile", "full U-Net fine-tune 512² b16 bf16", "full U-Net fine-tune 512² b16 bf16 fused AdamW",
    ]
    for script, argv in [(job.script, job.argv) for job in jobs] + [(run.script, run.argv) for run in rows]:
        module = importlib.import_module(Path(script).stem)
        args = train_util.parse_args_with_config(module.setup_parser(), argv)
        train_util.verify_training_args(args)
    lora_row = train_util.parse_args_with_config(importlib.import_module("train_network").setup_parser(), rows[1].argv)
    assert (lora_row.mixed_precision, lora_row.gradient_checkpointing, lora_row.sdpa, lora_row.train_batch_size) == ("bf16", True, True, 1)
    assert train_util.parse_args_with_config(importlib.import_module("fine_tune").setup_parser(), rows[6].argv).optimizer_args == ["fused=True"]
    assert train_util.parse_args_with_config(importlib.import_module("train_network").setup_parser(), rows[3].argv).fp8_base
    for precision in ("fp16", "bf16"):
        generation = gen_args.parse_args(gpu_check.generation_argv(model, tmp_path / "gen", tmp_path / "lora.safetensors", precision))
        assert getattr(generation, precision) and generation.network_module == ["networks.lora"]


def test_optional_rows_run_after_every_required_row(tmp_path, monkeypatch):
    """A slow optional variant (torch.compile compiles for minutes) must not push the target rows
    (LoRA memory, fine-tune MFU, generation) past the time limit: they all run first."""
    settings = cuda_settings(tmp_path)
    ran: list[str] = []

    def plan(*names):
        return [gpu_check.RowRun(name, "train_network.py", [], {}, optional=name.endswith("*")) for name in names]

    def run_rows(settings, runs):
        ran.extend(run.name for run in runs)
        return [(gpu_check.Row(gpu_check.SUITE_ROWS, run.name, params={}, metrics={}), None) for run in runs]

    monkeypatch.setattr(gpu_check, "build_workspace", lambda settings: None)
    monkeypatch.setattr(gpu_check, "full_model", lambda settings: tmp_path / "model.safetensors")
    monkeypatch.setattr(gpu_check, "run_checks", lambda settings, ws, pool: [])
    monkeypatch.setattr(gpu_check, "counted_flops", lambda settings, model: None)
    monkeypatch.setattr(gpu_check, "lora_plan", lambda settings, ws, model: plan("lora fp16", "lora fused*", "lora compile*"))
    monkeypatch.setattr(gpu_check, "fine_tune_plan", lambda settings, ws, model, flops: plan("fine-tune", "fine-tune fused*"))
    monkeypatch.setattr(gpu_check, "generation_row", lambda settings, model: (
        ran.append("generation") or gpu_check.Row(gpu_check.SUITE_ROWS, "generation", params={}, metrics={}), None))
    monkeypatch.setattr(gpu_check, "run_rows", run_rows)
    rows, _ = gpu_check.run(settings)
    assert ran == ["lora fp16", "fine-tune", "generation", "lora fused*", "lora compile*", "fine-tune fused*"]
    assert [row.name for row in rows] == ran
