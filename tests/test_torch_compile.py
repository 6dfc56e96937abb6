"""`--torch_compile` / `--dynamo_backend`: accelerate compiles the training step; the `eager`
backend trains bit-identically, states resume across the flag, unusable backends stop at start."""
from __future__ import annotations

import pytest
import torch

import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
from library import train_core
from library.errors import UserError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    return {"model": th.make_tiny_model(root), "img": th.make_image_folder(root, count=2, repeats=1)}


def _run(workspace, out, *extra):
    seen = {}

    def at_start(ctx):
        seen["compiled"] = isinstance(ctx.step_module, torch._dynamo.eval_frame.OptimizedModule)

    def at_end(ctx):
        seen["network"] = th.network_state(ctx)

    argv = th.base_argv(workspace["model"], workspace["img"], out, "--max_train_steps", "4", "--train_batch_size", "1", *extra)
    result = th.run_train(argv, train_core.TrainHooks(on_train_start=at_start, on_train_end=at_end))
    return result.step_losses, seen


def test_eager_backend_compiles_the_step_and_trains_identically_and_resumes(workspace, tmp_path):
    plain, plain_seen = _run(workspace, tmp_path / "plain")
    compiled, seen = _run(workspace, tmp_path / "compiled", "--torch_compile", "--dynamo_backend", "eager",
                          "--save_every_n_steps", "2", "--save_state")
    assert seen["compiled"] and not plain_seen["compiled"]
    assert compiled == plain
    assert all(torch.equal(seen["network"][k], plain_seen["network"][k]) for k in plain_seen["network"])
    # a state saved by the compiled run resumes without the flag, bit-identically
    resumed, _ = _run(workspace, tmp_path / "resumed", "--resume", str(tmp_path / "compiled" / "lora-step00000002-state"))
    assert resumed == plain[2:]


@pytest.mark.parametrize("backend,message", [
    ("tvm", "needs the tvm package"),
    ("cudagraphs", "needs a CUDA GPU"),
    ("ofi", "is not available here"),
])
def test_unusable_backend_is_refused_at_start(workspace, tmp_path, backend, message):
    if backend == "cudagraphs" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(UserError, match=f"^--dynamo_backend {backend} {message}"):
        _run(workspace, tmp_path / "out", "--torch_compile", "--dynamo_backend", backend)
    assert not (tmp_path / "out" / "lora.safetensors").exists()
