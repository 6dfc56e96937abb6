"""Where each LoRA target layer's weight lives in an SD 1.x/2.x model, read one tensor at a time.

The LoRA tools need the weights of the layers a LoRA wraps (to merge into them, or to take
the difference of two models) but never a whole model at once. `ModelTargets.open` builds
the UNet and text encoder on the meta device (no memory) from the configs the loader infers
(`library.sd_config`, or a Diffusers folder's config.json), names their target layers with
the network's own discovery (`networks.lora_keys`), and links every target to its tensor in
the file through `library.sd_keys` (LDM single files; the v2 text encoder's q/k/v are chunks
of the fused `in_proj_weight`) or by its own key (Diffusers folders). `get(name)` then reads
just that tensor.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from library import sd_config, sd_keys
from library.errors import UserError
from library.model_util import LdmFile, SafetensorsReader
from library.safe_unpickle import load_pickle_checkpoint
from networks.lora_keys import TargetLayer, find_text_encoder_layers, find_unet_layers

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class TargetLocation:
    """A LoRA target layer's weight: its shape in the model and its tensor in the file."""

    lora_name: str
    kind: str  # networks.lora_keys KIND_*
    shape: tuple[int, ...]  # the model layer's weight shape
    file_key: str
    chunk: Optional[int] = None  # q/k/v chunk of a fused v2 `in_proj_weight`
    c3lier_only: bool = False  # a ResNet / up- / down-sampler layer: targeted only by C3Lier (conv_dim)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Flattened input size (in · k · k for a conv)."""
        size = 1
        for dim in self.shape[1:]:
            size *= dim
        return size


def _module_paths(root: torch.nn.Module) -> dict[int, str]:
    return {id(module): path for path, module in root.named_modules()}


def _locations(
    layers: list[TargetLayer],
    root: torch.nn.Module,
    locate: Callable[[str], tuple[str, Optional[int]]],
    c3lier: frozenset[str] | set[str] = frozenset(),
) -> dict[str, TargetLocation]:
    paths = _module_paths(root)
    out = {}
    for layer in layers:
        model_key = paths[id(layer.module)] + ".weight"
        file_key, chunk = locate(model_key)
        shape = tuple(layer.module.weight.shape)
        out[layer.lora_name] = TargetLocation(layer.lora_name, layer.kind, shape, file_key, chunk, layer.lora_name in c3lier)
    return out


def _unet_locations(unet: torch.nn.Module, locate: Callable[[str], tuple[str, Optional[int]]]) -> dict[str, TargetLocation]:
    lierla = {layer.lora_name for layer in find_unet_layers(unet, False)}
    layers = find_unet_layers(unet, True)
    return _locations(layers, unet, locate, {layer.lora_name for layer in layers} - lierla)


