"""LoRA-LierLa / LoRA-C3Lier networks for SD 1.x / 2.x, file-compatible with kohya-ss/sd-scripts.

A `LoRAModule` wraps one Linear / Conv2d layer of the UNet or text encoder by replacing the
layer's `forward` (the base model's module tree and state_dict keys stay untouched):
    y = W x + up(down(x)) * multiplier * alpha / rank
The network's own state_dict is the LoRA file: `<lora_name>.lora_down.weight`,
`<lora_name>.lora_up.weight`, `<lora_name>.alpha` (SPEC 2.1).
"""
from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.io_util import atomic_path
from library.model_hash import precalculate_safetensors_hashes
from library.safe_unpickle import load_pickle_checkpoint
from networks.lora_keys import (
    KIND_CONV3X3,
    LORA_PREFIX_TEXT_ENCODER,
    LORA_PREFIX_UNET,
    BlockDims,
    BlockLrWeights,
    TargetLayer,
    find_text_encoder_layers,
    find_unet_layers,
    layer_kind,
    parse_block_dims,
    parse_block_lr_weights,
    parse_float_arg,
    parse_int_arg,
    parse_optional_dropout,
    unet_block_index,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

KNOWN_NETWORK_ARGS = frozenset(
    {
        "conv_dim",
        "conv_alpha",
        "block_dims",
        "block_alphas",
        "conv_block_dims",
        "conv_block_alphas",
        "down_lr_weight",
        "mid_lr_weight",
        "up_lr_weight",
        "block_lr_zero_threshold",
        "rank_dropout",
        "module_dropout",
    }
)


def normalize_alpha(alpha: Any, rank: int) -> float:
    """alpha as a float; 0 / None means alpha = rank (scale 1)."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.detach().float().item()
    if alpha is None or alpha == 0:
        return float(rank)
    return float(alpha)


def load_lora_state_dict(file: PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA file (.safetensors, or .pt/.ckpt saved with torch.save) into a flat dict."""
    path = Path(file)
    if not path.is_file():
        raise UserError(f"LoRA weights file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            state_dict = load_file(str(path))
        else:
            state_dict = load_pickle_checkpoint(path, mmap=False)  # the one restricted unpickler
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
        raise UserError(f"cannot read LoRA weights file {path}: {err}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"LoRA weights file {path} does not hold a flat dict of tensors")
    return state_dict


def lora_delta_weight(
    down: torch.Tensor, up: torch.Tensor, alpha: Optional[torch.Tensor | float], target_shape: torch.Size
) -> torch.Tensor:
    """ΔW = up·down·alpha/rank in float32, reshaped to the target layer's weight shape.

    Works for Linear, 1x1 and 3x3 convs (up is always 1x1, so the 3x3 product is a plain matmul
    over the flattened input dimension). A missing alpha means scale 1.
    """
    rank = down.shape[0]
    scale = normalize_alpha(alpha, rank) / rank
    delta = up.float().flatten(1) @ down.float().flatten(1)
    return delta.reshape(target_shape) * scale


@torch.no_grad()
def add_delta_into_weight(
    layer: torch.nn.Module,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: Optional[torch.Tensor | float],
    multiplier: float,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> None:
    """W ← W + multiplier·ΔW of a LoRA's down / up / alpha (ΔW in float32, `lora_delta_weight`).

    Written into W's own storage when dtype and device stay: a new tensor per layer would leave
    the replaced originals as heap holes that the allocator does not return (measured: a merged
    full-size LoRA peaked 663 MiB above the unmerged run). The result equals the out-of-place
    sum rounded once to W's dtype.
    """
    weight = layer.weight
    device = torch.device(device) if device is not None else weight.device
    scaled = lora_delta_weight(down.to(device), up.to(device), alpha, weight.shape) * multiplier
    if weight.device == device and (dtype is None or dtype == weight.dtype):
        if weight.dtype == torch.float32:
            weight.data.add_(scaled)
        else:
            weight.data.copy_(weight.float() + scaled)
        return
    layer.weight.data = (weight.detach().to(device).float() + scaled).to(dtype or weight.dtype)


class BaseLoRAModule(torch.nn.Module):
    """Routing of a base layer's forward through an adapter, and merging into its weight."""

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float, lora_dim: int, alpha: Any):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.kind = layer_kind(org_module)
        if self.kind is None:
            raise TypeError(f"{lora_name}: LoRA supports Linear and Conv2d layers, not {type(org_module).__name__}")
        alpha = normalize_alpha(alpha, lora_dim)
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.multiplier = multiplier
        # a plain list keeps the base layer out of this module's parameters and state_dict
        self._org_module = [org_module]
        self.org_forward = None
        self._org_had_instance_forward = False
        # regional LoRA (library/regional_prompts.py): region(lora_name, output) -> weighted output
        self.region: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None

    @property
    def org_module(self) -> torch.nn.Module:
        return self._org_module[0]

    def apply_to(self) -> None:
        """Route the base layer's forward through this adapter."""
        org = self.org_module
        if org.__dict__.get("forward") == self.forward:
            return
        self._org_had_instance_forward = "forward" in org.__dict__
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Give the base layer its own forward back."""
        org = self.org_module
        if org.__dict__.get("forward") != self.forward:
            return
        if self._org_had_instance_forward:
            org.forward = self.org_forward
        else:
            del org.forward
        self.org_forward = None

    def _update_scale(self) -> None:
        self.scale = normalize_alpha(self.alpha, self.lora_dim) / self.lora_dim

    def merge_weights(
        self,
        down: torch.Tensor,
        up: torch.Tensor,
        alpha: Optional[torch.Tensor],
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        """Add multiplier·ΔW of the given weights into the base layer's weight."""
        add_delta_into_weight(self.org_module, down, up, alpha, self.multiplier, dtype, device)


class LoRAModule(BaseLoRAModule):
    """Low-rank adapter around one Linear / Conv2d layer."""

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: Any = 1.0,
        dropout: Optional[float] = None,
        rank_dropout: Optional[float] = None,
        module_dropout: Optional[float] = None,
    ) -> None:
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha)
        if isinstance(org_module, torch.nn.Conv2d):
            self.lora_down = torch.nn.Conv2d(
                org_module.in_channels,
                lora_dim,
                org_module.kernel_size,
                org_module.stride,
                org_module.padding,
                org_module.dilation,
                bias=False,
            )
            self.lora_up = torch.nn.Conv2d(lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = torch.nn.Linear(org_module.in_features, lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(lora_dim, org_module.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._update_scale()  # a loaded alpha changes the scale

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """up(down(x)) · multiplier · scale, with the training-time dropouts."""
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.training and self.dropout:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            mask = (torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout).to(lx.dtype)
            if lx.dim() == 3:  # (batch, tokens, rank)
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # conv: (batch, rank, h, w)
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        factor = self.multiplier * scale
        up = self.lora_up(lx)
        # x * 1.0 == x exactly: skipping the multiply (the usual alpha = rank case) saves one
        # operator in the forward and one in the backward of each of the ~264 modules per step
        return up if factor == 1.0 else up * factor

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        org_out = self.org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return org_out
        out = self.lora_output(x)
        if self.region is not None:
            out = self.region(self.lora_name, out)
        return org_out + out.to(org_out.dtype)


class LoRANetwork(torch.nn.Module):
    """All LoRA modules of one SD 1.x/2.x model, registered under their file names."""

    NETWORK_MODULE = "networks.lora"
    LORA_PREFIX_UNET = LORA_PREFIX_UNET
    LORA_PREFIX_TEXT_ENCODER = LORA_PREFIX_TEXT_ENCODER

    def __init__(
        self,
        text_encoder: Optional[torch.nn.Module],
        unet: Optional[torch.nn.Module],
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: Optional[float] = None,
        rank_dropout: Optional[float] = None,
        module_dropout: Optional[float] = None,
        conv_lora_dim: Optional[int] = None,
        conv_alpha: Optional[float] = None,
        block_dims: Optional[BlockDims] = None,
        modules_dim: Optional[Mapping[str, int]] = None,
        modules_alpha: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.block_dims = block_dims
        self.block_lr_weights: Optional[BlockLrWeights] = None
        self.optimizer_group_names: list[str] = []
        self._modules_dim = modules_dim
        self._modules_alpha = modules_alpha or {}

        te_layers = find_text_encoder_layers(text_encoder) if text_encoder is not None else []
        include_conv = (
            modules_dim is not None
            or conv_lora_dim is not None
            or (block_dims is not None and block_dims.conv_dims is not None)
        )
        unet_layers = find_unet_layers(unet, include_conv) if unet is not None else []
        self.text_encoder_loras = self._create_modules(te_layers)
        self.unet_loras = self._create_modules(unet_layers)
        logger.info(
            "%s: %d text encoder modules, %d U-Net modules",
            self.NETWORK_MODULE,
            len(self.text_encoder_loras),
            len(self.unet_loras),
        )
        if modules_dim is not None:
            created = {lora.lora_name for lora in self.text_encoder_loras + self.unet_loras}
            unmatched = sorted(set(modules_dim) - created)
            if unmatched:
                logger.warning(
                    "%d modules of the weights have no matching layer in this model (e.g. %s)",
                    len(unmatched),
                    unmatched[0],
                )
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)

    # -- module creation ---------------------------------------------------------------
    def _rank_and_alpha(self, layer: TargetLayer) -> tuple[int, Any]:
        is_conv3x3 = layer.kind == KIND_CONV3X3
        if self._modules_dim is not None:
            rank = self._modules_dim.get(layer.lora_name, 0)
            return rank, self._modules_alpha.get(layer.lora_name)
        if layer.is_unet and self.block_dims is not None:
            block_idx = unet_block_index(layer.lora_name)
            if block_idx >= 0:
                if not is_conv3x3:
                    return self.block_dims.dims[block_idx], self.block_dims.alphas[block_idx]
                if self.block_dims.conv_dims is not None:
                    return self.block_dims.conv_dims[block_idx], self.block_dims.conv_alphas[block_idx]
                return 0, None
        if not is_conv3x3:
            return self.lora_dim, self.alpha
        if self.conv_lora_dim:
            return self.conv_lora_dim, self.conv_alpha
        return 0, None

    def _make_module(self, layer: TargetLayer, rank: int, alpha: Any) -> torch.nn.Module:
        return LoRAModule(
            layer.lora_name,
            layer.module,
            self.multiplier,
            rank,
            alpha,
            dropout=self.dropout,
            rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
        )

    def _create_modules(self, layers: Iterable[TargetLayer]) -> list[torch.nn.Module]:
        loras = []
        for layer in layers:
            rank, alpha = self._rank_and_alpha(layer)
            if not rank:
                continue
            loras.append(self._make_module(layer, rank, alpha))
        return loras

    # -- sd-scripts network API -------------------------------------------------------
    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def set_region(self, region: Optional[Callable[[str, torch.Tensor], torch.Tensor]]) -> None:
        """Weight every U-Net module's output by `region(lora_name, output)` (regional LoRA); None clears.

        Text-encoder modules are not affected. Only unmerged `LoRAModule`s support regions.
        """
        for lora in self.unet_loras:
            if not isinstance(lora, LoRAModule):
                raise UserError(f"regional LoRA: {type(lora).__name__} modules do not support regions")
            lora.region = region

    def set_block_lr_weight(self, weights: Optional[BlockLrWeights]) -> None:
        self.block_lr_weights = weights

    def get_lr_weight(self, lora: torch.nn.Module) -> float:
        if self.block_lr_weights is None:
            return 1.0
        return self.block_lr_weights.weight_for_block(unet_block_index(lora.lora_name))

    def _drop_modules(self, loras: list[torch.nn.Module]) -> None:
        for lora in loras:
            if lora.lora_name in self._modules:
                delattr(self, lora.lora_name)

    def apply_to(
        self,
        text_encoder: Optional[torch.nn.Module] = None,
        unet: Optional[torch.nn.Module] = None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Hook the modules into the models they were created for (unapplied parts are dropped)."""
        if not apply_text_encoder:
            self._drop_modules(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop_modules(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
        logger.info(
            "LoRA applied: text encoder %s, U-Net %s", bool(self.text_encoder_loras), bool(self.unet_loras)
        )

    def restore(self) -> None:
        """Undo apply_to: the base layers get their own forward back."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.restore()

    def is_mergeable(self) -> bool:
        return True

    def merge_to(
        self,
        text_encoder: Optional[torch.nn.Module],
        unet: Optional[torch.nn.Module],
        weights_sd: Optional[Mapping[str, torch.Tensor]] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        """Add multiplier·ΔW of `weights_sd` (default: this network's weights) into the base layers."""
        if weights_sd is None:
            weights_sd = self.state_dict()
        merge_te = any(k.startswith(LORA_PREFIX_TEXT_ENCODER + "_") for k in weights_sd)
        merge_unet = any(k.startswith(LORA_PREFIX_UNET + "_") for k in weights_sd)
        loras = (self.text_encoder_loras if merge_te else []) + (self.unet_loras if merge_unet else [])
        merged = 0
        for lora in loras:
            down = weights_sd.get(f"{lora.lora_name}.lora_down.weight")
            up = weights_sd.get(f"{lora.lora_name}.lora_up.weight")
            if down is None or up is None:
                continue
            self._check_merge_shapes(lora, down, up)
            lora.merge_weights(down, up, weights_sd.get(f"{lora.lora_name}.alpha"), dtype, device)
            merged += 1
        logger.info("merged %d LoRA modules into the base weights", merged)

    @staticmethod
    def _check_merge_shapes(lora: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> None:
        weight = lora.org_module.weight
        if up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
            raise UserError(
                f"LoRA module {lora.lora_name}: weights up {tuple(up.shape)} / down {tuple(down.shape)} do not fit "
                f"the model layer {tuple(weight.shape)} (LoRA made for a different model?)"
            )

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def get_trainable_params(self) -> Iterable[torch.nn.Parameter]:
        return self.parameters()

    def enable_gradient_checkpointing(self) -> None:
        """LoRA modules keep no activations of their own; nothing to do (sd-scripts API)."""

    def prepare_optimizer_params(
        self, text_encoder_lr: Optional[float], unet_lr: Optional[float], default_lr: Optional[float] = None
    ) -> list[dict]:
        """Optimizer param groups; names in `self.optimizer_group_names`. Groups with lr 0 are skipped."""
        self.requires_grad_(True)
        groups: list[dict] = []
        names: list[str] = []

        def add_group(name: str, loras: list[torch.nn.Module], lr: Optional[float]) -> None:
            params = [p for lora in loras for p in lora.parameters()]
            if not params:
                return
            if lr is not None and lr == 0:
                logger.info("param group %s has learning rate 0 and is not trained", name)
                return
            group: dict = {"params": params}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
            names.append(name)

        te_lr = text_encoder_lr if text_encoder_lr is not None else default_lr
        unet_base_lr = unet_lr if unet_lr is not None else default_lr
        add_group("textencoder", self.text_encoder_loras, te_lr)
        if self.block_lr_weights is not None:
            by_block: dict[int, list[torch.nn.Module]] = defaultdict(list)
            for lora in self.unet_loras:
                by_block[unet_block_index(lora.lora_name)].append(lora)
            for block_idx in sorted(by_block):
                loras = by_block[block_idx]
                lr = None if unet_base_lr is None else unet_base_lr * self.get_lr_weight(loras[0])
                add_group(f"unet_block{block_idx:02d}", loras, lr)
        else:
            add_group("unet", self.unet_loras, unet_base_lr)
        self.optimizer_group_names = names
        return groups

    # -- weights I/O --------------------------------------------------------------------
    def check_weights(self, weights_sd: Mapping[str, torch.Tensor], file: PathLike) -> dict[str, torch.Tensor]:
        """Shape-check a LoRA state dict against this network; returns it with Linear/1x1 layouts adapted.

        v2 proj_in/proj_out may be stored as Linear [r, in] or 1x1 conv [r, in, 1, 1]; either is
        accepted for either target. Any other mismatch raises UserError naming file and module.
        """
        own = self.state_dict()
        adapted = dict(weights_sd)
        for key, value in weights_sd.items():
            target = own.get(key)
            if target is None or target.shape == value.shape:
                continue
            if target.numel() == value.numel() and target.dim() in (2, 4) and value.dim() in (2, 4) and (
                value.shape[:2] == target.shape[:2]
            ):
                adapted[key] = value.reshape(target.shape)
                continue
            module_name = key.split(".")[0]
            raise UserError(
                f"LoRA weights {file}: module {module_name} has {key.split('.', 1)[1]} of shape "
                f"{tuple(value.shape)} but this model needs {tuple(target.shape)} "
                "(LoRA trained for a different model?)"
            )
        return adapted

    def load_weights(self, file: PathLike) -> Any:
        """Load a LoRA file into this network (non-strict, like sd-scripts); returns the load info."""
        weights_sd = self.check_weights(load_lora_state_dict(file), file)
        info = self.load_state_dict(weights_sd, strict=False)
        if weights_sd and len(info.unexpected_keys) == len(weights_sd):
            # nothing would load: training would silently start from scratch
            raise UserError(
                f"LoRA weights {file}: none of its {len(weights_sd)} weights fit this model's network "
                f"(e.g. {next(iter(weights_sd))!r}); is it a LoRA for another architecture (SDXL, SD3)?"
            )
        if info.missing_keys:
            logger.warning("%s: %d weights of the network are not in the file", file, len(info.missing_keys))
        if info.unexpected_keys:
            logger.warning("%s: %d weights in the file have no module here", file, len(info.unexpected_keys))
        return info

    def save_weights(
        self, file: PathLike, dtype: Optional[torch.dtype], metadata: Optional[Mapping[str, Any]]
    ) -> None:
        """Save as .safetensors (with metadata and sshs_* hashes) or .pt/.ckpt (torch.save), atomically."""
        save_lora_state_dict(file, self.state_dict(), dtype, metadata)


def write_lora_tensors(
    destination: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    dtype: Optional[torch.dtype] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    as_safetensors: Optional[bool] = None,
) -> None:
    """Write LoRA tensors to `destination` as is (not atomic: callers pass a temporary path).

    Safetensors (`as_safetensors`, default: from the extension) get the metadata plus the sshs_*
    hashes of the file as written; .pt/.ckpt hold the flat dict only (torch.save, no metadata,
    as in sd-scripts). `dtype` casts every tensor."""
    tensors = {key: value.detach().to("cpu", dtype=dtype or value.dtype).contiguous() for key, value in state_dict.items()}
    if as_safetensors is None:
        as_safetensors = Path(destination).suffix.lower() == ".safetensors"
    if as_safetensors:
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, meta)
        save_file(tensors, str(destination), meta)
    else:
        if metadata:
            logger.info("%s: .pt/.ckpt LoRA files carry no metadata; it is not written", destination)
        torch.save(tensors, str(destination))


def save_lora_state_dict(
    file: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    dtype: Optional[torch.dtype] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> None:
    """`write_lora_tensors` to `file` atomically (the format follows the extension)."""
    as_safetensors = Path(file).suffix.lower() == ".safetensors"
    with atomic_path(file) as tmp:
        write_lora_tensors(tmp, state_dict, dtype, metadata, as_safetensors)
    logger.info("saved LoRA weights: %s", file)


# ---------------------------------------------------------------------------------------
# factories (sd-scripts module API)

def parse_network_dim_alpha(network_dim: Any, network_alpha: Any) -> tuple[int, float]:
    dim = 4 if network_dim is None else parse_int_arg("network_dim", network_dim)
    if dim <= 0:
        raise UserError(f"--network_dim must be a positive integer, got {network_dim!r}")
    alpha = 1.0 if network_alpha is None else parse_float_arg("network_alpha", network_alpha)
    return dim, alpha


def warn_unknown_network_args(kwargs: Mapping[str, Any], known: frozenset[str], module: str) -> None:
    for key in kwargs:
        if key not in known:
            logger.warning("network_args %s is not used by %s and is ignored", key, module)


def weights_ranks_and_alphas(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, Any]]:
    """Per-module rank (lora_down.shape[0]) and alpha; a missing alpha means scale 1 (alpha = rank)."""
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, Any] = {}
    for key, value in weights_sd.items():
        if "." not in key:
            continue
        lora_name, suffix = key.split(".", 1)
        if suffix == "alpha":
            modules_alpha[lora_name] = value
        elif suffix == "lora_down.weight":
            modules_dim[lora_name] = value.shape[0]
    for lora_name, rank in modules_dim.items():
        modules_alpha.setdefault(lora_name, rank)
    return modules_dim, modules_alpha


def require_matching_modules(network: LoRANetwork, modules_dim: Mapping[str, int], source: Any) -> None:
    """A weights file none of whose modules exist in the model is for another architecture."""
    if not network.text_encoder_loras and not network.unet_loras:
        raise UserError(
            f"LoRA weights {source}: none of its {len(modules_dim)} modules (e.g. {next(iter(modules_dim))}) "
            "match a layer of this model (LoRA for a different model type?)"
        )


NetworkT = TypeVar("NetworkT", bound=LoRANetwork)


def build_network_from_weights(
    file: Optional[PathLike],
    weights_sd: Optional[Mapping[str, torch.Tensor]],
    build: Callable[[dict[str, int], dict[str, Any]], NetworkT],
) -> tuple[NetworkT, dict[str, torch.Tensor]]:
    """Read a LoRA file (or take `weights_sd`), build a network shaped by its ranks/alphas with
    `build(modules_dim, modules_alpha)`, and check the weights fit it. Shared by LoRA and DyLoRA."""
    if weights_sd is None:
        if file is None:
            raise UserError("create_network_from_weights needs a LoRA file or a weights dict")
        weights_sd = load_lora_state_dict(file)
    modules_dim, modules_alpha = weights_ranks_and_alphas(weights_sd)
    if not modules_dim:
        raise UserError(f"LoRA weights {file}: no '<module>.lora_down.weight' keys found (not a LoRA file?)")
    network = build(modules_dim, modules_alpha)
    source = file if file is not None else "<weights dict>"
    require_matching_modules(network, modules_dim, source)
    return network, network.check_weights(weights_sd, source)


def create_network(
    multiplier: float,
    network_dim: Optional[int],
    network_alpha: Optional[float],
    vae: Any,
    text_encoder: Optional[torch.nn.Module],
    unet: Optional[torch.nn.Module],
    neuron_dropout: Optional[float] = None,
    **kwargs: Any,
) -> LoRANetwork:
    """Build a LoRA network from --network_dim/--network_alpha/--network_dropout and --network_args."""
    warn_unknown_network_args(kwargs, KNOWN_NETWORK_ARGS, LoRANetwork.NETWORK_MODULE)
    dim, alpha = parse_network_dim_alpha(network_dim, network_alpha)
    conv_dim = conv_alpha = None
    if kwargs.get("conv_dim") is not None:
        conv_dim = parse_int_arg("conv_dim", kwargs["conv_dim"])
        if conv_dim < 0:
            raise UserError(f"network_args conv_dim must be >= 0, got {kwargs['conv_dim']!r}")
        conv_alpha = 1.0 if kwargs.get("conv_alpha") is None else parse_float_arg("conv_alpha", kwargs["conv_alpha"])
    dropout = parse_optional_dropout("network_dropout", neuron_dropout)
    rank_dropout = parse_optional_dropout("rank_dropout", kwargs.get("rank_dropout"))
    module_dropout = parse_optional_dropout("module_dropout", kwargs.get("module_dropout"))

    lr_weights = parse_block_lr_weights(kwargs)
    block_dims = None
    if kwargs.get("block_dims") is not None or lr_weights is not None:
        block_dims = parse_block_dims(kwargs, dim, alpha, conv_dim, conv_alpha, lr_weights)
    else:
        for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if kwargs.get(key) is not None:
                logger.warning("network_args %s is ignored without block_dims or *_lr_weight", key)

    network = LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=dim,
        alpha=alpha,
        dropout=dropout,
        rank_dropout=rank_dropout,
        module_dropout=module_dropout,
        conv_lora_dim=conv_dim,
        conv_alpha=conv_alpha,
        block_dims=block_dims,
    )
    if lr_weights is not None:
        network.set_block_lr_weight(lr_weights)
    return network


def create_network_from_weights(
    multiplier: float,
    file: Optional[PathLike],
    vae: Any,
    text_encoder: Optional[torch.nn.Module],
    unet: Optional[torch.nn.Module],
    weights_sd: Optional[Mapping[str, torch.Tensor]] = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network whose modules, ranks and alphas come from a LoRA file (or `weights_sd`)."""

    def build(modules_dim: dict[str, int], modules_alpha: dict[str, Any]) -> LoRANetwork:
        return LoRANetwork(
            text_encoder,
            unet,
            multiplier=multiplier,
            dropout=parse_optional_dropout("network_dropout", kwargs.get("neuron_dropout")),
            rank_dropout=parse_optional_dropout("rank_dropout", kwargs.get("rank_dropout")),
            module_dropout=parse_optional_dropout("module_dropout", kwargs.get("module_dropout")),
            modules_dim=modules_dim,
            modules_alpha=modules_alpha,
        )

    return build_network_from_weights(file, weights_sd, build)
