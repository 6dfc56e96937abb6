"""Tensor-by-tensor access to an SD 1.x/2.x checkpoint under LDM key names, whatever its format.

Whole-checkpoint tools that combine several models (tools/merge_models.py) must not load
them as models: that holds each fully in memory. A `CheckpointTensors` instead lists the
LDM keys and shapes of a model without reading any weights, and reads one tensor when asked:

* single files (`.safetensors` / `.ckpt`) through `model_util.LdmFile`; old SD 1.x text-encoder
  keys without the `text_model.` level are listed under the modern name;
* Diffusers folders through the key links of `library.sd_keys` (q/k/v fused again for SD 2.x,
  LDM tensor layouts), reading the component weight files one tensor at a time.
"""
from __future__ import annotations

import abc
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from library import sd_config, sd_keys
from library.errors import UserError
from library.model_util import OLD_DIFFUSERS_VAE_ATTN, LdmFile, SafetensorsReader
from library.safe_unpickle import load_pickle_checkpoint

logger = logging.getLogger(__name__)

UNET_PREFIX = sd_config.UNET_PREFIX
# top-level parts that are not the UNet (sd-scripts' merge_models rule; EMA copies count as UNet)
NON_UNET_PREFIXES = (sd_config.VAE_PREFIX, "cond_stage_model.")
_V1_TE_LEVELS = ("embeddings.", "encoder.", "final_layer_norm.")


def is_unet_key(key: str) -> bool:
    return not key.startswith(NON_UNET_PREFIXES)


def _modern_te_key(key: str) -> str:
    """`cond_stage_model.transformer.encoder...` -> `cond_stage_model.transformer.text_model.encoder...`."""
    prefix = sd_config.TE_V1_PREFIX
    if key.startswith(prefix) and key[len(prefix):].startswith(_V1_TE_LEVELS):
        return prefix + sd_keys.HF_TEXT_MODEL + key[len(prefix):]
    return key


class CheckpointTensors(abc.ABC):
    """LDM keys, shapes and per-tensor reads of one checkpoint (see module doc)."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], v2: bool, owns_tensors: bool) -> None:
        self.path = path
        self.shapes = shapes
        self.v2 = v2
        # get() returns tensors in memory of their own (not views of a memory-mapped file)
        self.owns_tensors = owns_tensors

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    @abc.abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """The tensor under LDM key `key` (read now, one at a time)."""

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> "CheckpointTensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SingleFileTensors(CheckpointTensors):
    def __init__(self, path: Path) -> None:
        self._file = LdmFile(path)
        self._source_key = {_modern_te_key(k): k for k in self._file.keys()}
        shapes = {k: tuple(self._file.shapes[src]) for k, src in self._source_key.items()}
        if any(k.startswith("conditioner.embedders.") for k in shapes):
            self._file.close()
            raise UserError(f"{path}: this is an SDXL model; only SD 1.x / 2.x models are supported")
        if not any(k.startswith(UNET_PREFIX) for k in shapes):
            self._file.close()
            raise UserError(f"{path}: not a Stable Diffusion checkpoint (no '{UNET_PREFIX}' keys)")
        super().__init__(path, shapes, sd_config.is_v2_ldm(shapes), owns_tensors=not self._file.mapped)

    def get(self, key: str) -> torch.Tensor:
        return self._file.get(self._source_key[key])

    def close(self) -> None:
        self._file.close()


_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}


class _PartReader:
    """One Diffusers component's weight file, read one tensor at a time."""

    def __init__(self, folder: Path, part: str) -> None:
        names = _WEIGHT_FILES[part]
        found = [folder / part / name for name in names if (folder / part / name).is_file()]
        if not found:
            raise UserError(f"{folder}: Diffusers weights '{part}/{names[0]}' (or '{names[1]}') not found")
        self.path = found[0]
        self._reader: SafetensorsReader | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        if self.path.suffix == ".safetensors":
            self._reader = SafetensorsReader(self.path)
            self.shapes = dict(self._reader.shapes)
        else:
            loaded = load_pickle_checkpoint(self.path, mmap=True)
            if not isinstance(loaded, dict):
                raise UserError(f"{self.path}: holds a {type(loaded).__name__}, not a dict of tensors")
            self._tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        config_file = folder / part / "config.json"
        if not config_file.is_file():
            raise UserError(f"{folder}: not a Diffusers model folder ('{part}/config.json' is missing)")
        self.config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))

    def get(self, key: str) -> torch.Tensor:
        return self._reader.get_tensor(key) if self._reader is not None else self._tensors[key]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._tensors = {}


