"""Load the U-Net, VAE and text encoder of a Diffusers model folder.

Each model is built empty from its `config.json` and its `.safetensors` weights are taken one
tensor at a time (`model_util.SafetensorsReader`). As diffusers' and transformers'
`from_pretrained` do, every tensor stored in the load dtype is a (copy-on-write) mapping of the
file, so results are those of loading through `from_pretrained` bit for bit (they differ in low
bits from the same model's single file, which is read into aligned memory where it matters:
`weight_mapping`). What reading it here adds: weights stored in fp8 are cast one by one as they
are read (`fp8_layers`; from_pretrained would hold the whole model in the load dtype first), and
each tensor has its own mapping, so freed weights leave the process's resident memory. A folder
laid out otherwise (`.bin` weights, sharded or variant files, other key names) loads through
`from_pretrained`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from library import fp8_layers, sd_keys
from library.errors import UserError
from library.model_util import SafetensorsReader, assign_weights

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = "model.safetensors"
PARTS = ("unet", "vae", "text_encoder")


def check_folder(path: Path) -> None:
    for part in PARTS:
        if not (path / part / "config.json").is_file():
            raise UserError(f"{path}: not a Diffusers model folder ('{part}/config.json' is missing)")


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / 'config.json'}: cannot read the model config ({err})") from None


def _model_key(file_key: str, model_keys: set[str]) -> str | None:
    """The model's name for a file key: transformers' CLIP files name keys `text_model.*`, which
    newer CLIPTextModel classes do not (from_pretrained renames them); None for a `position_ids`
    buffer the model does not store."""
    if file_key in model_keys:
        return file_key
    prefix = sd_keys.HF_TEXT_MODEL
    renamed = file_key[len(prefix):] if file_key.startswith(prefix) else prefix + file_key
    if renamed in model_keys:
        return renamed
    return None if sd_keys.is_position_ids(file_key) else file_key


def _read_weights(model: nn.Module, weights: Path, dtype: torch.dtype, fp8: bool, what: str) -> nn.Module:
    """Fill an empty `model` from `weights`, tensor by tensor: mapped where the file holds the
    tensor in `dtype`, else read and cast (to `dtype`, or to fp8 for the fp8 layers)."""
    fp8_keys = fp8_layers.layer_weight_keys(model) if fp8 else set()
    model_keys = set(model.state_dict())
    reader = SafetensorsReader(weights)
    try:
        state: dict[str, torch.Tensor] = {}
        for file_key in reader.shapes:
            key = _model_key(file_key, model_keys)
            if key is None:
                continue
            target = fp8_layers.FP8_DTYPE if key in fp8_keys else dtype
            tensor = None
            if key not in fp8_keys and reader.dtype(file_key) == dtype:
                tensor = reader.map_tensor(file_key)
            if tensor is None:
                tensor = reader.get_tensor(file_key)
                if tensor.is_floating_point() and tensor.dtype != target:
                    tensor = tensor.to(target)
            state[key] = tensor
    finally:
        reader.close()
    assign_weights(model, state, weights, what)
    return model


def _unet(folder: Path, dtype: torch.dtype, fp8: bool) -> nn.Module:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(_read_config(folder))
    return _read_weights(unet, folder / DIFFUSERS_WEIGHTS, dtype, fp8, "UNet")


def _text_encoder(folder: Path, dtype: torch.dtype, fp8: bool) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**_read_config(folder))  # what from_json_file does, with a clear error
    with init_empty_weights():
        text_encoder = CLIPTextModel(config)
    return _read_weights(text_encoder, folder / TEXT_ENCODER_WEIGHTS, dtype, fp8, "text encoder")


def _vae(folder: Path, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        vae = AutoencoderKL.from_config(_read_config(folder))
    return _read_weights(vae, folder / DIFFUSERS_WEIGHTS, dtype, False, "VAE")


def _from_pretrained(path: Path, part: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    try:
        if part == "text_encoder":
            return CLIPTextModel.from_pretrained(str(path), subfolder=part, dtype=dtype)
        model_class = UNet2DConditionModel if part == "unet" else AutoencoderKL
        return model_class.from_pretrained(str(path), subfolder=part, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot load Diffusers model ({first_line})") from None


def load_folder_models(
    path: Path, dtype: torch.dtype, with_vae: bool = True, fp8_models: tuple[str, ...] = (),
) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    """(unet, vae or None, text_encoder) of a Diffusers folder in `dtype`; `fp8_models` as
    `model_util.load_target_model` has it."""
    check_folder(path)
    weights = {"unet": path / "unet" / DIFFUSERS_WEIGHTS, "vae": path / "vae" / DIFFUSERS_WEIGHTS,
               "text_encoder": path / "text_encoder" / TEXT_ENCODER_WEIGHTS}
    readers = {
        "unet": lambda: _unet(path / "unet", dtype, "unet" in fp8_models),
        "vae": lambda: _vae(path / "vae", dtype),
        "text_encoder": lambda: _text_encoder(path / "text_encoder", dtype, "text_encoder" in fp8_models),
    }
    models: dict[str, nn.Module | None] = {}
    for part in PARTS:
        if part == "vae" and not with_vae:
            models[part] = None
            continue
        if weights[part].is_file():
            try:
                models[part] = readers[part]()
                if part == "text_encoder":  # as transformers' from_pretrained records them
                    models[part].config._name_or_path = str(path)
                    models[part].config.dtype = dtype
                else:  # as diffusers' from_pretrained records it
                    models[part].register_to_config(_name_or_path=str(path))
                continue
            except (UserError, RuntimeError) as err:  # other key names (old VAE attention, ...) or shapes
                logger.info("%s: %s; loading through from_pretrained", path / part, str(err).splitlines()[0])
        else:
            logger.info("%s: no %s, loading through from_pretrained", path / part, weights[part].name)
        models[part] = _from_pretrained(path, part, dtype)
    return models["unet"], models["vae"], models["text_encoder"]
