"""Textual-inversion embedding files: read, write, and add their tokens to a model (SPEC 3).

Formats read (any of them, by content, not by extension):

| layout | content |
|---|---|
| sd-scripts | `{"emb_params": Tensor[n, dim]}` (`.safetensors`, or `.pt` via torch.save) |
| AUTOMATIC1111 | `{"string_to_token": {"*": 265}, "string_to_param": {"*": Tensor[n, dim]}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}` (`.pt`; `string_to_param` may be a pickled `nn.ParameterDict`) |
| diffusers | `{token: Tensor[dim] or Tensor[n, dim]}` (`learned_embeds.bin` / `.safetensors`) |
| XTI | one `Tensor[n, dim]` per U-Net cross-attention block, keys `IN01` … `OUT11` (`.safetensors`) |

Pickled files (`.pt`, `.ckpt`, `.bin`) are opened only through `library.safe_unpickle`.
Written: `.safetensors` in the sd-scripts layout (with optional metadata) and `.pt` / `.ckpt`
in the AUTOMATIC1111 layout, which sd-scripts, A1111 and diffusers all read.

Token naming follows sd-scripts: an embedding of n vectors for token string `T` uses the
tokens `T, T1, …, T{n-1}` (see `token_strings`); a caption names the embedding with `T`
alone, which `expand_token_string` turns into all n tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from library.errors import UserError
from library.io_util import atomic_path

EMBEDDING_KEY = "emb_params"
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
SAVE_FORMATS = ("safetensors", "pt", "ckpt")
#: the 16 cross-attention blocks of the SD 1.x / 2.x U-Net, in forward order (LDM block numbers)
SD_XTI_BLOCKS = (
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)
_XTI_KEY = re.compile(r"^(IN\d\d|MID|OUT\d\d)$")


@dataclass
class Embedding:
    """One single-token embedding as read from a file."""

    vectors: torch.Tensor  # [n, dim]
    layout: str  # "sd-scripts", "a1111" or "diffusers"
    name: Optional[str] = None  # the name stored in the file (A1111 `name`, diffusers token), if any
    step: Optional[int] = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


# --- reading ---------------------------------------------------------------------------------
def _read_raw(path: Path) -> tuple[Any, dict[str, str]]:
    """File contents (dict or tensor) and safetensors metadata; pickles via safe_unpickle."""
    if not path.is_file():
        raise UserError(f"{path}: embedding file not found")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
        except Exception as err:  # noqa: BLE001 - safetensors reports damage with several types
            raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        from library.safe_unpickle import load_pickle_checkpoint

        return load_pickle_checkpoint(path, mmap=False), {}
    raise UserError(f"{path}: unknown embedding file type (expected .safetensors, .pt, .ckpt or .bin)")


def _as_matrix(value: Any, path: Path, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{path}: {what} is not a tensor ({type(value).__name__})")
    tensor = value.detach()
    if tensor.dim() == 1:  # single-vector files of older diffusers / A1111 versions
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise UserError(f"{path}: {what} has shape {list(value.shape)}, expected [num_vectors, dim]")
    if not tensor.is_floating_point():
        raise UserError(f"{path}: {what} has dtype {tensor.dtype}, expected a floating-point tensor")
    return tensor.contiguous()


def is_xti_dict(contents: Any) -> bool:
    """True when every key of a dict is an XTI block name (`IN01`, `MID`, `OUT11`, ...)."""
    return isinstance(contents, Mapping) and len(contents) > 1 and all(
        isinstance(k, str) and _XTI_KEY.match(k) for k in contents
    )


def _a1111_param(value: Any, path: Path) -> torch.Tensor:
    params = getattr(value, "_parameters", value)  # a pickled nn.ParameterDict keeps them here
    if not isinstance(params, Mapping) or len(params) != 1:
        count = len(params) if isinstance(params, Mapping) else "no"
        raise UserError(f"{path}: string_to_param must hold exactly one embedding, found {count}")
    return _as_matrix(next(iter(params.values())), path, "string_to_param")


def read_embedding(path: str | Path) -> Embedding:
    """Read a single-token embedding in any supported layout (UserError naming the file otherwise)."""
    path = Path(path)
    contents, metadata = _read_raw(path)
    if isinstance(contents, torch.Tensor):
        return Embedding(_as_matrix(contents, path, "the tensor"), "diffusers", None, None, metadata)
    if not isinstance(contents, Mapping) or not contents:
        raise UserError(f"{path}: not an embedding file (empty or not a dict of tensors)")
    if "string_to_param" in contents:
        step = contents.get("step")
        name = contents.get("name")
        return Embedding(
            _a1111_param(contents["string_to_param"], path), "a1111",
            name if isinstance(name, str) else None, int(step) if isinstance(step, int) else None, metadata,
        )
    if EMBEDDING_KEY in contents:
        return Embedding(_as_matrix(contents[EMBEDDING_KEY], path, EMBEDDING_KEY), "sd-scripts", None, None, metadata)
    if is_xti_dict(contents):
        raise UserError(f"{path}: this is an XTI (per-U-Net-block) embedding; load it with --XTI_embeddings / the XTI trainer")
    if len(contents) == 1:
        (token, value), = contents.items()
        return Embedding(_as_matrix(value, path, f"'{token}'"), "diffusers", str(token), None, metadata)
    keys = ", ".join(sorted(map(str, contents))[:5])
    raise UserError(f"{path}: not an embedding file: expected 'emb_params', 'string_to_param' or one token, found keys {keys}")


def load_embedding_vectors(path: str | Path) -> torch.Tensor:
    """The `[n, dim]` vectors of a single-token embedding file."""
    return read_embedding(path).vectors


def read_xti_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An XTI file: `({block: Tensor[n, dim]}, metadata)`; every block must have the same shape."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: XTI embeddings must be a .safetensors file")
    contents, metadata = _read_raw(path)
    if not is_xti_dict(contents):
        keys = ", ".join(sorted(map(str, contents))[:5])
        raise UserError(f"{path}: not an XTI embedding: expected block keys IN01 … OUT11, found {keys}")
    blocks = {key: _as_matrix(value, path, key) for key, value in contents.items()}
    shapes = {tuple(t.shape) for t in blocks.values()}
    if len(shapes) != 1:
        raise UserError(f"{path}: XTI blocks differ in shape: {sorted(shapes)}")
    return blocks, metadata


# --- writing ---------------------------------------------------------------------------------
def _cpu_copy(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    return (tensor.to(dtype) if dtype is not None else tensor).contiguous().clone()


def save_embedding(
    path: str | Path,
    vectors: torch.Tensor,
    name: Optional[str] = None,
    step: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    metadata: Optional[Mapping[str, str]] = None,
    sd_checkpoint: Optional[str] = None,
    sd_checkpoint_name: Optional[str] = None,
) -> Path:
    """Write `vectors [n, dim]` atomically: `.safetensors` as `{"emb_params"}` (+ metadata),
    `.pt` / `.ckpt` in the AUTOMATIC1111 layout (`name` defaults to the file stem)."""
    path = Path(path)
    matrix = _cpu_copy(vectors, dtype)
    if matrix.dim() != 2:
        raise ValueError(f"embedding vectors must be [num_vectors, dim], got {list(matrix.shape)}")
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({EMBEDDING_KEY: matrix}, str(tmp), metadata=dict(metadata) if metadata else None)
        elif suffix in (".pt", ".ckpt"):
            torch.save(a1111_embedding_dict(matrix, name or path.stem, step, sd_checkpoint, sd_checkpoint_name), tmp)
        else:
            raise UserError(f"{path}: embeddings are saved as .safetensors, .pt or .ckpt")
    return path


def a1111_embedding_dict(
    vectors: torch.Tensor, name: str, step: Optional[int] = None,
    sd_checkpoint: Optional[str] = None, sd_checkpoint_name: Optional[str] = None,
) -> dict[str, Any]:
    """The dict AUTOMATIC1111 saves for an embedding (`265` is the `*` token id it always writes)."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors},
        "name": name,
        "step": step,
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }


