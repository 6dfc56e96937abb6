"""Shared helpers for the training tests: a tiny model file, a tiny DreamBooth folder, runs.

Also a command-line entry used by the DDP test: each process trains and dumps its network
weights to `<dump_dir>/rank<r>.safetensors`:

    python -m torch.distributed.run --nproc_per_node 2 tests/train_helpers.py <dump_dir> <train flags...>
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # train_network.py lives at the root (also when run by torchrun)
    sys.path.insert(0, str(REPO_ROOT))

from library import train_core, train_util  # noqa: E402

CAPTIONS = ["sks dog, red, sitting", "sks dog, blue, running", "sks dog, green, lying", "sks dog, yellow, standing"]


def make_tiny_model(root: Path, v2: bool = False) -> Path:
    """A tiny SD single-file checkpoint (random weights, seed 0)."""
    from library.tiny_sd import write_tiny_model

    return write_tiny_model(root, v2=v2, formats=("safetensors",), seed=0)["safetensors"]


def make_image_folder(root: Path, count: int = 4, size: int = 64, repeats: int = 5) -> Path:
    """`<root>/img/<repeats>_sks dog/imgN.png` + `.txt` captions; returns `<root>/img`.

    Images are smooth random colour fields so that a model can learn them quickly.
    """
    folder = Path(root) / "img" / f"{repeats}_sks dog"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for index in range(count):
        colour = rng.uniform(0, 255, size=3)
        pixels = np.stack([colour[c] * (0.5 + 0.5 * (xs if c % 2 else ys)) for c in range(3)], axis=-1)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(CAPTIONS[index % len(CAPTIONS)], encoding="utf-8")
    return folder.parent


def base_argv(model: Path, img_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """A short, fast LoRA run on CPU; `extra` flags come last (and win)."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(img_dir),
        "--caption_extension", ".txt",
        "--resolution", "64",
        "--output_dir", str(out_dir),
        "--output_name", "lora",
        "--network_module", "networks.lora",
        "--network_dim", "4",
        "--network_alpha", "2",
        "--learning_rate", "1e-3",
        "--optimizer_type", "AdamW",
        "--train_batch_size", "2",
        "--max_train_steps", "4",
        "--seed", "42",
        "--max_data_loader_n_workers", "0",
        "--mixed_precision", "no",
        *extra,
    ]


def parse(argv: Sequence[str]):
    import train_network

    return train_util.parse_args_with_config(train_network.setup_parser(), list(argv))


def run_train(argv: Sequence[str], hooks: Optional[train_core.TrainHooks] = None) -> train_core.TrainResult:
    """Parse `argv` like the script does and train."""
    import train_network

    return train_network.train(parse(argv), hooks)


def network_state(ctx: Any) -> dict:
    """The trained network's tensors (cpu copies) from a TrainContext at the end of a run."""
    modules = ctx.accelerator.unwrap_model(ctx.step_module).trainable
    return {k: v.detach().cpu().clone().contiguous() for k, v in modules["network"].state_dict().items()}


def sigkill_when_started(process: Any, marker: Path, timeout: float = 540) -> None:
    """SIGKILL a child training process (`subprocess.Popen` with `stderr=PIPE`) once the file
    `marker` exists (written by a save that tests/fault_hooks stalls half-written)."""
    import os
    import signal
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before the save: {process.stderr.read().decode(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the save did not start in time")
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def _ddp_main(dump_dir: str, argv: Sequence[str]) -> None:
    from safetensors.torch import save_file

    def dump(ctx) -> None:
        rank = ctx.accelerator.process_index
        save_file(network_state(ctx), str(Path(dump_dir) / f"rank{rank}.safetensors"))

    run_train(argv, train_core.TrainHooks(on_train_end=dump))


if __name__ == "__main__":
    from library.cli import setup_logging

    setup_logging()
    _ddp_main(sys.argv[1], sys.argv[2:])


def mapping_of(tensor: Any) -> str:
    """The file behind the memory of `tensor` ("" for anonymous memory), from /proc/self/maps (Linux)."""
    address = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text(encoding="utf-8").splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5].strip() if len(fields) > 5 else ""
    return ""
