"""LDM ("original SD" single file) <-> diffusers / transformers key conversion.

Each model part yields a list of `KeyLink`s pairing a key of the diffusers/transformers
model with its key in the LDM file. The links are derived from the model's own key list
and its config (number of levels, layers per block, which levels have attention), never
from fixed indices, so they hold for any SD-shaped model. Two executors apply the links in
either direction and handle the few tensors whose layout differs between the formats:
the v2 text encoder's fused q/k/v, Conv 1x1 <-> Linear (VAE mid attention, v2 UNet
proj_in/out) and the last OpenCLIP block that SD2 does not use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from library.errors import UserError
from library.sd_config import TE_V1_PREFIX, TE_V2_PREFIX, UNET_PREFIX, VAE_PREFIX

HF_TEXT_MODEL = "text_model."


@dataclass(frozen=True)
class KeyLink:
    """One model tensor and where it lives in an LDM file."""

    model_key: str
    ldm_key: str
    chunk: int | None = None  # v2 text encoder: q/k/v are chunks 0/1/2 of `in_proj_*`


# ---------------------------------------------------------------- UNet
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet_inner(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET_TO_LDM:
        raise KeyError(rest)
    return f"{_RESNET_TO_LDM[head]}.{tail}"


def unet_key_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """LDM key (below `model.diffusion_model.`) of a diffusers UNet2DConditionModel key."""
    step = int(config["layers_per_block"]) + 1
    up_has_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for src, dst in fixed.items():
        if key.startswith(src):
            return dst + key[len(src):]
    # LDM numbers resnet/attention layers across levels; input_blocks.0 is conv_in
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        ldm_blocks, first = ("input_blocks", 1) if m[1] == "down" else ("output_blocks", 0)
        index = step * int(m[2]) + int(m[4]) + first
        if m[3] == "resnets":
            return f"{ldm_blocks}.{index}.0.{_resnet_inner(m[5])}"
        return f"{ldm_blocks}.{index}.1.{m[5]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{step * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_inner(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        slot = 2 if up_has_attn[i] else 1
        return f"output_blocks.{step * i + step - 1}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def unet_links(model_keys: Iterable[str], config: Mapping[str, Any]) -> list[KeyLink]:
    return [KeyLink(k, UNET_PREFIX + unet_key_to_ldm(k, config)) for k in model_keys]


# ---------------------------------------------------------------- VAE
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.")


def vae_key_to_ldm(key: str, num_levels: int) -> str:
    """LDM key (below `first_stage_model.`) of a diffusers AutoencoderKL key."""
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        for src, dst in _VAE_ATTN_TO_LDM.items():
            if m[2].startswith(src + "."):
                return f"{m[1]}.mid.attn_1.{dst}{m[2][len(src):]}"
        raise KeyError(key)
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # the LDM decoder numbers its levels from the highest resolution up
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.match(r"(encoder\.conv_in|encoder\.conv_out|decoder\.conv_in|decoder\.conv_out|quant_conv|post_quant_conv)\.", key):
        return key
    raise KeyError(key)


def vae_links(model_keys: Iterable[str], num_levels: int, prefix: str = VAE_PREFIX) -> list[KeyLink]:
    return [KeyLink(k, prefix + vae_key_to_ldm(k, num_levels)) for k in model_keys]


# ---------------------------------------------------------------- text encoders
def _strip_text_model(key: str) -> str:
    return key[len(HF_TEXT_MODEL):] if key.startswith(HF_TEXT_MODEL) else key


def is_position_ids(key: str) -> bool:
    return key.endswith("embeddings.position_ids")


def text_encoder_v1_links(model_keys: Iterable[str]) -> list[KeyLink]:
    """HF CLIP keys below `cond_stage_model.transformer.text_model.` (position_ids excluded)."""
    prefix = TE_V1_PREFIX + HF_TEXT_MODEL
    return [KeyLink(k, prefix + _strip_text_model(k)) for k in model_keys if not is_position_ids(k)]


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def text_encoder_v2_key_to_ldm(key: str) -> tuple[str, int | None]:
    """(OpenCLIP key below `cond_stage_model.model.`, q/k/v chunk) of an HF CLIP key."""
    inner = _strip_text_model(key)
    if inner == "embeddings.token_embedding.weight":
        return "token_embedding.weight", None
    if inner == "embeddings.position_embedding.weight":
        return "positional_embedding", None
    if inner.startswith("final_layer_norm."):
        return "ln_final." + inner[len("final_layer_norm."):], None
    if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", inner):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", "qkv".index(m[2])
    if m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", inner):
        if m[2] in _OPENCLIP_LAYER:
            return f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}", None
    raise KeyError(key)


def text_encoder_v2_links(model_keys: Iterable[str]) -> list[KeyLink]:
    links = []
    for k in model_keys:
        if is_position_ids(k):
            continue
        ldm_key, chunk = text_encoder_v2_key_to_ldm(k)
        links.append(KeyLink(k, TE_V2_PREFIX + ldm_key, chunk))
    return links


def text_encoder_links(model_keys: Iterable[str], v2: bool) -> list[KeyLink]:
    return text_encoder_v2_links(model_keys) if v2 else text_encoder_v1_links(model_keys)


def safe_links(make: Callable[[], list[KeyLink]], what: str) -> list[KeyLink]:
    """Run a link builder; an unmappable model key is a programming/config error worth a clear message."""
    try:
        return make()
    except KeyError as err:
        raise UserError(f"cannot map {what} key {err.args[0]!r} to the LDM layout") from None


# ---------------------------------------------------------------- executors
def _fit_shape(tensor: torch.Tensor, shape: torch.Size | tuple[int, ...], key: str, source: str) -> torch.Tensor:
    """Reshape between Conv 1x1 `[o,i,1,1]` and Linear `[o,i]`; anything else must match exactly."""
    shape = tuple(shape)
    if tuple(tensor.shape) == shape:
        return tensor
    squeezed_src = tuple(tensor.shape[:2]) if tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1) else None
    squeezed_dst = shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else None
    if tensor.dim() == 2 and squeezed_dst == tuple(tensor.shape):
        return tensor[:, :, None, None]
    if len(shape) == 2 and squeezed_src == shape:
        return tensor[:, :, 0, 0]
    raise UserError(f"{source}: tensor '{key}' has shape {list(tensor.shape)}, expected {list(shape)}")


def ldm_to_model(
    links: Iterable[KeyLink],
    get_tensor: Callable[[str], torch.Tensor],
    target_shapes: Mapping[str, torch.Size],
    source: str,
    dtype: torch.dtype | None = None,
    copy: bool = True,
    key_dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, torch.Tensor]:
    """Read the linked LDM tensors into a model state dict (reshaped, chunked, cast to `dtype`,
    or to `key_dtypes[model_key]` where given: each as it is read, so no full-precision copy of the
    whole model is held).

    `copy` makes every result own its memory (needed when `get_tensor` returns views of a
    memory-mapped file); tensors that are cast or split are new anyway.
    """
    out: dict[str, torch.Tensor] = {}
    # fused q/k/v tensors are read once and dropped after their third chunk
    fused_cache: dict[str, list] = {}
    for link in links:
        if link.chunk is None:
            tensor = get_tensor(link.ldm_key)
        else:
            entry = fused_cache.get(link.ldm_key)
            if entry is None:
                fused = get_tensor(link.ldm_key)
                if fused.shape[0] % 3 != 0:
                    raise UserError(f"{source}: tensor '{link.ldm_key}' cannot be split into q, k, v")
                entry = fused_cache[link.ldm_key] = [fused, 0]
            tensor = entry[0].chunk(3, dim=0)[link.chunk].clone()
            entry[1] += 1
            if entry[1] == 3:
                del fused_cache[link.ldm_key]
        tensor = _fit_shape(tensor, target_shapes[link.model_key], link.ldm_key, source)
        target = key_dtypes.get(link.model_key, dtype) if key_dtypes else dtype
        if target is not None and tensor.is_floating_point() and tensor.dtype != target:
            tensor = tensor.to(target)
        elif copy and link.chunk is None:
            # own the memory: the source may be a memory-mapped file that the user later replaces
            tensor = tensor.clone()
        out[link.model_key] = tensor.contiguous()
    return out


def _ldm_form(ldm_key: str, tensor: torch.Tensor, v2: bool) -> torch.Tensor:
    """LDM layout: VAE mid attention is Conv 1x1; UNet proj_in/out is Conv 1x1 in v1, Linear in v2."""
    if re.match(rf"{re.escape(VAE_PREFIX)}(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key):
        return tensor[:, :, None, None] if tensor.dim() == 2 else tensor
    if ldm_key.startswith(UNET_PREFIX) and re.search(r"\.proj_(in|out)\.weight$", ldm_key):
        if v2 and tensor.dim() == 4:
            return tensor[:, :, 0, 0]
        if not v2 and tensor.dim() == 2:
            return tensor[:, :, None, None]
    return tensor


def model_to_ldm(
    links: Iterable[KeyLink],
    state_dict: Mapping[str, torch.Tensor],
    v2: bool,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Write a model state dict under LDM names (q/k/v fused again, LDM tensor layouts)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for link in links:
        tensor = state_dict[link.model_key].detach()
        if tensor.device.type not in ("cpu", "meta"):
            tensor = tensor.cpu()  # files must not hold GPU tensors
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if link.chunk is None:
            out[link.ldm_key] = _ldm_form(link.ldm_key, tensor, v2).contiguous()
            continue
        parts = pending.setdefault(link.ldm_key, {})
        parts[link.chunk] = tensor
        if len(parts) == 3:
            out[link.ldm_key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
            del pending[link.ldm_key]
    if pending:
        raise ValueError(f"incomplete q/k/v for {sorted(pending)}")
    return out


def fabricate_openclip_extras(ldm_sd: dict[str, torch.Tensor], num_hf_layers: int) -> None:
    """Add what an OpenCLIP text tower has but SD2's HF encoder lacks (SPEC 1.6).

    The last resblock (unused by SD2) becomes a copy of the one before, `text_projection`
    ones and `logit_scale` 1, so other tools that expect a complete OpenCLIP model load it.
    """
    src = f"{TE_V2_PREFIX}transformer.resblocks.{num_hf_layers - 1}."
    dst = f"{TE_V2_PREFIX}transformer.resblocks.{num_hf_layers}."
    for key in [k for k in ldm_sd if k.startswith(src)]:
        ldm_sd[dst + key[len(src):]] = ldm_sd[key].clone()
    token = ldm_sd[f"{TE_V2_PREFIX}token_embedding.weight"]
    hidden = token.shape[1]
    ldm_sd[f"{TE_V2_PREFIX}text_projection"] = torch.ones((hidden, hidden), dtype=token.dtype)
    ldm_sd[f"{TE_V2_PREFIX}logit_scale"] = torch.tensor(1.0, dtype=token.dtype)
