"""Load `.ckpt` / `.pt` pickles without ever running code stored in them.

Built on `torch.load(weights_only=True)`, whose unpickler resolves only allowlisted
globals and never calls anything else. On top of torch's own allowlist (tensors,
storages, OrderedDict, builtin containers and numbers) this module allows the numpy
scalar/array reconstruction that some checkpoints contain, and maps every
`pytorch_lightning.*` reference (real SD 1.x checkpoints use the `ModelCheckpoint` class
as a dict key under `callbacks`) to an inert placeholder class, so such files load without
pytorch-lightning installed. `torch.nn.ParameterDict` / `ParameterList` (pickled whole by
the original textual-inversion code) become an inert `ModuleState` holding their state. Any other global (`os.system`, `builtins.eval`, ...) makes the
load fail with a `UserError` naming the file and the refused global.
"""
from __future__ import annotations

import codecs
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

LIGHTNING_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


class LightningPlaceholder:
    """Inert stand-in for a pickled pytorch-lightning class or object; holds only its state."""

    lightning_name = "pytorch_lightning"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.lightning_name}>"


_placeholders: dict[str, type] = {}


def _placeholder_for(name: str) -> type:
    """One distinct placeholder class per lightning name (classes are used as dict keys)."""
    if name not in _placeholders:
        short = name.rsplit(".", 1)[-1]
        _placeholders[name] = type(short, (LightningPlaceholder,), {"lightning_name": name})
    return _placeholders[name]


def is_placeholder(value: Any) -> bool:
    """True for a lightning placeholder class or instance (these cannot be pickled again)."""
    return (isinstance(value, type) and issubclass(value, LightningPlaceholder)) or isinstance(
        value, LightningPlaceholder
    )


def _numpy_globals() -> dict[str, Any]:
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1
    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype, "_codecs.encode": codecs.encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{module}._reconstruct"] = core._reconstruct
        allowed[f"{module}.scalar"] = core.scalar
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            if name.endswith("DType"):
                allowed[f"numpy.dtypes.{name}"] = getattr(dtypes, name)
    return allowed


class ModuleState:
    """Inert stand-in for a pickled `torch.nn` container (the original textual-inversion code
    saved `string_to_param` as an `nn.ParameterDict`): it keeps the pickled state, so
    `placeholder._parameters` holds the tensors, and has no module behaviour at all."""

    module_name = "torch.nn.Module"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<state of {self.module_name}>"


# torch.nn containers that old embedding files pickle whole; only their state is kept
MODULE_STATE_CLASSES = ("torch.nn.modules.container.ParameterDict", "torch.nn.modules.container.ParameterList")


def _module_state_class(name: str) -> type:
    if name not in _placeholders:
        _placeholders[name] = type(name.rsplit(".", 1)[-1], (ModuleState,), {"module_name": name})
    return _placeholders[name]


_EXTRA_ALLOWED = _numpy_globals()


def _extra_globals_for(path: Path, names: list[str]) -> list[tuple[Any, str]]:
    """Allowlist entries for the non-torch globals found in a checkpoint, or a UserError."""
    entries = []
    for name in names:
        if name.startswith(LIGHTNING_PREFIXES):
            entries.append((_placeholder_for(name), name))
        elif name in _EXTRA_ALLOWED:
            entries.append((_EXTRA_ALLOWED[name], name))
        elif name in MODULE_STATE_CLASSES:
            entries.append((_module_state_class(name), name))
        else:
            raise UserError(f"{path}: refusing to load: the pickle references '{name}', which is not allowed in a checkpoint")
    if any(name.startswith("numpy.") for name in names):
        # numpy dtype objects are rebuilt with BUILD on their DType class, which must be allowed too
        entries += [(obj, name) for name, obj in _EXTRA_ALLOWED.items() if name.startswith("numpy.dtypes.")]
    return entries


def _torch_reason(err: Exception) -> str:
    """The informative line of a torch unpickling error (its first lines are generic advice)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _refused_global(message: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported global: ([\w.]+)", message)
    return m.group(1) if m else None


def load_pickle_checkpoint(path: str | Path, mmap: bool = True) -> Any:
    """Unpickle a torch checkpoint safely (to CPU). `mmap` maps zip-format files instead of reading them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    is_zip = zipfile.is_zipfile(path)
    extra: list[tuple[Any, str]] = []
    if is_zip:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # damaged archive, missing data.pkl, broken pickle stream
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
        extra = _extra_globals_for(path, names)
    else:
        # legacy (non-zip) file or raw pickle: allow what it needs from our extras; torch refuses the rest
        extra = _extra_globals_for(path, _legacy_names(path))
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        refused = _refused_global(str(err))
        if refused:
            raise UserError(
                f"{path}: refusing to load: the pickle references '{refused}', which is not allowed in a checkpoint"
            ) from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({_torch_reason(err)})") from None
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt pickle can fail in many ways inside torch
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first_line})") from None


def _legacy_names(path: Path) -> list[str]:
    """Globals of a legacy (non-zip) torch file, collected without executing anything."""
    import pickletools

    names: list[str] = []
    with open(path, "rb") as stream:
        for _ in range(5):  # magic number, protocol, sys info, the object, storage keys
            try:
                strings: list[str] = []
                for opcode, arg, _pos in pickletools.genops(stream):
                    if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                        strings.append(arg)
                    elif opcode.name == "GLOBAL":
                        names.append(arg.replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
            except Exception:
                break
    return [
        n for n in dict.fromkeys(names)
        if n.startswith(LIGHTNING_PREFIXES) or n in _EXTRA_ALLOWED or n in MODULE_STATE_CLASSES
    ]
