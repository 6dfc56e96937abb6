"""Write a `.safetensors` file one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once; a tool that rewrites a
4 GB model (merging a LoRA into it) would then hold the whole model. The format is simple:
an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
byte range, then the raw tensor bytes. Since the header only needs dtypes and shapes, it is
written first and each tensor is produced, written and dropped in turn. The file goes
through `library.io_util.atomic_path`, so a failed run leaves no partial output.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from library.io_util import atomic_path

PathLike = Union[str, os.PathLike]

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """What the header says about one tensor before its data exists."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def write_streaming(
    target: PathLike,
    specs: Iterable[TensorSpec],
    produce: Callable[[str], torch.Tensor],
    metadata: Optional[Mapping[str, str]] = None,
    progress: Optional[Callable[[Iterable[TensorSpec]], Iterable[TensorSpec]]] = None,
) -> Path:
    """Write `target` with the tensors `produce(key)` returns, in the order of `specs`.

    Each produced tensor must match its spec's dtype and shape (checked: a mismatch would
    corrupt the file). `progress` may wrap the iteration (e.g. tqdm).
    """
    specs = list(specs)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        header[spec.key] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # tensor data starts 8-byte aligned
    target = Path(target)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(len(header_bytes).to_bytes(8, "little"))
        handle.write(header_bytes)
        for spec in progress(specs) if progress else specs:
            tensor = produce(spec.key)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.key}: produced {tensor.dtype} {tuple(tensor.shape)}, header says {spec.dtype} {spec.shape}")
            data = tensor.detach().cpu().contiguous().reshape(-1)
            handle.write(memoryview(data.view(torch.uint8).numpy()))
    return target
