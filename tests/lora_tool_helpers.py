"""Helpers for the LoRA tool tests: a diffusers pipeline that loads a LoRA file while every
warning it emits (python warnings and the diffusers / peft / transformers loggers) is recorded."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from lora_helpers import te_output, tiny_pipeline, unet_output


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def diffusers_lora_outputs(
    lora_file: Path, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, v2: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(UNet output, text-encoder output, warnings) of a diffusers pipeline with `lora_file` loaded
    by `load_lora_weights` (copies of the models; the fixed inputs of lora_helpers)."""
    pipe = tiny_pipeline(unet, vae, text_encoder, v2)
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(lora_file), adapter_name="tool_output")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = handler.messages + [f"warning: {w.message}" for w in caught]
    return unet_output(pipe.unet), te_output(pipe.text_encoder), messages


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    assert (got - want).abs().max() <= rel * want.abs().max()
