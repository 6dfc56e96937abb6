"""LoRA files as the post-processing tools see them: weights plus safetensors metadata.

Training writes LoRA files through the network (`LoRANetwork.save_weights`); the tools
(DyLoRA cut, weight check, interrogation, ...) work on plain state dicts instead, so they
need to read a file's metadata beside its tensors, refuse files that are not LoRAs, and write
a state dict with recomputed `sshs_*` hashes (SPEC 2.6) - atomically, as every output.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.io_util import atomic_path
from library.safetensors_header import read_metadata
from library.model_hash import precalculate_safetensors_hashes
from networks.lora import PathLike, load_lora_state_dict, weights_ranks_and_alphas
from networks.lora_keys import LORA_PREFIX_TEXT_ENCODER, LORA_PREFIX_UNET

logger = logging.getLogger(__name__)

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
LORA_FILE_EXTENSIONS = (".safetensors", ".pt", ".ckpt")


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The metadata of a LoRA .safetensors file as strings ({} for none or for .pt/.ckpt files)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    return {str(k): str(v) for k, v in read_metadata(path).items()}


def require_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: PathLike, sd_model_keys: bool = True
) -> None:
    """Refuse a file that is not a kohya-layout LoRA (e.g. a checkpoint or an embedding).

    `sd_model_keys` also refuses keys that are not `lora_unet_*` / `lora_te_*` (an SDXL LoRA,
    other adapters); diffusers' loader would reject those too (SPEC 2.8).
    """
    modules_dim, _ = weights_ranks_and_alphas(state_dict)
    if not modules_dim:
        example = next(iter(state_dict), "<no tensors>")
        raise UserError(
            f"{path}: not a LoRA file (no '<module>.lora_down.weight' keys; it holds e.g. '{example}')"
        )
    for name in modules_dim:
        if f"{name}.lora_up.weight" not in state_dict:
            raise UserError(f"{path}: LoRA module {name} has lora_down.weight but no lora_up.weight")
    if not sd_model_keys:
        return
    foreign = [k for k in state_dict if not k.startswith((LORA_PREFIX_UNET + "_", LORA_PREFIX_TEXT_ENCODER + "_"))]
    if foreign:
        raise UserError(
            f"{path}: key '{foreign[0]}' is not a LoRA key of an SD 1.x/2.x model "
            f"(expected names starting with {LORA_PREFIX_UNET}_ or {LORA_PREFIX_TEXT_ENCODER}_)"
        )


def load_lora_file(
    path: PathLike, sd_model_keys: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a LoRA file; UserError for missing, unreadable or non-LoRA files."""
    state_dict = load_lora_state_dict(path)
    require_lora_state_dict(state_dict, path, sd_model_keys)
    return state_dict, read_safetensors_metadata(path)


def check_lora_output_path(save_to: PathLike, inputs: list[PathLike], flag: str = "--save_to") -> Path:
    """An output must have a LoRA extension and must not be one of the inputs."""
    target = Path(save_to)
    if target.suffix.lower() not in LORA_FILE_EXTENSIONS:
        raise UserError(f"{flag} {target}: the extension must be one of {', '.join(LORA_FILE_EXTENSIONS)}")
    for source in inputs:
        # resolve() follows links and works for files that do not exist yet
        if target.resolve() == Path(source).resolve():
            raise UserError(f"{flag} {target} is also an input; choose another output file")
    return target


def write_lora_file(
    destination: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Optional[Mapping[str, str]],
    as_safetensors: bool,
) -> None:
    """Write a LoRA state dict to `destination` as is (callers pass a temporary path).

    Safetensors files get the metadata plus `sshs_model_hash` / `sshs_legacy_hash` of these
    tensors; `.pt` / `.ckpt` files hold the flat dict only (no metadata, as in sd-scripts).
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if not as_safetensors:
        if metadata:
            logger.info("%s: .pt/.ckpt LoRA files carry no metadata; it is not written", destination)
        torch.save(tensors, str(destination))
        return
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, meta)
    save_file(tensors, str(destination), meta)


@contextlib.contextmanager
def atomic_lora_outputs(targets: list[Path]) -> Iterator[dict[Path, Path]]:
    """Temporary paths for several outputs; all are renamed into place only if the block succeeds.

    A failure while writing any of them leaves none of the outputs (old files stay untouched).
    """
    with contextlib.ExitStack() as stack:
        yield {target: stack.enter_context(atomic_path(target)) for target in targets}


def save_lora_file(
    path: PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None
) -> Path:
    """Write a LoRA state dict atomically; the format follows the extension."""
    target = Path(path)
    with atomic_path(target) as tmp:
        write_lora_file(tmp, state_dict, metadata, target.suffix.lower() == ".safetensors")
    logger.info("saved LoRA: %s", target)
    return target