def _vae_key_aliases(keys: list[str]) -> dict[str, str]:
    """Modern diffusers VAE key -> key in the file (older diffusers named the attention differently)."""
    out = {}
    for key in keys:
        modern = key
        for old, new in OLD_DIFFUSERS_VAE_ATTN.items():
            modern = modern.replace(old, new)
        out[modern] = key
    return out


class DiffusersTensors(CheckpointTensors):
    def __init__(self, folder: Path) -> None:
        self._parts: dict[str, _PartReader] = {}
        try:
            for part in ("unet", "vae", "text_encoder"):
                self._parts[part] = _PartReader(folder, part)
            unet, vae, te = self._parts["unet"], self._parts["vae"], self._parts["text_encoder"]
            v2 = te.config.get("hidden_act") == "gelu" or unet.config.get("cross_attention_dim") == 1024
            vae_alias = _vae_key_aliases(list(vae.shapes))
            groups: list[tuple[_PartReader, Callable[[str], str], list[sd_keys.KeyLink]]] = [
                (unet, str, sd_keys.safe_links(lambda: sd_keys.unet_links(unet.shapes, unet.config), "UNet")),
                (vae, vae_alias.__getitem__, sd_keys.safe_links(
                    lambda: sd_keys.vae_links(vae_alias, len(vae.config["block_out_channels"])), "VAE")),
                (te, str, sd_keys.safe_links(lambda: sd_keys.text_encoder_links(te.shapes, v2), "text encoder")),
            ]
        except (UserError, KeyError, TypeError, ValueError) as err:
            self.close()
            if isinstance(err, UserError):
                raise
            raise UserError(f"{folder}: unexpected Diffusers config ({err!r})") from None
        # every LDM key -> the links (and readers) its tensor is made from
        self._links: dict[str, list[tuple[_PartReader, Callable[[str], str], sd_keys.KeyLink]]] = {}
        meta: dict[str, torch.Tensor] = {}
        all_links: list[sd_keys.KeyLink] = []
        for reader, file_key, links in groups:
            for link in links:
                self._links.setdefault(link.ldm_key, []).append((reader, file_key, link))
                meta[link.model_key] = torch.empty(reader.shapes[file_key(link.model_key)], device="meta")
                all_links.append(link)
        # LDM shapes without reading any weight: run the layout conversion on meta tensors
        shapes = {k: tuple(v.shape) for k, v in sd_keys.model_to_ldm(all_links, meta, v2).items()}
        # .bin weights are memory-mapped; model_to_ldm may hand their tensors through as views
        owned = all(reader.path.suffix == ".safetensors" for reader in self._parts.values())
        super().__init__(folder, shapes, v2, owns_tensors=owned)

    def get(self, key: str) -> torch.Tensor:
        entries = self._links[key]
        tensors = {link.model_key: reader.get(file_key(link.model_key)) for reader, file_key, link in entries}
        return sd_keys.model_to_ldm([link for _, _, link in entries], tensors, self.v2)[key]

    def close(self) -> None:
        for reader in self._parts.values():
            reader.close()


def open_checkpoint_tensors(path: str | Path) -> CheckpointTensors:
    """A single file or a Diffusers folder as LDM-named tensors (UserError for anything else)."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path}: model not found (expected a .safetensors/.ckpt file or a local Diffusers folder; "
            "Hugging Face hub ids are not downloaded)"
        )
    if path.is_dir():
        return DiffusersTensors(path)
    return SingleFileTensors(path)


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def ldm_shape_fits(shape: tuple[int, ...], reference: tuple[int, ...]) -> bool:
    """Same shape, or the same matrix stored as Linear [o, i] vs Conv 1x1 [o, i, 1, 1]."""
    return shape == reference or _as_matrix(shape) == _as_matrix(reference)


def describe(source: CheckpointTensors) -> str:
    return "SD 2.x" if source.v2 else "SD 1.x"


def check_same_architecture(sources: list[CheckpointTensors]) -> None:
    """All models must be the same SD version with the same tensor shapes as the first."""
    first = sources[0]
    for other in sources[1:]:
        if other.v2 != first.v2:
            raise UserError(f"{other.path} is an {describe(other)} model but {first.path} is {describe(first)}")
        for key, shape in other.shapes.items():
            reference = first.shapes.get(key)
            if reference is not None and not ldm_shape_fits(shape, reference):
                raise UserError(
                    f"{other.path}: tensor '{key}' has shape {list(shape)} but {first.path} has {list(reference)} "
                    "(models of different architectures cannot be merged)"
                )


def shape_like(tensor: torch.Tensor, reference: Mapping[str, tuple[int, ...]], key: str) -> torch.Tensor:
    """`tensor` in the first model's layout (see ldm_shape_fits)."""
    shape = tuple(reference[key])
    return tensor if tuple(tensor.shape) == shape else tensor.reshape(shape)
