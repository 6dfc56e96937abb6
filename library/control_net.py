"""SD 1.x ControlNet files: load into diffusers `ControlNetModel`, save, and apply per step.

Two file layouts exist:

- **original** (lllyasviel's `control_sd15_*.pth` / `.safetensors`, what sd-scripts reads):
  keys below `control_model.`: the copied UNet encoder under its LDM names (`time_embed`,
  `input_blocks`, `middle_block`), the zero convolutions `zero_convs.{i}.0`, the
  `middle_block_out.0` convolution and the hint encoder `input_hint_block.{0,2,4,...}`
  (convolutions with SiLUs between them at the odd indices). A file with a `difference`
  key ("Transfer Control") stores the UNet part as a difference to the base UNet.
- **diffusers**: a `ControlNetModel.save_pretrained` folder, or a single `.safetensors` with
  diffusers key names.

The UNet part's key names come from `library.sd_keys.unet_key_to_ldm` (the same links the
model loader uses), so no second map exists. Configs are inferred from the weights with
`library.sd_config.infer_unet_config`, which also makes tiny ControlNets load.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from library import sd_config, sd_keys
from library.control_hint import get_preprocessor, prepare_hint
from library.errors import UserError
from library.io_util import atomic_dir, atomic_path
from library.model_util import LdmFile, assign_weights, finish_model, error_with_path

if TYPE_CHECKING:  # diffusers is imported when a ControlNet is built: the generator's checks run first
    from diffusers import ControlNetModel, UNet2DConditionModel

logger = logging.getLogger(__name__)

CONTROL_PREFIX = "control_model."
DIFFERENCE_KEY = "difference"
_HINT = "controlnet_cond_embedding."

# ControlNetModel arguments that come straight from the inferred UNet config
_SHARED_CONFIG_KEYS = (
    "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "norm_num_groups",
    "cross_attention_dim", "attention_head_dim", "use_linear_projection", "upcast_attention",
    "transformer_layers_per_block",
)


# ---------------------------------------------------------------- key links
def _unet_part_config(layers_per_block: int) -> dict[str, Any]:
    # a ControlNet has no up blocks, so the up-block layout the UNet links consult is empty
    return {"layers_per_block": layers_per_block, "up_block_types": []}


def control_key_to_original(key: str, layers_per_block: int, num_hint_blocks: int) -> str:
    """Original-layout key (with `control_model.`) of a diffusers ControlNetModel key."""
    if key.startswith(_HINT):
        rest = key[len(_HINT):]
        if rest.startswith("conv_in."):
            return f"{CONTROL_PREFIX}input_hint_block.0.{rest[len('conv_in.'):]}"
        if rest.startswith("conv_out."):
            return f"{CONTROL_PREFIX}input_hint_block.{2 * (num_hint_blocks + 1)}.{rest[len('conv_out.'):]}"
        if m := re.match(r"blocks\.(\d+)\.(.+)", rest):
            return f"{CONTROL_PREFIX}input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
        raise KeyError(key)
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"{CONTROL_PREFIX}zero_convs.{m[1]}.0.{m[2]}"
    if key.startswith("controlnet_mid_block."):
        return f"{CONTROL_PREFIX}middle_block_out.0.{key[len('controlnet_mid_block.'):]}"
    return CONTROL_PREFIX + sd_keys.unet_key_to_ldm(key, _unet_part_config(layers_per_block))


def _num_hint_blocks(keys: Iterable[str]) -> int:
    return len({m[1] for k in keys if (m := re.match(rf"{re.escape(_HINT)}blocks\.(\d+)\.", k))})


def control_links(model_keys: Iterable[str], layers_per_block: int) -> list[sd_keys.KeyLink]:
    """Links between ControlNetModel keys and original-layout keys."""
    model_keys = list(model_keys)
    hint_blocks = _num_hint_blocks(model_keys)
    return [sd_keys.KeyLink(k, control_key_to_original(k, layers_per_block, hint_blocks)) for k in model_keys]


# ---------------------------------------------------------------- config inference
def infer_control_net_config(shapes: Mapping[str, Sequence[int]], v2: bool = False) -> dict[str, Any]:
    """ControlNetModel config from the tensor shapes of an original-layout file."""
    unet_shapes = {
        sd_config.UNET_PREFIX + k[len(CONTROL_PREFIX):]: s for k, s in shapes.items() if k.startswith(CONTROL_PREFIX)
    }
    conv_in = unet_shapes.get(f"{sd_config.UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is None:
        raise UserError(f"not a ControlNet: key '{CONTROL_PREFIX}input_blocks.0.0.weight' is missing")
    # the UNet inference reads the output conv's channels, which a ControlNet lacks; they are unused here
    unet_shapes[f"{sd_config.UNET_PREFIX}out.2.weight"] = (conv_in[1], conv_in[0], 3, 3)
    unet_config = sd_config.infer_unet_config(unet_shapes, v2)
    if "time_embedding_dim" in unet_config:
        raise UserError("unsupported ControlNet layout: time embedding width is not 4x the first block's channels")
    config = {k: unet_config[k] for k in _SHARED_CONFIG_KEYS if k in unet_config}

    hint_ids = sorted(
        int(m[1]) for k in shapes if (m := re.match(rf"{re.escape(CONTROL_PREFIX)}input_hint_block\.(\d+)\.weight$", k))
    )
    if len(hint_ids) < 2 or hint_ids != list(range(0, 2 * len(hint_ids), 2)) or len(hint_ids) % 2:
        raise UserError(f"unsupported ControlNet layout: hint encoder convolutions at {hint_ids}")
    hint_shape = [shapes[f"{CONTROL_PREFIX}input_hint_block.{i}.weight"] for i in hint_ids]
    # conv_in, then pairs (same width, then stride-2 to the next width), then conv_out
    config["conditioning_channels"] = int(hint_shape[0][1])
    config["conditioning_embedding_out_channels"] = [int(hint_shape[0][0])] + [
        int(s[0]) for s in hint_shape[2:-1:2]
    ]
    return config


# ---------------------------------------------------------------- loading
def load_control_net(
    path: str | Path,
    v2: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    base_unet: UNet2DConditionModel | None = None,
) -> ControlNetModel:
    """Load a ControlNet from an original-layout file, a diffusers-layout file or a diffusers folder.

    `base_unet` is needed only for "Transfer Control" files (a `difference` key), whose UNet
    part is stored relative to the base model. Returned in eval mode.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: ControlNet not found")
    if path.is_dir():
        return finish_model(_load_folder(path, dtype), dtype, device)
    with LdmFile(path) as ldm:
        try:
            if f"{CONTROL_PREFIX}input_blocks.0.0.weight" in ldm:
                model = _load_original(ldm, v2, dtype, base_unet)
            elif "controlnet_cond_embedding.conv_in.weight" in ldm:
                model = _load_diffusers_file(ldm, v2, dtype)
            else:
                raise UserError("not a ControlNet (neither 'control_model.*' nor 'controlnet_cond_embedding.*' keys)")
        except UserError as err:
            raise error_with_path(err, path) from None
    logger.info("ControlNet loaded from %s", path)
    return finish_model(model, dtype, device)