def save_diffusers_embedding(path: str | Path, token: str, vectors: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Path:
    """Write diffusers' `{token: Tensor}` layout (`.safetensors` or `.bin`); one vector is stored 1-D."""
    path = Path(path)
    matrix = _cpu_copy(vectors, dtype)
    value = matrix[0] if matrix.dim() == 2 and matrix.shape[0] == 1 else matrix
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file({token: value}, str(tmp))
        else:
            torch.save({token: value}, tmp)
    return path


def save_xti_file(
    path: str | Path, blocks: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write an XTI file (`.safetensors`, one `[n, dim]` tensor per block key) atomically."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: XTI embeddings are saved as .safetensors only")
    bad = [k for k in blocks if not _XTI_KEY.match(k)]
    if bad:
        raise ValueError(f"not XTI block names: {bad}")
    tensors = {key: _cpu_copy(value, dtype) for key, value in blocks.items()}
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
    return path


# --- tokens ----------------------------------------------------------------------------------
def token_strings(token_string: str, num_vectors: int) -> list[str]:
    """sd-scripts' token names for an n-vector embedding: `T, T1, …, T{n-1}`."""
    if num_vectors < 1:
        raise ValueError("num_vectors must be at least 1")
    return [token_string] + [f"{token_string}{i}" for i in range(1, num_vectors)]


def expand_token_string(text: str, token_string: str, num_vectors: int) -> str:
    """Replace `T` in a caption / prompt by all of its tokens `T T1 … T{n-1}`."""
    if num_vectors <= 1:
        return text
    return text.replace(token_string, " ".join(token_strings(token_string, num_vectors)))


def check_new_tokens(tokenizer, tokens: Sequence[str], source: str) -> None:
    """UserError when the tokenizer already knows a token, or a token is not one piece of text."""
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise UserError(f"{source}: token {token!r} must be one word without spaces")
    vocab = tokenizer.get_vocab()
    known = [t for t in tokens if t in vocab or f"{t}</w>" in vocab or t.lower() in vocab or f"{t.lower()}</w>" in vocab]
    if known:
        raise UserError(
            f"{source}: the tokenizer already knows the token {known[0]!r}; choose another token string "
            "(a word that is not in the CLIP vocabulary, e.g. one with digits)"
        )


def add_tokens(tokenizer, text_encoder, tokens: Sequence[str], source: str) -> list[int]:
    """Add new tokens to the tokenizer and rows for them to the text encoder's embedding matrix;
    returns their (consecutive) ids. The new rows are not initialised here."""
    check_new_tokens(tokenizer, tokens, source)
    start = len(tokenizer)
    added = tokenizer.add_tokens(list(tokens))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if added != len(tokens) or ids != list(range(start, start + len(tokens))):
        raise UserError(f"{source}: the tokenizer did not add {list(tokens)} as new consecutive tokens (got ids {ids})")
    embedding = text_encoder.get_input_embeddings()
    if embedding.num_embeddings < len(tokenizer):
        # new rows start from the model's own init (mean_resizing would fit a dim x dim covariance)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return ids


def add_embedding_tokens(
    tokenizer, text_encoder, token_string: str, vectors: torch.Tensor, source: str
) -> list[int]:
    """Make an embedding usable in prompts: add `T, T1, …` and copy `vectors [n, dim]` into
    the new rows. `source` (the file or flag) names the embedding in errors."""
    embedding = text_encoder.get_input_embeddings()
    if vectors.dim() != 2 or vectors.shape[1] != embedding.embedding_dim:
        raise UserError(
            f"{source}: embedding dimension {vectors.shape[-1]} does not match the text encoder's "
            f"{embedding.embedding_dim} (an embedding for another model version, SD1 vs SD2?)"
        )
    ids = add_tokens(tokenizer, text_encoder, token_strings(token_string, int(vectors.shape[0])), source)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = vectors.to(device=weight.device, dtype=weight.dtype)
    return ids


def load_embedding_into(tokenizer, text_encoder, path: str | Path, token_string: Optional[str] = None) -> tuple[str, list[int]]:
    """Read an embedding file and add it (token string defaults to the file stem, as in A1111)."""
    path = Path(path)
    token = token_string or path.stem
    ids = add_embedding_tokens(tokenizer, text_encoder, token, load_embedding_vectors(path), str(path))
    return token, ids
