"""Shared fixtures: one torch thread, the packaged tokenizers, tiny SD-architecture models
(random weights, fixed seed)."""
from __future__ import annotations

import pytest
import torch

from library.tiny_sd import build_tiny_models
from library.tokenizer_util import load_tokenizer


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """One intra-op torch thread for every test: with tiny models on busy shared CPUs, more
    threads only contend (runs get many times slower). Restored after the session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer_v1():
    """The packaged SD v1 (CLIP ViT-L/14) tokenizer; do not modify (add_tokens etc.)."""
    return load_tokenizer(v2=False)


@pytest.fixture(scope="session")
def tokenizer_v2():
    """The packaged SD v2 (OpenCLIP) tokenizer; do not modify (add_tokens etc.)."""
    return load_tokenizer(v2=True)


@pytest.fixture(scope="session")
def tiny_models_v1():
    """(unet, vae, text_encoder) of a tiny SD v1-like model; do not modify in place."""
    torch.manual_seed(0)
    return build_tiny_models(v2=False, seed=0)


@pytest.fixture(scope="session")
def tiny_models_v2():
    """(unet, vae, text_encoder) of a tiny SD v2-like model; do not modify in place."""
    torch.manual_seed(0)
    return build_tiny_models(v2=True, seed=0)


@pytest.fixture(scope="session")
def tiny_model_files_v1(tmp_path_factory):
    """{"diffusers": folder, "safetensors": file, "ckpt": file} of the tiny v1 model (seed 0); read-only."""
    from library.tiny_sd import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_sd_v1"), v2=False, seed=0)


@pytest.fixture(scope="session")
def tiny_model_files_v2(tmp_path_factory):
    """{"diffusers": folder, "safetensors": file, "ckpt": file} of the tiny v2 model (seed 0); read-only."""
    from library.tiny_sd import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_sd_v2"), v2=True, seed=0)