def _load_folder(path: Path, dtype: torch.dtype) -> ControlNetModel:
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a diffusers ControlNet folder (no config.json)")
    from diffusers import ControlNetModel

    try:
        return ControlNetModel.from_pretrained(str(path), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot load diffusers ControlNet ({first_line})") from None


def _build(
    shapes: Mapping[str, Sequence[int]], get, source: Path, v2: bool, dtype: torch.dtype, copy: bool
) -> ControlNetModel:
    """Build a ControlNetModel from original-layout shapes and a getter of original-layout tensors."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    config = infer_control_net_config(shapes, v2)
    with init_empty_weights():
        model = ControlNetModel(**config)
    model_shapes = {k: v.shape for k, v in model.state_dict().items()}
    links = sd_keys.safe_links(lambda: control_links(model_shapes, config["layers_per_block"]), "ControlNet")
    missing = [link.ldm_key for link in links if link.ldm_key not in shapes]
    if missing:
        raise UserError(f"ControlNet key '{missing[0]}' is missing ({len(missing)} keys in all)")
    assign_weights(model, sd_keys.ldm_to_model(links, get, model_shapes, str(source), dtype, copy=copy), source, "ControlNet")
    return model


def _load_original(ldm: LdmFile, v2: bool, dtype: torch.dtype, base_unet: UNet2DConditionModel | None) -> ControlNetModel:
    if DIFFERENCE_KEY not in ldm:
        return _build(ldm.shapes, ldm.get, ldm.path, v2, dtype, copy=ldm.mapped)
    if base_unet is None:
        raise UserError("a 'Transfer Control' ControlNet (difference file) needs the base UNet")
    base = _base_unet_original(base_unet)

    def base_plus_difference(key: str) -> torch.Tensor:
        tensor = ldm.get(key)
        return tensor + base[key].to(tensor.device, tensor.dtype) if key in base else tensor

    logger.info("ControlNet %s stores differences to the base UNet", ldm.path)
    return _build(ldm.shapes, base_plus_difference, ldm.path, v2, dtype, copy=ldm.mapped)


def _base_unet_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The base UNet's encoder weights under original ControlNet names."""
    state = unet.state_dict()
    config = unet.config
    out = {}
    for key, tensor in state.items():
        if key.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")):
            out[CONTROL_PREFIX + sd_keys.unet_key_to_ldm(key, config)] = tensor
    return out


def _load_diffusers_file(ldm: LdmFile, v2: bool, dtype: torch.dtype) -> ControlNetModel:
    layers = len({m[1] for k in ldm.keys() if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))})
    if layers == 0:
        raise UserError("not a ControlNet: no 'down_blocks.0.resnets.*' keys")
    links = sd_keys.safe_links(lambda: control_links(ldm.keys(), layers), "ControlNet")
    to_source = {link.ldm_key: link.model_key for link in links}
    shapes = {original: ldm.shapes[key] for original, key in to_source.items()}
    return _build(shapes, lambda k: ldm.get(to_source[k]), ldm.path, v2, dtype, copy=ldm.mapped)


