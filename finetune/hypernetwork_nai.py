"""NAI-style hypernetwork, usable as `--network_module finetune.hypernetwork_nai`.

For every context width `d` of the UNet's attention layers the network holds two small MLPs
(`d → 2d → d`, no activation), one for the keys and one for the values. An attention layer
whose `to_k` / `to_v` take `d` features computes `to_k(c + mlp_k(c) · multiplier)` instead of
`to_k(c)` (and the same for `to_v`), in self-attention (`c` = the hidden states) and in
cross-attention (`c` = the text encoder output) alike. The text encoder is not changed.

Files:
- `.pt` / `.ckpt`: the NAI / AUTOMATIC1111 layout, a pickled dict
  `{d: [keys_mlp_state, values_mlp_state], ...}` with `linear.0.*` / `linear.1.*` tensors
  (older files name them `linear1` / `linear2`); other entries such as `layer_structure` or
  `name` are read and checked, never executed (`library.safe_unpickle`).
- `.safetensors`: the network's own state dict, `<d>_0.linear.0.weight` (keys MLP) /
  `<d>_1.linear.1.bias` (values MLP) ..., with the training metadata.

The factories have the signatures of `networks/lora.py`, so train_network.py and the
generator load it the same way.
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.errors import UserError  # noqa: E402
from library.io_util import atomic_path  # noqa: E402
from library.model_hash import precalculate_safetensors_hashes  # noqa: E402
from library.safe_unpickle import load_pickle_checkpoint  # noqa: E402
from networks.lora import LoRANetwork  # noqa: E402

logger = logging.getLogger(__name__)

NETWORK_MODULE = "finetune.hypernetwork_nai"
# old NAI files name the two layers linear1 / linear2
_OLD_LAYER_NAMES = {"linear1": "linear.0", "linear2": "linear.1"}
_SAFETENSORS_KEY = re.compile(r"^(\d+)_([01])\.(linear\.[01]\.(?:weight|bias))$")


class HypernetworkModule(torch.nn.Module):
    """`x + linear(x) · multiplier` with linear = Linear(d, 2d) → Linear(2d, d)."""

    def __init__(self, dim: int, multiplier: float = 1.0):
        super().__init__()
        self.linear = torch.nn.Sequential(torch.nn.Linear(dim, dim * 2), torch.nn.Linear(dim * 2, dim))
        for layer in self.linear:
            # small weights: a new hypernetwork starts close to the identity
            torch.nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            torch.nn.init.zeros_(layer.bias)
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * self.multiplier


def attention_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's attention modules (diffusers `Attention`: they have to_k and to_v)."""
    return [m for m in unet.modules() if isinstance(getattr(m, "to_k", None), torch.nn.Linear)
            and isinstance(getattr(m, "to_v", None), torch.nn.Linear)]


def context_sizes(unet: torch.nn.Module) -> list[int]:
    return sorted({layer.to_k.in_features for layer in attention_layers(unet)})


