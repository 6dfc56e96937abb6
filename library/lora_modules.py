"""LoRA files as modules: read (with metadata), group per module, validate, write.

Every LoRA tool works on `LoraModuleWeights` (down, up, alpha of one module) keyed by the
module name (`lora_unet_...`, `lora_te_...`, SPEC 2.1). Reading refuses files that are not
kohya LoRA files with one line naming the file; writing goes through
`networks.lora.save_lora_state_dict` (atomic, `sshs_*` hashes of the file as written).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

from library.errors import UserError
from library.io_util import atomic_path
from library.model_util import SafetensorsReader, is_safetensors
from networks.lora import load_lora_state_dict, normalize_alpha, save_lora_state_dict, weights_ranks_and_alphas
from networks.lora_keys import LORA_PREFIX_TEXT_ENCODER, LORA_PREFIX_UNET

PathLike = Union[str, os.PathLike]

_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass
class LoraModuleWeights:
    """One LoRA module: ΔW = up·down·alpha/rank (alpha None = scale 1)."""

    down: torch.Tensor  # [r, in] or [r, in, k, k]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: Optional[float]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return normalize_alpha(self.alpha, self.rank) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def is_conv3x3(self) -> bool:
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        """Flattened input size (in · k · k for a conv)."""
        return int(self.down[0].numel())

    def up2d(self) -> torch.Tensor:
        return self.up.float().flatten(1)

    def down2d(self) -> torch.Tensor:
        return self.down.float().flatten(1)

    def delta2d(self) -> torch.Tensor:
        """ΔW flattened to [out, in·k·k], float32."""
        return self.up2d() @ self.down2d() * self.scale

    def with_factors(self, up2d: torch.Tensor, down2d: torch.Tensor, alpha: float) -> "LoraModuleWeights":
        """A module of the same layer kind from 2-D factors (reshaped to this module's layout)."""
        return LoraModuleWeights(reshape_down(down2d, self.down.shape), reshape_up(up2d, self.up.shape), alpha)


def reshape_down(down2d: torch.Tensor, like: Sequence[int]) -> torch.Tensor:
    """[r, in·k·k] -> the layout of a down weight shaped like `like` (any rank r)."""
    return down2d.reshape(down2d.shape[0], *like[1:])


def reshape_up(up2d: torch.Tensor, like: Sequence[int]) -> torch.Tensor:
    """[out, r] -> the layout of an up weight shaped like `like` ([out, r] or [out, r, 1, 1])."""
    return up2d.reshape(up2d.shape[0], up2d.shape[1], *like[2:])


@dataclass
class LoraFile:
    """A LoRA file read into memory: its modules, in file order, and its metadata."""

    path: Path
    modules: dict[str, LoraModuleWeights]
    metadata: dict[str, str]

    @property
    def has_text_encoder(self) -> bool:
        return any(name.startswith(LORA_PREFIX_TEXT_ENCODER + "_") for name in self.modules)

    def rounded_to(self, dtype: torch.dtype) -> "LoraFile":
        """The weights rounded to `dtype` (sd-scripts' --precision loads the inputs in it); float32
        leaves them as they are. The arithmetic on them runs in float32 either way."""
        if dtype != torch.float32:
            for module in self.modules.values():
                module.down, module.up = module.down.to(dtype), module.up.to(dtype)
        return self

    def network_dim_alpha(self) -> tuple[str, str]:
        """ss_network_dim / ss_network_alpha values: the common rank / alpha, or "Dynamic"."""
        return common_dim_alpha(self.modules.values())


def common_dim_alpha(modules: Iterable[LoraModuleWeights]) -> tuple[str, str]:
    """The rank and alpha shared by all non-3x3 modules as strings, "Dynamic" where they differ."""
    linear = [m for m in modules if not m.is_conv3x3]
    ranks = {m.rank for m in linear}
    alphas = {normalize_alpha(m.alpha, m.rank) for m in linear}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    alpha = _number(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    return dim, alpha


def conv_dim_alpha(modules: Iterable[LoraModuleWeights]) -> Optional[tuple[str, str]]:
    """(conv_dim, conv_alpha) of the 3x3 modules for ss_network_args, None without any."""
    conv = [m for m in modules if m.is_conv3x3]
    if not conv:
        return None
    ranks = {m.rank for m in conv}
    alphas = {normalize_alpha(m.alpha, m.rank) for m in conv}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    alpha = _number(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    return dim, alpha


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def read_lora_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's metadata (after checking, from the header alone, that it is a LoRA)."""
    if not is_safetensors(path):
        return {}
    if not path.is_file():
        raise UserError(f"LoRA weights file not found: {path}")
    reader = SafetensorsReader(path)
    try:
        if not any(key.endswith(".lora_down.weight") for key in reader.shapes):
            # refuse e.g. a model file before reading gigabytes of it
            example = next(iter(reader.shapes), None)
            raise UserError(f"{path}: not a LoRA file: no '*.lora_down.weight' keys (first key: {example!r})")
        return dict(reader.metadata)
    finally:
        reader.close()


def group_modules(state_dict: Mapping[str, torch.Tensor], source: Any) -> dict[str, LoraModuleWeights]:
    """Split a flat LoRA state dict into modules; anything else in the file is an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, value in state_dict.items():
        name, _, suffix = key.partition(".")
        known_prefix = name.startswith((LORA_PREFIX_UNET + "_", LORA_PREFIX_TEXT_ENCODER + "_"))
        if suffix not in _SUFFIXES or not known_prefix:
            stray.append(key)
            continue
        parts.setdefault(name, {})[suffix] = value
    downs = [name for name, p in parts.items() if "lora_down.weight" in p]
    if not downs:
        example = f" (e.g. '{stray[0]}')" if stray else ""
        raise UserError(f"{source}: not a LoRA file: no 'lora_unet_*/lora_te_*.lora_down.weight' keys{example}")
    if stray:
        raise UserError(
            f"{source}: key '{stray[0]}' is not part of an SD 1.x/2.x LoRA module "
            f"({len(stray)} such keys; LoRA for another model type, or another network kind?)"
        )
    modules: dict[str, LoraModuleWeights] = {}
    for name, p in parts.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            missing = "lora_up.weight" if "lora_down.weight" in p else "lora_down.weight"
            raise UserError(f"{source}: module {name} has no {missing}")
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise UserError(
                f"{source}: module {name} has lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)}, "
                "which do not form a LoRA pair"
            )
        alpha = p.get("alpha")
        modules[name] = LoraModuleWeights(down, up, None if alpha is None else float(alpha.float()))
    return modules


def read_lora(path: PathLike) -> LoraFile:
    """Read a LoRA file (.safetensors with metadata, or .pt/.ckpt) into modules."""
    path = Path(path)
    metadata = read_lora_metadata(path)
    state_dict = load_lora_state_dict(path)
    return LoraFile(path, group_modules(state_dict, path), metadata)


LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")


def load_lora_file(path: PathLike, sd_model_keys: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat state dict, metadata) of a LoRA or DyLoRA file, for tools that work on the raw tensors.

    With `sd_model_keys` every key must belong to an SD 1.x/2.x LoRA module (`group_modules`'
    checks); without, any file with `*.lora_down.weight` / `*.lora_up.weight` pairs is taken (the
    weight checker reports on odd files too)."""
    path = Path(path)
    metadata = read_lora_metadata(path)
    state_dict = load_lora_state_dict(path)
    if sd_model_keys:
        group_modules(state_dict, path)
    else:
        modules_dim, _ = weights_ranks_and_alphas(state_dict)
        if not modules_dim:
            example = next(iter(state_dict), "<no tensors>")
            raise UserError(f"{path}: not a LoRA file: no '*.lora_down.weight' keys (first key: {example!r})")
        for name in modules_dim:
            if f"{name}.lora_up.weight" not in state_dict:
                raise UserError(f"{path}: module {name} has no lora_up.weight")
    return state_dict, metadata


@contextlib.contextmanager
def atomic_lora_outputs(targets: Sequence[Path]) -> Iterator[dict[Path, Path]]:
    """Temporary paths for several outputs, renamed into place only if the whole block succeeds:
    a failure while writing any of them leaves none (old files stay untouched)."""
    with contextlib.ExitStack() as stack:
        yield {target: stack.enter_context(atomic_path(target)) for target in targets}


def write_lora(
    save_to: PathLike,
    modules: Mapping[str, LoraModuleWeights],
    dtype: Optional[torch.dtype] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write modules as a LoRA file (atomic; .safetensors get `metadata` plus fresh sshs_* hashes)."""
    save_to = Path(save_to)
    save_lora_state_dict(save_to, modules_state_dict(modules, dtype), None, metadata)
    return save_to


def check_lora_output(save_to: PathLike) -> Path:
    """--save_to of a LoRA tool must name a .safetensors / .pt / .ckpt file."""
    path = Path(save_to)
    if path.suffix.lower() not in LORA_EXTENSIONS:
        raise UserError(f"--save_to {path}: the file name must end in {', '.join(LORA_EXTENSIONS)}")
    if path.is_dir():
        raise UserError(f"--save_to {path} is a folder; give a file name")
    return path


def modules_state_dict(
    modules: Mapping[str, LoraModuleWeights], dtype: Optional[torch.dtype] = None
) -> dict[str, torch.Tensor]:
    """The flat file layout of `modules`; alpha a 0-d tensor (float32, or `dtype` when given)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        alpha = normalize_alpha(module.alpha, module.rank)
        out[f"{name}.lora_down.weight"] = module.down.detach().cpu().to(dtype or module.down.dtype).contiguous()
        out[f"{name}.lora_up.weight"] = module.up.detach().cpu().to(dtype or module.up.dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype or torch.float32)
    return out


def lora_network_metadata(
    modules: Mapping[str, LoraModuleWeights], base: Optional[Mapping[str, str]] = None
) -> dict[str, str]:
    """`base` (copied) with ss_network_module / dim / alpha / args describing `modules`."""
    metadata = dict(base or {})
    metadata.setdefault("ss_network_module", "networks.lora")
    metadata["ss_network_dim"], metadata["ss_network_alpha"] = common_dim_alpha(modules.values())
    conv = conv_dim_alpha(modules.values())
    args: dict[str, str] = {}
    if metadata.get("ss_network_args"):
        try:
            args = {str(k): str(v) for k, v in json.loads(metadata["ss_network_args"]).items()}
        except (ValueError, AttributeError):
            args = {}
    args.pop("conv_dim", None)
    args.pop("conv_alpha", None)
    if conv is not None:
        args["conv_dim"], args["conv_alpha"] = conv
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    else:
        metadata.pop("ss_network_args", None)
    for key in ("sshs_model_hash", "sshs_legacy_hash"):
        metadata.pop(key, None)  # recomputed for the new tensors when the file is written
    return metadata


def check_distinct_output(save_to: PathLike, inputs: Iterable[Optional[PathLike]], flag: str = "--save_to") -> Path:
    """`save_to` must not be one of the inputs (a failed run must never destroy an input)."""
    target = Path(save_to)
    for source in inputs:
        if source is None:
            continue
        source = Path(source)
        same = target.resolve() == source.resolve() or (
            target.exists() and source.exists() and os.path.samefile(target, source)
        )
        if same:
            raise UserError(f"{flag} {target} is also an input file; write the result to a new file")
    return target


def check_ratios(models: Sequence[Any], ratios: Optional[Sequence[float]]) -> list[float]:
    """--ratios: one per --models entry (all 1.0 when omitted)."""
    if not models:
        raise UserError("--models: give at least one LoRA file")
    if ratios is None:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise UserError(f"--ratios has {len(ratios)} values but --models has {len(models)} files; give one ratio per model")
    return list(ratios)