# ---------------------------------------------------------------- saving
def control_net_original_state_dict(model: ControlNetModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under original-layout names (CPU, contiguous, optionally cast)."""
    state = model.state_dict()
    links = control_links(state, model.config.layers_per_block)
    # proj_in/out keep the model's own form: SD1.x (conv) and v2 (linear) files store it the same way
    return sd_keys.model_to_ldm(links, state, v2=bool(model.config.use_linear_projection), dtype=dtype)


def save_control_net(
    model: ControlNetModel, path: str | Path, layout: str = "original", dtype: torch.dtype | None = None
) -> Path:
    """Write a ControlNet atomically.

    `layout="original"`: one `.safetensors` with `control_model.*` keys (what sd-scripts and
    A1111's extension read). `layout="diffusers"`: a `save_pretrained` folder, or when `path`
    ends in `.safetensors` a single file with diffusers key names.
    """
    path = Path(path)
    if layout == "original":
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"{path}: original-layout ControlNets are written as .safetensors")
        tensors = control_net_original_state_dict(model, dtype)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
    elif layout == "diffusers":
        if path.suffix.lower() == ".safetensors":
            tensors = {
                k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                for k, v in model.state_dict().items()
            }
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
        else:
            with atomic_dir(path) as tmp:
                saved = model.to(dtype) if dtype is not None else model
                saved.save_pretrained(str(tmp), safe_serialization=True)
    else:
        raise UserError(f"unknown ControlNet layout '{layout}' (expected original or diffusers)")
    return path


# ---------------------------------------------------------------- per-step application
@dataclass
class ControlNetUnit:
    """One `--control_net_models` entry with its weight, ratio and hint.

    `hint` is `Tensor[B or 1, C, H, W]` in [0, 1] at image resolution
    (`library.control_hint.prepare_hint`). `ratio` is the fraction of the steps (from the
    start) in which the ControlNet is active; `weight` scales its residuals.
    """

    model: ControlNetModel
    hint: torch.Tensor
    weight: float = 1.0
    ratio: float = 1.0


@dataclass
class ControlNetSpec:
    """A loaded `--control_net_models` entry with its preprocessor, weight and ratio (no hint yet)."""

    model: ControlNetModel
    preprocessor: Callable[[np.ndarray], np.ndarray] | None = None
    weight: float = 1.0
    ratio: float = 1.0


def _nth(values: Sequence[Any] | None, index: int, default: Any) -> Any:
    return values[index] if values and index < len(values) else default


def load_control_nets(
    models: Sequence[str | Path],
    preps: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    ratios: Sequence[float] | None = None,
    v2: bool = False,
    base_unet: UNet2DConditionModel | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> list[ControlNetSpec]:
    """The `--control_net_models / _preps / _weights / _ratios` lists, position by position.

    As sd-scripts, a missing entry means no preprocessor, weight 1.0, ratio 1.0.
    """
    specs = []
    for i, path in enumerate(models):
        specs.append(
            ControlNetSpec(
                model=load_control_net(path, v2=v2, dtype=dtype, device=device, base_unet=base_unet),
                preprocessor=get_preprocessor(_nth(preps, i, None)),
                weight=float(_nth(weights, i, 1.0)),
                ratio=float(_nth(ratios, i, 1.0)),
            )
        )
    return specs


def make_units(
    specs: Sequence[ControlNetSpec],
    guide_images: Sequence[np.ndarray | Image.Image],
    width: int,
    height: int,
    batch_size: int = 1,
) -> list[ControlNetUnit]:
    """Hints for one batch (`--guide_image_path` images, resized to `width` × `height`).

    One guide image serves every ControlNet and every batch item; with several, batch item
    `b` of ControlNet `i` uses image `(b * len(specs) + i) % len(guide_images)` (sd-scripts'
    order: item 1's hint for each ControlNet, then item 2's, ...).
    """
    if specs and not guide_images:
        raise UserError("ControlNet needs a hint image (--guide_image_path)")
    units = []
    for i, spec in enumerate(specs):
        indices = [0] if len(guide_images) == 1 else [(b * len(specs) + i) % len(guide_images) for b in range(batch_size)]
        hint = torch.cat([prepare_hint(guide_images[j], spec.preprocessor, width, height) for j in indices])
        units.append(ControlNetUnit(spec.model, hint, spec.weight, spec.ratio))
    return units


def active_unit(units: Sequence[ControlNetUnit], step: int, num_steps: int) -> ControlNetUnit | None:
    """The ControlNet used at `step` (0-based), or None when it is inactive.

    As sd-scripts: several ControlNets take turns (step modulo their count) rather than
    being summed, and the one whose turn it is stays off once `step / num_steps` exceeds
    its ratio.
    """
    if not units:
        return None
    unit = units[step % len(units)]
    return None if unit.ratio < step / max(num_steps, 1) else unit


def control_net_residuals(
    units: Sequence[ControlNetUnit],
    step: int,
    num_steps: int,
    latent_model_input: torch.Tensor,
    timestep: torch.Tensor | int | float,
    encoder_hidden_states: torch.Tensor,
) -> dict[str, Any]:
    """Keyword arguments for this step's UNet call: `unet(x, t, ehs, **control_net_residuals(...))`.

    Returns `{"down_block_additional_residuals": (...), "mid_block_additional_residual": ...}`,
    or `{}` when no ControlNet is active. The hint batch is repeated to the latent batch
    (classifier-free guidance doubles it). `encoder_hidden_states` is what the ControlNet
    sees; with regional prompts sd-scripts passes the last sub-prompt's embeddings.
    """
    unit = active_unit(units, step, num_steps)
    if unit is None:
        return {}
    batch = latent_model_input.shape[0]
    hint = unit.hint.to(latent_model_input.device, dtype=unit.model.dtype)
    if batch % hint.shape[0]:
        raise ValueError(f"hint batch {hint.shape[0]} does not divide latent batch {batch}")
    hint = hint.repeat(batch // hint.shape[0], 1, 1, 1)
    down, mid = unit.model(
        latent_model_input.to(unit.model.dtype),
        timestep,
        encoder_hidden_states=encoder_hidden_states.to(unit.model.dtype),
        controlnet_cond=hint,
        conditioning_scale=float(unit.weight),
        return_dict=False,
    )
    dtype = latent_model_input.dtype
    return {
        "down_block_additional_residuals": tuple(d.to(dtype) for d in down),
        "mid_block_additional_residual": mid.to(dtype),
    }
