"""Two-process CPU DDP (gloo) through torchrun: data is sharded by rank and both ranks end equal."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

import train_helpers as th


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(dump_dir, argv) -> subprocess.CompletedProcess:
    dump_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(th.REPO_ROOT / "tests" / "train_helpers.py"), str(dump_dir), *argv,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, cwd=th.REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def test_two_process_ddp_ranks_end_with_equal_weights_and_resume_exactly(tmp_path):
    model = th.make_tiny_model(tmp_path)
    img = th.make_image_folder(tmp_path, count=4, repeats=1)
    out = tmp_path / "out"
    extra = ["--max_train_steps", "3", "--cache_latents", "--flip_aug", "--save_every_n_steps", "2", "--save_state"]
    completed = _torchrun(tmp_path / "dump", th.base_argv(model, img, out, *extra))
    dump = tmp_path / "dump"
    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # the network trained (LoRA up weights start at zero) and the main process saved it
    assert sum(float(v.abs().sum()) for k, v in rank0.items() if k.endswith("lora_up.weight")) > 0
    saved = load_file(str(out / "lora.safetensors"))
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
    # 2 batches per epoch shared by 2 ranks => one step per epoch, 3 steps => 3 epochs
    assert "2 batches per epoch, 3 epochs, 3 steps, 2 processes" in completed.stderr
    assert (out / "lora-step00000002.safetensors").is_file()
    # the state holds both processes' RNG files; resuming it with two processes ends identical
    state = out / "lora-step00000002-state"
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()
    _torchrun(tmp_path / "dump2", th.base_argv(model, img, tmp_path / "out2", *extra, "--resume", str(state)))
    resumed = load_file(str(tmp_path / "dump2" / "rank0.safetensors"))
    for key in rank0:
        assert torch.equal(resumed[key], rank0[key]), key


def test_two_process_ddp_with_fp8_base_weights(tmp_path):
    """gloo cannot broadcast fp8 tensors: the frozen base (DiffusionStep keeps it unregistered) must
    stay out of DDP's start-up sync."""
    model = th.make_tiny_model(tmp_path)
    img = th.make_image_folder(tmp_path, count=4, repeats=1)
    _torchrun(tmp_path / "dump", th.base_argv(model, img, tmp_path / "out", "--max_train_steps", "2", "--fp8_base"))
    rank0, rank1 = (load_file(str(tmp_path / "dump" / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert sum(float(v.abs().sum()) for k, v in rank0.items() if k.endswith("lora_up.weight")) > 0
