"""Networks (LoRA and friends) for generation: `--network_module/_weights/_mul/_args/_merge/
_pre_calc/_show_meta`.

Each network is built by its module's own `create_network_from_weights` (sd-scripts' module
interface), so its modules, ranks and alphas come from the file, and loaded strictly: every
weight of the file must land in a module of this model. A file for another architecture
fails in the module's shape checks or here, with one line naming the file.

Three ways to apply a network:
- hooked (default): the network wraps the layers' forward; multipliers can change per prompt
  (`--am`);
- `--network_merge`: ΔW·multiplier is added into the model weights (the module's `merge_to`);
- `--network_pre_calc`: ΔW·multiplier is computed by the network's own modules and added into
  the weights in place, and each layer gets its plain forward back, so a step costs what the
  base model costs and no weight is held twice. Multipliers are then fixed.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class LoadedNetwork:
    network: Any
    file: Path
    multiplier: float
    merged: bool = False


def parse_network_args(text: str | None, index: int) -> dict[str, str]:
    """One network's `--network_args` entry, `key=value;key=value`."""
    kwargs: dict[str, str] = {}
    if not text:
        return kwargs
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise UserError(f"--network_args entry {index}: '{item}' is not key=value")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = value.strip()
    return kwargs


def _per_network(values: Sequence[Any] | None, count: int, default: Any, flag: str) -> list[Any]:
    """A per-network flag list: one value for all, one per network, or the default when absent."""
    if not values:
        return [default] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise UserError(f"{flag} has {len(values)} values for {count} --network_weights files")
    return list(values)


def file_metadata(file: Path) -> dict[str, str]:
    """Metadata of a .safetensors network file ({} for other formats)."""
    if file.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises several error types for a bad header
        raise UserError(f"cannot read network file {file}: {err}") from None


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise UserError(f"--network_module {name}: cannot import it ({err})") from None


def _load_strictly(network: Any, weights_sd: dict[str, torch.Tensor], file: Path) -> None:
    info = network.load_state_dict(weights_sd, strict=False)
    if info.unexpected_keys:
        raise UserError(
            f"network {file}: {len(info.unexpected_keys)} weights have no layer in this model "
            f"(e.g. {info.unexpected_keys[0]}; network for a different model type?)"
        )
    if info.missing_keys:
        raise UserError(f"network {file}: {len(info.missing_keys)} weights are missing (e.g. {info.missing_keys[0]})")


def load_networks(args, text_encoder, unet, vae, dtype: torch.dtype, device: torch.device) -> list[LoadedNetwork]:
    """Build, load and apply (or merge / pre-compute) every `--network_weights` file."""
    files = [Path(f) for f in (args.network_weights or [])]
    if not files:
        if args.network_module:
            raise UserError("--network_module needs --network_weights (the network files to load)")
        return []
    modules = _per_network(args.network_module, len(files), None, "--network_module")
    if any(m is None for m in modules):
        raise UserError("--network_weights needs --network_module (e.g. networks.lora)")
    multipliers = _per_network(args.network_mul, len(files), 1.0, "--network_mul")
    arg_texts = list(args.network_args or [])
    loaded = []
    for index, (file, module_name, multiplier) in enumerate(zip(files, modules, multipliers)):
        if not file.is_file():
            raise UserError(f"--network_weights: file not found: {file}")
        if args.network_show_meta:
            show_metadata(file)
        kwargs = parse_network_args(arg_texts[index] if index < len(arg_texts) else None, index)
        module = _import_module(module_name)
        network, weights_sd = module.create_network_from_weights(
            multiplier, str(file), vae, text_encoder, unet, for_inference=True, **kwargs
        )
        if network is None:
            raise UserError(f"--network_module {module_name}: create_network_from_weights returned no network for {file}")
        if args.network_merge:
            if hasattr(network, "is_mergeable") and not network.is_mergeable():
                raise UserError(f"--network_merge: the network of {file} cannot be merged")
            network.merge_to(text_encoder, unet, weights_sd, dtype, device)
            loaded.append(LoadedNetwork(network, file, multiplier, merged=True))
            logger.info("merged network %s (multiplier %s)", file, multiplier)
            continue
        network.apply_to(text_encoder, unet)
        _load_strictly(network, weights_sd, file)
        network.to(device=device, dtype=dtype)
        network.eval().requires_grad_(False)
        if args.network_pre_calc:
            pre_calculate(network, file)
        loaded.append(LoadedNetwork(network, file, multiplier))
        logger.info("applied network %s (multiplier %s)", file, multiplier)
    return loaded


def show_metadata(file: Path) -> None:
    """`--network_show_meta`: print the file's metadata, one `key: value` per line."""
    metadata = file_metadata(file)
    print(f"metadata of {file}:")
    if not metadata:
        print("  (none)")
    for key in sorted(metadata):
        print(f"  {key}: {metadata[key]}")


def set_multipliers(networks: Sequence[LoadedNetwork], multipliers: Sequence[float] | None) -> None:
    """Per-prompt `--am`: multipliers padded with their last value; None restores `--network_mul`."""
    if not networks:
        return
    if multipliers is not None and any(n.merged or getattr(n.network, "_pre_calculated", False) for n in networks):
        logger.warning("--am is ignored with --network_merge / --network_pre_calc (multipliers are fixed)")
        return
    for index, loaded in enumerate(networks):
        if loaded.merged:
            continue
        if multipliers:
            value = multipliers[min(index, len(multipliers) - 1)]
        else:
            value = loaded.multiplier
        loaded.network.set_multiplier(float(value))


def _lora_modules(network: Any) -> list[Any]:
    return list(getattr(network, "text_encoder_loras", [])) + list(getattr(network, "unet_loras", []))


@torch.no_grad()
def pre_calculate(network: Any, file: Path) -> None:
    """Add multiplier·ΔW into each hooked layer's weight once and give the layer its plain forward
    back, so a step costs what the base model costs. In place: no second copy of any weight."""
    from networks.lora import add_delta_into_weight

    modules = _lora_modules(network)
    if not modules or not all(hasattr(m, "lora_down") and hasattr(m, "lora_up") for m in modules):
        raise UserError(f"--network_pre_calc: the network of {file} has no plain LoRA modules to pre-compute")
    for lora in modules:
        add_delta_into_weight(lora.org_module, lora.lora_down.weight, lora.lora_up.weight, lora.alpha, lora.multiplier)
        lora.restore()
    network._pre_calculated = True
    logger.info("pre-computed %d layers of %s", len(modules), file)
