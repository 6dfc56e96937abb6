"""Load and save SD 1.x / 2.x models: LDM single files (.safetensors / .ckpt) and Diffusers folders.

Loading builds the diffusers / transformers models on the meta device from a config
inferred from the weights (library.sd_config) and assigns the converted tensors
(library.sd_keys), read one tensor at a time straight into the memory the model keeps, so
the weights are never held twice. Saving writes through library.io_util, so an existing
output is never left half-written.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:  # the model classes are imported where models are built: checks and --help stay fast
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

from library import fp8_layers, sd_config, sd_keys, weight_mapping
from library.errors import UserError
from library.io_util import atomic_dir, atomic_path
from library.safe_unpickle import load_pickle_checkpoint
from library.tokenizer_util import load_tokenizer

logger = logging.getLogger(__name__)

SAVE_MODEL_AS_CHOICES = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
PRECISION_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StableDiffusionModels:
    """What load_target_model returns (models in eval mode, on the requested device/dtype)."""

    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    tokenizer: CLIPTokenizer
    v2: bool
    v_parameterization: bool
    source_path: Path
    is_ldm_file: bool
    ldm_metadata: dict[str, Any] = field(default_factory=dict)  # epoch / global_step of a .ckpt


def is_safetensors(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".safetensors"


def precision_to_dtype(precision: str | None) -> torch.dtype | None:
    """`--save_precision` / `--mixed_precision` style name -> dtype (None / "no" -> None)."""
    if precision is None or precision == "no":
        return None
    if precision not in PRECISION_DTYPES:
        raise UserError(f"unknown precision '{precision}' (expected one of: float, fp16, bf16)")
    return PRECISION_DTYPES[precision]


# ---------------------------------------------------------------- single-file reading
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsReader:
    """Reads one tensor at a time from a `.safetensors` file with plain file reads.

    safetensors' own reader memory-maps the file; every page it touches then counts in the
    process's resident memory until the mapping closes, so loading a model that way peaks at
    twice the model's size. Reading each tensor straight into memory the model keeps holds
    the weights once (the file's pages stay in the OS cache, not in this process).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
            size = path.stat().st_size
            header_len = int.from_bytes(self._file.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                raise ValueError("bad header length")
            header = json.loads(self._file.read(header_len).decode("utf-8"))
            self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
            self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for key, info in header.items():
                start, end = info["data_offsets"]
                self._entries[key] = (_SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), start, end)
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            self.close()
            raise UserError(f"{path}: not a readable safetensors file ({err})") from None
        self._data_start = 8 + header_len
        self.shapes = {key: entry[1] for key, entry in self._entries.items()}
        if any(self._data_start + entry[3] > size for entry in self._entries.values()):
            self.close()
            raise UserError(f"{path}: the file is truncated (tensor data ends past the end of the file)")

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get_tensor(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self._entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        if buffer.nbytes != end - start:
            raise UserError(f"{self.path}: tensor '{key}' has {end - start} bytes for shape {list(shape)}")
        self._file.seek(self._data_start + start)
        if self._file.readinto(memoryview(buffer)) != buffer.nbytes:
            raise UserError(f"{self.path}: cannot read tensor '{key}'; the file may be truncated")
        return tensor

    def map_tensor(self, key: str) -> torch.Tensor | None:
        """The tensor as a copy-on-write view of the file's pages (None where its data is not
        aligned for its dtype). Only the pages a computation reads become resident, and writes
        go to private copies, never to the file.

        Each tensor maps just its own bytes (from the allocation boundary below them, so the data
        keeps the address alignment it has in the file): the mapping closes when the tensor is
        freed, so freed weights leave the process's resident memory (a mapping of the whole file
        kept the pages of freed tensors resident), and Windows charges its commit limit only for
        the bytes of the mapped tensors."""
        import mmap

        dtype, shape, start, end = self._entries[key]
        itemsize = torch.empty((), dtype=dtype).element_size()
        offset = self._data_start + start
        numel = math.prod(shape)
        if offset % itemsize or end - start != numel * itemsize or numel == 0:
            return None
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(self._file.fileno(), offset + (end - start) - base, offset=base, access=mmap.ACCESS_COPY)
        return torch.frombuffer(region, dtype=dtype, count=numel, offset=offset - base).reshape(shape)

    def close(self) -> None:
        handle = getattr(self, "_file", None)
        if handle is not None:
            handle.close()
            self._file = None  # mapped tensors keep their own mappings (and a duplicate handle) alive


class LdmFile:
    """Lazy, read-only access to the tensors of a `.safetensors` / `.ckpt` single file."""

    def __init__(self, path: str | Path, mmap: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: model file not found")
        self.metadata: dict[str, str] = {}
        self.extras: dict[str, Any] = {}  # top-level keys of a .ckpt besides state_dict
        self._handle = None
        self._tensors: dict[str, torch.Tensor] = {}
        # tensors are views of a memory-mapped file (zip .ckpt) rather than owned memory
        self.mapped = True
        if is_safetensors(self.path):
            self._handle = SafetensorsReader(self.path)
            self.shapes = self._handle.shapes
            self.metadata = self._handle.metadata
            self.mapped = False
        else:
            loaded = load_pickle_checkpoint(self.path, mmap=mmap)
            self.mapped = mmap and zipfile.is_zipfile(self.path)
            if not isinstance(loaded, dict):
                raise UserError(f"{self.path}: checkpoint holds a {type(loaded).__name__}, not a dict of tensors")
            weights = loaded.get("state_dict", loaded)
            if not isinstance(weights, dict):
                raise UserError(f"{self.path}: 'state_dict' is a {type(weights).__name__}, not a dict of tensors")
            if weights is not loaded:
                self.extras = {k: v for k, v in loaded.items() if k != "state_dict"}
            self._tensors = {k: v for k, v in weights.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def dtype(self, key: str) -> torch.dtype:
        """A tensor's dtype without reading its data."""
        return self._tensors[key].dtype if self._handle is None else self._handle.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise UserError(f"{self.path}: key '{key}' is missing; not a complete Stable Diffusion checkpoint")
        if self._handle is None:
            return self._tensors[key]
        return self._handle.get_tensor(key)

    def get_mapped(self, key: str) -> torch.Tensor:
        """Like `get`, but from a `.safetensors` file as a copy-on-write view of the file's pages
        (SafetensorsReader.map_tensor) where it can be mapped."""
        mapped = self._handle.map_tensor(key) if self._handle is not None and key in self.shapes else None
        return mapped if mapped is not None else self.get(key)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._tensors = {}

    def __enter__(self) -> "LdmFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def assign_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path, what: str) -> None:
    """Put converted tensors into an empty (meta-device) model as its own storage; UserError
    naming `source` when keys are missing or left over."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not sd_keys.is_position_ids(k)]
    if missing or unexpected:
        raise UserError(f"{source}: {what} weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise UserError(f"{source}: {what} weights do not cover {leftover[:3]}")


def finish_model(model: torch.nn.Module, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """The loaded model in `dtype` on `device` (moved only where needed), in eval mode."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_floating_point() and t.dtype != dtype and not fp8_layers.is_fp8(t) for t in tensors):
        fp8_layers.cast_model(model, dtype)  # model.to(dtype), leaving weights stored in fp8
    if any(t.device != torch.device(device) for t in tensors):
        model.to(device=device)
    model.eval()
    return model


def release_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Free a model's weights in place: parameters and buffers move to the meta device, while the
    config, module tree, dtype and shapes stay (e.g. `vae.config.scaling_factor` still works)."""
    model.to("meta")
    return model


def weights_released(model: torch.nn.Module) -> bool:
    """True once `release_weights` freed the model's weights (they are on the meta device)."""
    return next(model.parameters()).is_meta


def return_freed_memory() -> None:
    """Give heap memory freed by Python/torch back to the OS (glibc `malloc_trim`; elsewhere a
    no-op). Freed weights otherwise stay in the process's heap, and the models loaded next do
    not reuse all of it: measured 127 MiB of a freed 320 MiB VAE stayed resident."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return
    trim(0)


def _use_then_release(
    vae: AutoencoderKL, use: Callable[[AutoencoderKL], None], dtype: torch.dtype, device: str | torch.device
) -> AutoencoderKL:
    vae = finish_model(vae, dtype, device)
    use(vae)
    release_weights(vae)
    return_freed_memory()  # before the U-Net and text encoder allocate theirs
    return vae


def error_with_path(err: UserError, path: Path) -> UserError:
    """`err`, its message prefixed with `path` unless it already names it."""
    message = str(err)
    return err if str(path) in message else UserError(f"{path}: {message}")


def _mapping_getter(
    ldm: LdmFile, links: list[sd_keys.KeyLink], read: Callable[[str], torch.Tensor], dtype: torch.dtype,
    maps: Callable[[sd_keys.KeyLink], bool], key_dtypes: Mapping[str, torch.dtype] | None = None,
) -> Callable[[str], torch.Tensor]:
    """`read`, except for the tensors of the links `maps` picks that are stored whole and already
    in the dtype they load in (`key_dtypes[model_key]`, else `dtype`): those come as copy-on-write
    mappings of the file (`LdmFile.get_mapped`), so no copy is made and a page becomes resident
    when a computation first reads it. Tensors that are split or cast (to fp8, say) are read:
    mapping them would leave the source pages resident beside the copy."""
    key_dtypes = key_dtypes or {}
    mapped = {
        link.ldm_key for link in links
        if link.chunk is None and maps(link) and link.ldm_key in ldm
        and ldm.dtype(link.ldm_key) == key_dtypes.get(link.model_key, dtype)
    }
    if not mapped:
        return read

    def get(key: str) -> torch.Tensor:
        return ldm.get_mapped(key) if key in mapped else read(key)

    return get


def _fp8_key_dtypes(model: torch.nn.Module, fp8: bool) -> dict[str, torch.dtype]:
    """Model keys read straight into fp8 (`fp8_layers`): cast one by one as they are read."""
    return dict.fromkeys(fp8_layers.layer_weight_keys(model), fp8_layers.FP8_DTYPE) if fp8 else {}


def _unet_from_ldm(
    ldm: LdmFile, v2: bool, dtype: torch.dtype, use_linear_projection: bool | None, mapping: str = "none",
    latent_side: int = 1, fp8: bool = False,
) -> UNet2DConditionModel:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = sd_config.infer_unet_config(ldm.shapes, v2)
    if use_linear_projection is not None:
        config["use_linear_projection"] = use_linear_projection
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    links = sd_keys.safe_links(lambda: sd_keys.unet_links(shapes, config), "UNet")
    levels = len(config["block_out_channels"])
    key_dtypes = _fp8_key_dtypes(unet, fp8)

    def maps(link: sd_keys.KeyLink) -> bool:
        if mapping == "exact":
            return weight_mapping.maps_exactly(link.model_key, levels, latent_side)
        return mapping == "all"

    get = _mapping_getter(ldm, links, ldm.get, dtype, maps, key_dtypes)
    weights = sd_keys.ldm_to_model(links, get, shapes, str(ldm.path), dtype, copy=ldm.mapped, key_dtypes=key_dtypes)
    assign_weights(unet, weights, ldm.path, "UNet")
    return unet


def _vae_from_shapes(
    shapes_ldm: Mapping[str, tuple],
    get: Callable[[str], torch.Tensor],
    prefix: str,
    source: Path,
    dtype: torch.dtype,
    copy: bool,
) -> AutoencoderKL:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    config = sd_config.infer_vae_config(shapes_ldm, prefix)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    shapes = {k: v.shape for k, v in vae.state_dict().items()}
    num_levels = len(config["block_out_channels"])
    links = sd_keys.safe_links(lambda: sd_keys.vae_links(shapes, num_levels, prefix), "VAE")
    assign_weights(vae, sd_keys.ldm_to_model(links, get, shapes, str(source), dtype, copy=copy), source, "VAE")
    return vae


def _text_encoder_from_ldm(
    ldm: LdmFile, v2: bool, dtype: torch.dtype, map_token_embedding: bool = False, mapping: str = "none",
    fp8: bool = False,
) -> CLIPTextModel:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**sd_config.infer_text_encoder_config(ldm.shapes, v2))
    with init_empty_weights():
        text_encoder = CLIPTextModel(config)
    shapes = {k: v.shape for k, v in text_encoder.state_dict().items()}
    links = sd_keys.safe_links(lambda: sd_keys.text_encoder_links(shapes, v2), "text encoder")
    get = ldm.get
    if not v2 and f"{sd_config.TE_V1_PREFIX}{sd_keys.HF_TEXT_MODEL}embeddings.token_embedding.weight" not in ldm:
        # old v1 files store the HF CLIP keys without the `text_model.` level (read, not mapped)
        with_level = sd_config.TE_V1_PREFIX + sd_keys.HF_TEXT_MODEL

        def get(key: str) -> torch.Tensor:
            return ldm.get(sd_config.TE_V1_PREFIX + key[len(with_level):] if key.startswith(with_level) else key)

    # the token embedding table (49408 rows: 145 MiB of SD 1.x's 470 MiB encoder) is only read a
    # row per token by a run that does not train it: mapped, only the rows in use become resident
    key_dtypes = _fp8_key_dtypes(text_encoder, fp8)
    get = _mapping_getter(
        ldm, links, get, dtype,
        # the encoder sees 77 tokens per sample, never one row: mapping all of it is exact too
        lambda link: mapping != "none" or (map_token_embedding and link.model_key.endswith("token_embedding.weight")),
        key_dtypes,
    )
    weights = sd_keys.ldm_to_model(links, get, shapes, str(ldm.path), dtype, copy=ldm.mapped, key_dtypes=key_dtypes)
    assign_weights(text_encoder, weights, ldm.path, "text encoder")
    return text_encoder


def _ckpt_counters(extras: Mapping[str, Any]) -> dict[str, int]:
    return {k: int(extras[k]) for k in ("epoch", "global_step") if isinstance(extras.get(k), (int, float))}


# ---------------------------------------------------------------- loading
def load_target_model(
    path: str | Path,
    v2: bool | None = None,
    v_parameterization: bool = False,
    vae: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer_cache_dir: str | Path | None = None,
    unet_use_linear_projection: bool | None = None,
    use_vae_first: Callable[[AutoencoderKL], None] | None = None,
    map_token_embedding: bool = False,
    map_frozen_weights: str = "none",
    smallest_latent_side: int = 1,
    fp8_models: Collection[str] = (),
) -> StableDiffusionModels:
    """Load an SD 1.x/2.x model from a single file (.safetensors/.ckpt) or a Diffusers folder.

    v1/v2 is detected from the weights; `v2=True` (sd-scripts' `--v2`) on an SD 1.x model is
    an error, while False/None just means "not asked for". `vae` replaces the model's VAE
    (see load_vae). `unet_use_linear_projection` overrides the UNet's proj_in/out layout for
    single files (None: as stored in the file - Linear for SD2, Conv 1x1 for SD1).

    `use_vae_first(vae)`, when given, is called with the loaded VAE (on `device`, in `dtype`)
    before the U-Net and text encoder are read; afterwards the VAE's weights are freed
    (`release_weights`: config and module tree kept, tensors on the meta device). A trainer
    that only needs the VAE to cache latents thus never holds all three models at once.

    `map_token_embedding`: for a `.safetensors` single file, the text encoder's token-embedding
    table becomes a copy-on-write mapping of the file (only the rows a run looks up become
    resident; writes go to private pages, never to the file); for callers that only look rows up
    (a LoRA run), not for ones that compute over the table (adding tokens). Row look-ups are
    copies, so the results are the same as with the table read.

    `map_frozen_weights` ("none", "exact" or "all"; for callers that keep both models frozen):
    U-Net and text-encoder tensors stored whole in `dtype` are mapped that way too, so loading
    does not copy them (seconds less for SD 1.5) and the file's pages are shared with the OS's file
    cache instead of held twice. A mapped tensor is only as aligned as its offset in the file,
    and vector kernels (a matrix times a single row, as the time embedding at batch 1) round
    differently on it than on the 64-byte-aligned memory tensors are read into. "exact" therefore
    reads the U-Net layers that can compute such products when no batch is smaller than one image
    of longer latent side `smallest_latent_side` (`weight_mapping.maps_exactly`) and gives
    bit-identical results; "all" maps those as well (low bits differ). The VAE is always read.

    `fp8_models` ("unet", "text_encoder"; for frozen models only): those models' Linear / Conv2d
    weights are stored in fp8 and their layers compute through `fp8_layers` (`--fp8_base`). From a
    single file or a Diffusers folder each weight is cast as it is read (a folder in another layout
    loads in `dtype` first).

    A Diffusers folder (`diffusers_folder`) maps every tensor stored in `dtype`, as from_pretrained
    does, whatever `map_frozen_weights` says: its results stay those of loading through diffusers.
    """
    if set(fp8_models) - {"unet", "text_encoder"}:
        raise ValueError(f"fp8_models may name 'unet' and 'text_encoder', not {sorted(fp8_models)}")
    if map_frozen_weights not in weight_mapping.MAPPINGS:
        raise ValueError(f"map_frozen_weights must be one of {weight_mapping.MAPPINGS}, not {map_frozen_weights!r}")
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path}: model not found (expected a .safetensors/.ckpt file or a local Diffusers folder; "
            "Hugging Face hub ids are not downloaded)"
        )
    ldm_metadata: dict[str, Any] = {}
    if path.is_dir():
        from library import diffusers_folder

        if use_vae_first is not None:
            diffusers_folder.check_folder(path)
            vae_model = _use_then_release(load_vae(vae if vae is not None else path, dtype), use_vae_first, dtype, device)
        # mapped as from_pretrained maps it, whatever the mapping options (diffusers_folder)
        unet, folder_vae, text_encoder = diffusers_folder.load_folder_models(
            path, dtype, with_vae=use_vae_first is None and vae is None, fp8_models=tuple(fp8_models)
        )
        if use_vae_first is None and vae is None:
            vae_model = folder_vae
        is_v2 = text_encoder.config.hidden_act == "gelu" or unet.config.cross_attention_dim == 1024
        is_ldm = False
    else:
        is_ldm = True
        with LdmFile(path) as ldm:
            if any(k.startswith("conditioner.embedders.") for k in ldm.shapes):
                raise UserError(f"{path}: this is an SDXL model; only SD 1.x / 2.x models are supported")
            is_v2 = sd_config.is_v2_ldm(ldm.shapes)
            if v2 and not is_v2:
                raise UserError(f"{path}: --v2 was given but this is an SD 1.x model (no 'cond_stage_model.model.' keys)")
            logger.info("loading %s model from %s", "SD 2.x" if is_v2 else "SD 1.x", path)

            def read_own_vae() -> AutoencoderKL:
                try:
                    return _vae_from_shapes(ldm.shapes, ldm.get, sd_config.VAE_PREFIX, path, dtype, copy=ldm.mapped)
                except UserError as err:
                    raise error_with_path(err, path) from None

            if use_vae_first is not None:
                first = load_vae(vae, dtype) if vae is not None else read_own_vae()
                vae_model = _use_then_release(first, use_vae_first, dtype, device)
            try:
                unet = _unet_from_ldm(
                    ldm, is_v2, dtype, unet_use_linear_projection, map_frozen_weights, smallest_latent_side,
                    fp8="unet" in fp8_models,
                )
                text_encoder = _text_encoder_from_ldm(
                    ldm, is_v2, dtype, map_token_embedding, map_frozen_weights, fp8="text_encoder" in fp8_models
                )
            except UserError as err:
                raise error_with_path(err, path) from None
            if use_vae_first is None:
                vae_model = None if vae is not None else read_own_vae()
            ldm_metadata = _ckpt_counters(ldm.extras)
    if v2 and not is_v2:
        raise UserError(f"{path}: --v2 was given but this is an SD 1.x model")
    if not v2 and is_v2:
        logger.info("%s is an SD 2.x model (detected from its weights)", path)
    if vae is not None and use_vae_first is None:
        vae_model = load_vae(vae, dtype)
    tokenizer = load_tokenizer(is_v2, tokenizer_cache_dir)
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        if name in fp8_models:  # cast here when loading did not (folders via from_pretrained); route the layers
            fp8_layers.store_layers_in_fp8(model, dtype)
    return StableDiffusionModels(
        text_encoder=finish_model(text_encoder, dtype, device),
        vae=vae_model if use_vae_first is not None else finish_model(vae_model, dtype, device),
        unet=finish_model(unet, dtype, device),
        tokenizer=tokenizer,
        v2=is_v2,
        v_parameterization=v_parameterization,
        source_path=path,
        is_ldm_file=is_ldm,
        ldm_metadata=ldm_metadata,
    )


# old Diffusers VAE files name the mid-block attention's layers these ways
OLD_DIFFUSERS_VAE_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Load a VAE from a full LDM checkpoint, an LDM VAE-only file (with or without the
    `first_stage_model.` prefix or a `state_dict` wrapper), a diffusers-layout VAE file, or a
    Diffusers folder (the model folder or its `vae/` folder). Returned in eval mode on CPU."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: VAE not found")
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise UserError(f"{path}: not a Diffusers VAE folder (no config.json)")
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"{path}: cannot load Diffusers VAE ({str(err).strip().splitlines()[0]})") from None
        return vae.eval()
    with LdmFile(path) as ldm:
        try:
            if f"{sd_config.VAE_PREFIX}encoder.conv_in.weight" in ldm:
                vae = _vae_from_shapes(ldm.shapes, ldm.get, sd_config.VAE_PREFIX, path, dtype, copy=ldm.mapped)
            elif "encoder.down.0.block.0.conv1.weight" in ldm:
                vae = _vae_from_shapes(ldm.shapes, ldm.get, "", path, dtype, copy=ldm.mapped)
            elif "encoder.down_blocks.0.resnets.0.conv1.weight" in ldm:
                vae = _vae_from_diffusers_layout(ldm, dtype)
            else:
                raise UserError(f"{path}: not a Stable Diffusion VAE (no 'encoder.conv_in' weights found)")
        except UserError as err:
            raise error_with_path(err, path) from None
    return finish_model(vae, dtype, "cpu")


def _vae_from_diffusers_layout(ldm: LdmFile, dtype: torch.dtype) -> AutoencoderKL:
    """A VAE file saved with diffusers key names: rename to LDM names, then load as usual."""
    num_levels = len({k.split(".")[2] for k in ldm.keys() if k.startswith("encoder.down_blocks.")})
    to_source: dict[str, str] = {}
    for key in ldm.keys():
        modern = key
        for old, new in OLD_DIFFUSERS_VAE_ATTN.items():
            modern = modern.replace(old, new)
        try:
            to_source[sd_keys.vae_key_to_ldm(modern, num_levels)] = key
        except KeyError:
            continue
    shapes = {k: ldm.shapes[src] for k, src in to_source.items()}
    return _vae_from_shapes(shapes, lambda k: ldm.get(to_source[k]), "", ldm.path, dtype, copy=ldm.mapped)


# ---------------------------------------------------------------- saving single files
def _model_ldm_state_dict(
    v2: bool,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL | None,
    save_dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    unet_sd = unet.state_dict()
    ldm = sd_keys.model_to_ldm(sd_keys.unet_links(unet_sd, unet.config), unet_sd, v2, save_dtype)
    te_sd = text_encoder.state_dict()
    ldm.update(sd_keys.model_to_ldm(sd_keys.text_encoder_links(te_sd, v2), te_sd, v2, save_dtype))
    if vae is not None:
        vae_sd = vae.state_dict()
        links = sd_keys.vae_links(vae_sd, len(vae.config.block_out_channels))
        ldm.update(sd_keys.model_to_ldm(links, vae_sd, v2, save_dtype))
    return ldm


def save_stable_diffusion_checkpoint(
    v2: bool,
    output_file: str | Path,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL | None = None,
    source_path: str | Path | None = None,
    epoch: int = 0,
    global_step: int = 0,
    save_dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an LDM single file (`.ckpt` or `.safetensors`, chosen by extension).

    With a single-file `source_path`, every weight of the source that is not one of the written
    model weights (EMA, DDPM buffers, position_ids, ...) is carried over, and a `.ckpt`'s
    epoch/global_step are added to the source's (its other top-level entries are not copied,
    as in sd-scripts). Without a VAE the source's VAE is kept.
    """
    output_file = Path(output_file)
    ldm_sd = _model_ldm_state_dict(v2, text_encoder, unet, vae, save_dtype)
    counters: dict[str, int] = {}
    source_file = Path(source_path) if source_path is not None and Path(source_path).is_file() else None
    if source_file is not None:
        with LdmFile(source_file) as source:
            new_keys = [k for k in ldm_sd if k not in source]
            if new_keys:
                logger.warning("%d written keys are not in the source checkpoint, e.g. %s", len(new_keys), new_keys[0])
            for key in source.keys():
                if key not in ldm_sd:
                    tensor = source.get(key)
                    # a mapped source (zip .ckpt) may be the very file being replaced: own the memory
                    ldm_sd[key] = tensor.clone() if source.mapped else tensor
            counters = _ckpt_counters(source.extras)
    elif vae is None:
        raise ValueError("save_stable_diffusion_checkpoint needs a VAE when there is no source checkpoint")
    if v2:
        num_layers = text_encoder.config.num_hidden_layers
        if f"{sd_config.TE_V2_PREFIX}transformer.resblocks.{num_layers}.ln_1.weight" not in ldm_sd:
            sd_keys.fabricate_openclip_extras(ldm_sd, num_layers)

    with atomic_path(output_file) as tmp:
        if is_safetensors(output_file):
            meta = {str(k): str(v) for k, v in (metadata or {}).items()}
            save_file({k: v.contiguous() for k, v in ldm_sd.items()}, str(tmp), metadata=meta or None)
        else:
            # like sd-scripts: only the weights and the counters (no optimizer states, callbacks, ...)
            checkpoint = {
                "state_dict": ldm_sd,
                "epoch": counters.get("epoch", 0) + epoch,
                "global_step": counters.get("global_step", 0) + global_step,
            }
            torch.save(checkpoint, str(tmp))
    logger.info("saved %s (%d tensors)", output_file, len(ldm_sd))
    return output_file


# ---------------------------------------------------------------- saving Diffusers folders
def _cast_state_dict(model: torch.nn.Module, save_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if save_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(save_dtype)
        out[key] = tensor.contiguous()
    return out


def _write_weights(state_dict: dict[str, torch.Tensor], folder: Path, stem_st: str, stem_bin: str, use_safetensors: bool) -> None:
    if use_safetensors:
        save_file(state_dict, str(folder / stem_st), metadata={"format": "pt"})
    else:
        torch.save(state_dict, str(folder / stem_bin))


def _save_diffusers_model(model: UNet2DConditionModel | AutoencoderKL, folder: Path, use_safetensors: bool, save_dtype: torch.dtype | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(str(folder))
    _write_weights(
        _cast_state_dict(model, save_dtype), folder,
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", use_safetensors,
    )


def _save_text_encoder(text_encoder: CLIPTextModel, folder: Path, use_safetensors: bool, save_dtype: torch.dtype | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(text_encoder.config)
    config.architectures = ["CLIPTextModel"]
    config.save_pretrained(str(folder))
    # `text_model.`-prefixed keys load in transformers 4.x and 5.x alike
    state_dict = {
        (k if k.startswith(sd_keys.HF_TEXT_MODEL) else sd_keys.HF_TEXT_MODEL + k): v
        for k, v in _cast_state_dict(text_encoder, save_dtype).items()
        if not sd_keys.is_position_ids(k)
    }
    _write_weights(state_dict, folder, "model.safetensors", "pytorch_model.bin", use_safetensors)


def save_diffusers_checkpoint(
    v2: bool,
    output_dir: str | Path,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL | None = None,
    reference_model: str | Path | None = None,
    use_safetensors: bool = False,
    save_dtype: torch.dtype | None = None,
    v_parameterization: bool | None = None,
    tokenizer_cache_dir: str | Path | None = None,
) -> Path:
    """Write a Diffusers folder that `StableDiffusionPipeline.from_pretrained` loads.

    Scheduler and tokenizer come from `reference_model` (a local Diffusers folder) or are
    written offline (SPEC 1.8: PNDM for v1, DDIM v-prediction for v2 unless
    `v_parameterization` is False). Without `vae`, the reference model's VAE is copied.
    The models are not modified (save_dtype casts copies of the weights).
    """
    output_dir = Path(output_dir)
    reference = Path(reference_model) if reference_model is not None else None
    if reference is not None and not (reference / "model_index.json").is_file():
        raise UserError(
            f"{reference}: --reference_model must be a local Diffusers folder with model_index.json (nothing is downloaded)"
        )
    if vae is None and (reference is None or not (reference / "vae").is_dir()):
        raise UserError("saving a Diffusers model needs a VAE (none loaded and no --reference_model with a vae/ folder)")
    with atomic_dir(output_dir) as tmp:
        _save_diffusers_model(unet, tmp / "unet", use_safetensors, save_dtype)
        _save_text_encoder(text_encoder, tmp / "text_encoder", use_safetensors, save_dtype)
        if vae is not None:
            _save_diffusers_model(vae, tmp / "vae", use_safetensors, save_dtype)
        else:
            shutil.copytree(reference / "vae", tmp / "vae")
        if reference is None:
            sd_config.write_pipeline_support_files(tmp, v2, v_parameterization, tokenizer_cache_dir)
        else:
            _copy_reference_support_files(reference, tmp, v2, v_parameterization, tokenizer_cache_dir)
    logger.info("saved Diffusers model to %s", output_dir)
    return output_dir


def _copy_reference_support_files(
    reference: Path, target: Path, v2: bool, v_parameterization: bool | None, tokenizer_cache_dir: str | Path | None
) -> None:
    sd_config.write_pipeline_support_files(target, v2, v_parameterization, tokenizer_cache_dir)
    for part in ("scheduler", "tokenizer"):
        if (reference / part).is_dir():
            shutil.rmtree(target / part)
            shutil.copytree(reference / part, target / part)
    scheduler_json = target / "scheduler" / "scheduler_config.json"
    scheduler_class = json.loads(scheduler_json.read_text(encoding="utf-8")).get("_class_name", "PNDMScheduler")
    index = sd_config.model_index(scheduler_class)
    (target / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


# ---------------------------------------------------------------- one entry for trainers
def save_model(
    models: StableDiffusionModels,
    output: str | Path,
    save_model_as: str,
    save_dtype: torch.dtype | None = None,
    epoch: int = 0,
    global_step: int = 0,
    metadata: Mapping[str, str] | None = None,
    reference_model: str | Path | None = None,
    use_source: bool = True,
) -> Path:
    """Save `models` as `--save_model_as` says (ckpt | safetensors | diffusers | diffusers_safetensors).

    `output` is the file path (its extension is added when missing) or the folder for
    Diffusers. A single-file source model's extra keys are kept when `use_source`.
    """
    if save_model_as not in SAVE_MODEL_AS_CHOICES:
        raise UserError(f"--save_model_as '{save_model_as}' is not one of {', '.join(SAVE_MODEL_AS_CHOICES)}")
    output = Path(output)
    if save_model_as in ("ckpt", "safetensors"):
        if output.suffix.lower() != f".{save_model_as}":
            output = output.with_name(f"{output.name}.{save_model_as}")
        source = models.source_path if use_source and models.is_ldm_file else None
        return save_stable_diffusion_checkpoint(
            models.v2, output, models.text_encoder, models.unet, models.vae,
            source_path=source, epoch=epoch, global_step=global_step, save_dtype=save_dtype, metadata=metadata,
        )
    return save_diffusers_checkpoint(
        models.v2, output, models.text_encoder, models.unet, models.vae,
        reference_model=reference_model, use_safetensors=save_model_as == "diffusers_safetensors",
        save_dtype=save_dtype, v_parameterization=models.v_parameterization if models.v2 else None,
    )