class Hypernetwork(torch.nn.Module):
    NETWORK_MODULE = NETWORK_MODULE

    def __init__(self, sizes: Iterable[int], multiplier: float = 1.0):
        super().__init__()
        self.sizes = sorted(set(int(s) for s in sizes))
        if not self.sizes:
            raise UserError("hypernetwork: the model has no attention layers to attach to")
        self.multiplier = multiplier
        for size in self.sizes:
            self.add_module(f"{size}_0", HypernetworkModule(size, multiplier))
            self.add_module(f"{size}_1", HypernetworkModule(size, multiplier))
        self._patched: list[tuple[torch.nn.Linear, Any]] = []
        self.optimizer_group_names = ["unet"]

    def pair(self, size: int) -> tuple[HypernetworkModule, HypernetworkModule]:
        return getattr(self, f"{size}_0"), getattr(self, f"{size}_1")

    # applying -----------------------------------------------------------------------
    def apply_to(self, text_encoder: Any = None, unet: Optional[torch.nn.Module] = None,
                 apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Wrap `to_k` / `to_v` of every attention layer whose context width has an MLP pair."""
        if unet is None or not apply_unet:
            logger.warning("hypernetwork: nothing to apply (it changes only the UNet)")
            return
        for layer in attention_layers(unet):
            size = layer.to_k.in_features
            if size not in self.sizes:
                continue
            for projection, mlp in zip((layer.to_k, layer.to_v), self.pair(size)):
                self._wrap(projection, mlp)
        logger.info("hypernetwork applied to %d projections (context sizes %s)", len(self._patched), self.sizes)

    def _wrap(self, projection: torch.nn.Linear, mlp: HypernetworkModule) -> None:
        original = projection.forward

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return original(mlp(x), *args, **kwargs)

        # an instance attribute: the module tree and the UNet's state dict stay as they are
        projection.forward = forward
        self._patched.append((projection, original))

    def restore(self) -> None:
        for projection, original in reversed(self._patched):
            projection.forward = original
        self._patched.clear()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for module in self.children():
            module.multiplier = multiplier

    def is_mergeable(self) -> bool:
        return False  # the MLPs are not linear maps of the weights: nothing to merge

    # training hooks: the same as a LoRA network's (sd-scripts' network module API)
    prepare_grad_etc = LoRANetwork.prepare_grad_etc
    on_epoch_start = LoRANetwork.on_epoch_start
    get_trainable_params = LoRANetwork.get_trainable_params
    enable_gradient_checkpointing = LoRANetwork.enable_gradient_checkpointing

    def prepare_optimizer_params(self, text_encoder_lr: Optional[float], unet_lr: Optional[float],
                                 default_lr: Optional[float]) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": list(self.parameters())}
        lr = unet_lr if unet_lr is not None else default_lr
        if lr is not None:
            group["lr"] = lr
        return [group]

    # files ---------------------------------------------------------------------------
    def nai_state_dict(self) -> dict[int, list[dict[str, torch.Tensor]]]:
        return {size: [m.state_dict() for m in self.pair(size)] for size in self.sizes}

    def load_nai_state_dict(self, weights: Mapping[int, list[Mapping[str, torch.Tensor]]], source: Any) -> None:
        for size, (keys_sd, values_sd) in weights.items():
            if size not in self.sizes:
                logger.warning("%s: context size %d has no attention layer in this model; ignored", source, size)
                continue
            for module, state in zip(self.pair(size), (keys_sd, values_sd)):
                try:
                    module.load_state_dict(state, strict=True)
                except RuntimeError as err:
                    first = str(err).strip().splitlines()[0]
                    raise UserError(f"hypernetwork {source}: weights of size {size} do not fit ({first})") from None

    def load_weights(self, file: Any) -> None:
        self.load_nai_state_dict(read_hypernetwork_file(file), file)

    def save_weights(self, file: Any, dtype: Optional[torch.dtype], metadata: Optional[Mapping[str, Any]]) -> None:
        """`.safetensors` with metadata and sshs_* hashes, or the NAI `.pt` layout; atomically."""
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", dtype=dtype or t.dtype).contiguous()

        if Path(file).suffix.lower() == ".safetensors":
            state_dict = {key: cast(value) for key, value in self.state_dict().items()}
            meta = {str(k): str(v) for k, v in (metadata or {}).items()}
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(state_dict, meta)
            with atomic_path(file) as tmp:
                save_file(state_dict, str(tmp), meta)
        else:
            nai = {size: [{k: cast(v) for k, v in sd.items()} for sd in pair] for size, pair in self.nai_state_dict().items()}
            with atomic_path(file) as tmp:
                torch.save(nai, str(tmp))
        logger.info("saved hypernetwork: %s", file)


# ---------------------------------------------------------------------------------------
# reading files

def _normalise_layer_keys(state: Mapping[str, Any], source: Any, size: int) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise UserError(f"hypernetwork {source}: entry {size} is not a pair of state dicts")
    result = {}
    for key, value in state.items():
        prefix, _, rest = str(key).partition(".")
        key = f"{_OLD_LAYER_NAMES[prefix]}.{rest}" if prefix in _OLD_LAYER_NAMES else str(key)
        if not isinstance(value, torch.Tensor):
            raise UserError(f"hypernetwork {source}: {size}/{key} is not a tensor")
        result[key] = value
    return result


def _check_nai_layout(data: Mapping[Any, Any], source: Any) -> None:
    """Only the plain NAI layout (1, 2, 1, no activation / layer norm / dropout) is this module."""
    structure = data.get("layer_structure")
    if structure is not None and [float(x) for x in structure] != [1.0, 2.0, 1.0]:
        raise UserError(f"hypernetwork {source}: layer_structure {list(structure)} is not the NAI layout 1, 2, 1")
    activation = data.get("activation_func")
    if activation not in (None, "linear"):
        raise UserError(f"hypernetwork {source}: activation_func {activation!r} is not supported (only 'linear')")
    for flag in ("is_layer_norm", "use_dropout"):
        if data.get(flag):
            raise UserError(f"hypernetwork {source}: {flag}=True is not supported by the NAI layout")


def read_hypernetwork_file(file: Any) -> dict[int, list[dict[str, torch.Tensor]]]:
    """{context size: [keys MLP state, values MLP state]} from a `.pt`/`.ckpt` or `.safetensors` file."""
    path = Path(file)
    if not path.is_file():
        raise UserError(f"hypernetwork file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        try:
            return _from_flat(load_file(str(path)), path)
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read hypernetwork file {path}: {err}") from None
    data = load_pickle_checkpoint(path)
    if not isinstance(data, Mapping):
        raise UserError(f"hypernetwork {path}: expected a dict of context sizes, got {type(data).__name__}")
    _check_nai_layout(data, path)
    weights = {}
    for size, pair in data.items():
        if isinstance(size, int) or (isinstance(size, str) and size.isdigit()):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise UserError(f"hypernetwork {path}: entry {size} must hold two state dicts (keys, values)")
            weights[int(size)] = [_normalise_layer_keys(sd, path, int(size)) for sd in pair]
    if not weights:
        raise UserError(f"hypernetwork {path}: no '<context size>: [keys, values]' entries (not a hypernetwork?)")
    return weights


def _from_flat(state_dict: Mapping[str, torch.Tensor], source: Any) -> dict[int, list[dict[str, torch.Tensor]]]:
    weights: dict[int, list[dict[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        match = _SAFETENSORS_KEY.match(key)
        if match is None:
            raise UserError(f"hypernetwork {source}: unexpected key {key!r} (not a hypernetwork file?)")
        size, which, name = int(match.group(1)), int(match.group(2)), match.group(3)
        weights.setdefault(size, [{}, {}])[which][name] = value
    if not weights:
        raise UserError(f"hypernetwork {source}: the file holds no tensors")
    return weights


# ---------------------------------------------------------------------------------------
# factories (the sd-scripts network module API)

def create_network(
    multiplier: float,
    network_dim: Optional[int],
    network_alpha: Optional[float],
    vae: Any,
    text_encoder: Any,
    unet: torch.nn.Module,
    neuron_dropout: Optional[float] = None,
    **kwargs: Any,
) -> Hypernetwork:
    """A new hypernetwork with an MLP pair for each context width of the UNet's attention layers.

    `--network_dim` / `--network_alpha` / `--network_args` have no meaning here (the layer widths
    follow the model); they are ignored with a note."""
    if network_dim is not None or neuron_dropout is not None or kwargs:
        logger.info("hypernetwork: --network_dim, --network_dropout and --network_args are not used")
    return Hypernetwork(context_sizes(unet), multiplier)


def create_network_from_weights(
    multiplier: float,
    file: Any,
    vae: Any,
    text_encoder: Any,
    unet: torch.nn.Module,
    weights_sd: Optional[Mapping[Any, Any]] = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[Hypernetwork, dict[int, list[dict[str, torch.Tensor]]]]:
    """A hypernetwork shaped by a file (or `weights_sd`, in either layout), weights loaded."""
    source = file if file is not None else "<weights dict>"
    if weights_sd is None:
        weights = read_hypernetwork_file(file)
    elif all(isinstance(k, str) for k in weights_sd):
        weights = _from_flat(weights_sd, source)
    else:
        weights = {int(k): [dict(sd) for sd in v] for k, v in weights_sd.items() if isinstance(k, int)}
    model_sizes = set(context_sizes(unet))
    missing = sorted(set(weights) - model_sizes)
    if missing and not set(weights) & model_sizes:
        raise UserError(
            f"hypernetwork {source}: its context sizes {sorted(weights)} match no attention layer of this model "
            f"(sizes {sorted(model_sizes)}): a hypernetwork for another model type?"
        )
    network = Hypernetwork(sorted(set(weights) & model_sizes), multiplier)
    network.load_nai_state_dict(weights, source)
    return network, weights
