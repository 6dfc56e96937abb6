"""Helpers for the LoRA tool tests: tiny LoRA files, running a script's main in-process, and
loading a LoRA file into diffusers while recording every warning it logs."""
from __future__ import annotations

import re

import copy
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from diffusers import StableDiffusionPipeline

from library.cli import run_main
from lora_helpers import randomize_up, te_output, tiny_pipeline, unet_output
from networks import lora

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative: str) -> Any:
    """Import a script (e.g. "networks/resize_lora.py") as a module, to call its main(argv)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(relative: str, argv: Sequence[str]) -> int:
    """Exit status of the script run in-process through run_main (errors print one line)."""
    return run_main(load_script(relative).main, [str(a) for a in argv])


def assert_modelspec(metadata: dict, architecture: str, title: str, merged_from: Optional[str] = None) -> None:
    """The `modelspec.*` keys a LoRA / model tool writes: architecture, title (output stem), date, merged_from."""
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.title"] == title
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", metadata["modelspec.date"])
    assert metadata.get("modelspec.merged_from") == merged_from


def make_lora(
    models: tuple, path: Path, dim: int = 4, alpha: float = 2.0, conv_dim: Optional[int] = None,
    conv_alpha: float = 1.5, seed: int = 0, metadata: Optional[dict] = None,
) -> Path:
    """Save a LoRA (random non-zero up weights) for the tiny (unet, vae, text_encoder)."""
    unet, vae, text_encoder = models
    args = {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)} if conv_dim else {}
    torch.manual_seed(seed)
    network = lora.create_network(1.0, dim, alpha, vae, copy.deepcopy(text_encoder), copy.deepcopy(unet), **args)
    randomize_up(network, seed=seed + 100)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha)}
    network.save_weights(path, None, {**meta, **(metadata or {})})
    return path


def apply_loras(models: tuple, files: Sequence[Path], ratios: Sequence[float]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(unet, text_encoder) copies with the LoRA files applied at run time (the network's own forward)."""
    unet, vae, text_encoder = copy.deepcopy(models[0]), models[1], copy.deepcopy(models[2])
    for file, ratio in zip(files, ratios):
        network, _ = lora.create_network_from_weights(ratio, file, vae, text_encoder, unet, for_inference=True)
        network.load_weights(file)
        network.apply_to(text_encoder, unet)
    return unet, text_encoder


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_in_diffusers(models: tuple, file: Path, v2: bool) -> tuple[StableDiffusionPipeline, list[str]]:
    """A pipeline of the tiny models with `file` loaded by `load_lora_weights`, and every warning
    diffusers / peft / transformers logged or warned while loading it that mentions keys."""
    unet, vae, text_encoder = models
    pipe = tiny_pipeline(unet, vae, text_encoder, v2)
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(file), adapter_name="tool_output")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return pipe, handler.messages + [str(w.message) for w in caught if "key" in str(w.message).lower()]


def diffusers_lora_outputs(
    lora_file: Path, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, v2: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(UNet output, text-encoder output, warnings) of the tiny diffusers pipeline with `lora_file`
    loaded (copies of the models; the fixed inputs of lora_helpers)."""
    pipe, messages = load_in_diffusers((unet, vae, text_encoder), lora_file, v2)
    return unet_output(pipe.unet), te_output(pipe.text_encoder), messages


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    assert (got - want).abs().max() <= rel * want.abs().max()


def assert_diffusers_matches(models: tuple, file: Path, v2: bool = False) -> None:
    """`file` loads in diffusers without warnings and changes the outputs as our network does."""
    pipe, messages = load_in_diffusers(models, file, v2)
    assert messages == []
    ours_unet, ours_te = apply_loras(models, [file], [1.0])
    want_u, want_t = unet_output(ours_unet), te_output(ours_te)
    got_u, got_t = unet_output(pipe.unet), te_output(pipe.text_encoder)
    assert (want_u - unet_output(models[0])).abs().max() > 1e-3  # the LoRA does something
    assert (got_u - want_u).abs().max() <= 1e-4 * want_u.abs().max()
    assert (got_t - want_t).abs().max() <= 1e-4 * max(want_t.abs().max(), 1.0)