class ModelTargets:
    """Lazy access to the LoRA target-layer weights of one SD model (single file or Diffusers folder)."""

    def __init__(self, path: Path, v2: bool, targets: dict[str, TargetLocation], readers: dict[str, Any]) -> None:
        self.path = path
        self.v2 = v2
        self.targets = targets
        self._readers = readers  # "unet" / "te" / "ldm" -> object with get(key)

    @property
    def ldm(self) -> Optional[LdmFile]:
        """The open single file (None for a Diffusers folder)."""
        return self._readers.get("ldm")

    @classmethod
    def open(cls, path: PathLike, v2: bool = False) -> "ModelTargets":
        """Map an SD model: `.safetensors` / `.ckpt` single file or a local Diffusers folder.

        `v2=True` (`--v2`) on an SD 1.x model is an error; SD 2.x is otherwise detected."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: model not found (expected a .safetensors/.ckpt file or a Diffusers folder)")
        if path.is_dir():
            targets = cls._open_folder(path)
        else:
            targets = cls._open_single_file(path)
        if v2 and not targets.v2:
            targets.close()
            raise UserError(f"{path}: --v2 was given but this is an SD 1.x model")
        return targets

    @classmethod
    def _open_single_file(cls, path: Path) -> "ModelTargets":
        from accelerate import init_empty_weights  # model classes only once a model is opened
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        ldm = LdmFile(path)
        try:
            if any(k.startswith("conditioner.embedders.") for k in ldm.shapes):
                raise UserError(f"{path}: this is an SDXL model; only SD 1.x / 2.x models are supported")
            if not any(k.startswith(sd_config.UNET_PREFIX) for k in ldm.shapes):
                raise UserError(f"{path}: not a Stable Diffusion checkpoint (no '{sd_config.UNET_PREFIX}' keys)")
            v2 = sd_config.is_v2_ldm(ldm.shapes)
            unet_config = sd_config.infer_unet_config(ldm.shapes, v2)
            te_config = CLIPTextConfig(**sd_config.infer_text_encoder_config(ldm.shapes, v2))
            with init_empty_weights():
                unet = UNet2DConditionModel.from_config(unet_config)
                text_encoder = CLIPTextModel(te_config)

            def locate_unet(key: str) -> tuple[str, Optional[int]]:
                return sd_keys.unet_links([key], unet_config)[0].ldm_key, None

            def locate_te(key: str) -> tuple[str, Optional[int]]:
                link = sd_keys.text_encoder_links([key], v2)[0]
                if not v2 and link.ldm_key not in ldm:
                    # old v1 files store the HF CLIP keys without the `text_model.` level
                    with_level = sd_config.TE_V1_PREFIX + sd_keys.HF_TEXT_MODEL
                    return sd_config.TE_V1_PREFIX + link.ldm_key[len(with_level):], None
                return link.ldm_key, link.chunk

            targets = _unet_locations(unet, locate_unet)
            targets.update(_locations(find_text_encoder_layers(text_encoder), text_encoder, locate_te))
        except UserError as err:
            ldm.close()
            raise err if str(path) in str(err) else UserError(f"{path}: {err}") from None
        except KeyError as err:
            ldm.close()
            raise UserError(f"{path}: cannot map key {err.args[0]!r} to the LDM layout") from None
        for location in targets.values():
            if location.file_key not in ldm:
                ldm.close()
                raise UserError(f"{path}: key '{location.file_key}' is missing; not a complete SD checkpoint")
        return cls(path, v2, targets, {"ldm": ldm, "unet": ldm, "te": ldm})

    @classmethod
    def _open_folder(cls, path: Path) -> "ModelTargets":
        for part in ("unet", "text_encoder"):
            if not (path / part / "config.json").is_file():
                raise UserError(f"{path}: not a Diffusers model folder ('{part}/config.json' is missing)")
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        try:
            unet_config = UNet2DConditionModel.load_config(str(path / "unet"))
            te_config = CLIPTextConfig.from_pretrained(str(path / "text_encoder"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot read the Diffusers configs ({str(err).splitlines()[0]})") from None
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(unet_config)
            text_encoder = CLIPTextModel(te_config)
        v2 = te_config.hidden_act == "gelu" or unet.config.cross_attention_dim == 1024
        unet_reader = _FolderWeights.open(path / "unet", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
        te_reader = _FolderWeights.open(path / "text_encoder", ("model.safetensors", "pytorch_model.bin"))

        def locate_te(key: str) -> tuple[str, Optional[int]]:
            # transformers 4.x files hold `text_model.` keys, 5.x models may omit the level
            inner = key[len(sd_keys.HF_TEXT_MODEL):] if key.startswith(sd_keys.HF_TEXT_MODEL) else key
            with_level = sd_keys.HF_TEXT_MODEL + inner
            return (with_level if with_level in te_reader else inner), None

        targets = _unet_locations(unet, lambda key: (key, None))
        targets.update(_locations(find_text_encoder_layers(text_encoder), text_encoder, locate_te))
        for name, location in targets.items():
            reader = te_reader if name.startswith("lora_te") else unet_reader
            if location.file_key not in reader:
                unet_reader.close()
                te_reader.close()
                raise UserError(f"{reader.path}: weight '{location.file_key}' is missing")
        return cls(path, v2, targets, {"unet": unet_reader, "te": te_reader})

    def get(self, lora_name: str) -> torch.Tensor:
        """The weight of one target layer in the model's layout (a new tensor the caller owns)."""
        location = self.targets[lora_name]
        reader = self._readers["te" if lora_name.startswith("lora_te") else "unet"]
        tensor = reader.get(location.file_key)
        if location.chunk is not None:
            tensor = tensor.chunk(3, dim=0)[location.chunk]
        if tuple(tensor.shape) != location.shape:
            # Linear [o, i] <-> Conv 1x1 [o, i, 1, 1] (v2 proj_in / proj_out)
            tensor = tensor.reshape(location.shape)
        return tensor.clone()

    def close(self) -> None:
        for reader in {id(r): r for r in self._readers.values()}.values():
            reader.close()
        self._readers = {}

    def __enter__(self) -> "ModelTargets":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FolderWeights:
    """The weights file of one Diffusers model folder, read one tensor at a time."""

    def __init__(self, path: Path, get: Callable[[str], torch.Tensor], keys: set[str], close: Callable[[], None]) -> None:
        self.path = path
        self._get = get
        self._keys = keys
        self._close = close

    @classmethod
    def open(cls, folder: Path, names: tuple[str, str]) -> "_FolderWeights":
        safetensors_file, bin_file = folder / names[0], folder / names[1]
        if safetensors_file.is_file():
            reader = SafetensorsReader(safetensors_file)
            return cls(safetensors_file, reader.get_tensor, set(reader.shapes), reader.close)
        if bin_file.is_file():
            state_dict = load_pickle_checkpoint(bin_file, mmap=True)
            if not isinstance(state_dict, dict):
                raise UserError(f"{bin_file}: not a dict of tensors")
            return cls(bin_file, state_dict.__getitem__, set(state_dict), state_dict.clear)
        raise UserError(f"{folder}: no {names[0]} or {names[1]} (sharded weights are not supported)")

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)

    def close(self) -> None:
        self._close()
