"""`modelspec.*` metadata (Stability AI model spec) for saved models, LoRA files and embeddings.

Newer sd-scripts write these keys into the `.safetensors` header beside the `ss_*` keys, and
model browsers / UIs read them to tell what a file is without loading it. One function builds
them for every kind of output:

    build_metadata(kind, v2, v_parameterization, timestamp, title=..., resolution=...)
    metadata_from_args(args, kind, timestamp)   # what the trainers call

`kind` is `MODEL` (a whole checkpoint), `LORA` or `TEXTUAL_INVERSION`. All values are strings.
Keys with no value are left out (the spec's optional keys).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

SPEC_VERSION = "1.0.1"

MODEL = "model"
LORA = "lora"
TEXTUAL_INVERSION = "textual-inversion"
KINDS = (MODEL, LORA, TEXTUAL_INVERSION)

ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"

# the reference implementation whose key layout a file follows: LDM single files and embeddings
# are in Stability AI's layout, kohya LoRA files name diffusers modules
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"

PRED_EPSILON = "epsilon"
PRED_V = "v"

_DEFAULT_TITLES = {MODEL: "Checkpoint", LORA: "LoRA", TEXTUAL_INVERSION: "TextualInversion"}

#: `--metadata_*` flags (sd-scripts names) and the modelspec key each one fills
METADATA_FLAGS = {
    "metadata_title": "title",
    "metadata_author": "author",
    "metadata_description": "description",
    "metadata_license": "license",
    "metadata_tags": "tags",
    "metadata_usage_hint": "usage_hint",
    "metadata_merged_from": "merged_from",
    "metadata_trigger_phrase": "trigger_phrase",
    "metadata_preprocessor": "preprocessor",
    "metadata_is_negative_embedding": "is_negative_embedding",
}


def architecture(v2: bool, v_parameterization: bool, kind: str = MODEL) -> str:
    """`modelspec.architecture`: the base model id, plus `/lora` or `/textual-inversion`."""
    _check_kind(kind)
    if v2:
        base = ARCH_SD_V2_768_V if v_parameterization else ARCH_SD_V2_512
    else:
        base = ARCH_SD_V1
    return base if kind == MODEL else f"{base}/{kind}"


def implementation(kind: str) -> str:
    _check_kind(kind)
    return IMPL_DIFFUSERS if kind == LORA else IMPL_STABILITY_AI


def resolution_string(
    resolution: Union[None, int, str, Sequence[int]], v2: bool = False, v_parameterization: bool = False
) -> str:
    """`WxH` from `--resolution` (`"512"`, `"512,768"`, an int or a pair); the base model's size when None."""
    if resolution is None or resolution == "":
        size = 768 if v2 and v_parameterization else 512
        return f"{size}x{size}"
    if isinstance(resolution, str):
        parts = [int(p.strip()) for p in resolution.split(",") if p.strip()]
    elif isinstance(resolution, int):
        parts = [resolution]
    else:
        parts = [int(p) for p in resolution]
    if len(parts) == 1:
        parts = parts * 2
    return f"{parts[0]}x{parts[1]}"


def iso_date(timestamp: float) -> str:
    """Local time of `timestamp` in ISO 8601, whole seconds (as newer sd-scripts write it)."""
    return datetime.datetime.fromtimestamp(int(timestamp)).isoformat()


def build_metadata(
    kind: str,
    v2: bool,
    v_parameterization: bool,
    timestamp: float,
    title: Optional[str] = None,
    resolution: Union[None, int, str, Sequence[int]] = None,
    timesteps: Optional[tuple[Optional[int], Optional[int]]] = None,
    clip_skip: Optional[int] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, str]:
    """The `modelspec.*` keys of one output file.

    kind: `MODEL`, `LORA` or `TEXTUAL_INVERSION`. timestamp: Unix time the training started
    (gives `modelspec.date` and the default title `Checkpoint@<timestamp>` etc.). resolution:
    the training resolution (`--resolution`). timesteps: (min, max) training timesteps when
    restricted. clip_skip: `--clip_skip` (`modelspec.encoder_layer`). extra: further keys
    without the `modelspec.` prefix (author, description, license, tags, usage_hint, ...);
    None values are skipped.
    """
    spec: dict[str, Any] = {
        "sai_model_spec": SPEC_VERSION,
        "architecture": architecture(v2, v_parameterization, kind),
        "implementation": implementation(kind),
        "title": title if title else f"{_DEFAULT_TITLES[kind]}@{timestamp}",
        "resolution": resolution_string(resolution, v2, v_parameterization),
        "date": iso_date(timestamp),
        "prediction_type": PRED_V if v_parameterization else PRED_EPSILON,
    }
    if timesteps is not None and any(t is not None for t in timesteps):
        low = 0 if timesteps[0] is None else int(timesteps[0])
        high = 1000 if timesteps[1] is None else int(timesteps[1])
        spec["timestep_range"] = f"{low},{high}"
    if clip_skip is not None:
        spec["encoder_layer"] = str(clip_skip)
    for key, value in (extra or {}).items():
        if value is not None:
            spec[key[len("modelspec."):] if key.startswith("modelspec.") else key] = value
    return {f"modelspec.{key}": str(value) for key, value in spec.items()}


def metadata_from_args(
    args: argparse.Namespace,
    kind: str,
    timestamp: float,
    v2: Optional[bool] = None,
    v_parameterization: Optional[bool] = None,
) -> dict[str, str]:
    """`build_metadata` filled from a trainer's flags: title from `--metadata_title`, else
    `--output_name`; `--resolution`, `--min/max_timestep`, `--clip_skip` and the other
    `--metadata_*` flags. `v2` / `v_parameterization` default to the flags of the same name."""
    def flag(name: str) -> Any:
        return getattr(args, name, None)

    extra = {key: flag(name) for name, key in METADATA_FLAGS.items() if name != "metadata_title"}
    timesteps = (flag("min_timestep"), flag("max_timestep"))
    return build_metadata(
        kind,
        bool(flag("v2")) if v2 is None else v2,
        bool(flag("v_parameterization")) if v_parameterization is None else v_parameterization,
        timestamp,
        title=flag("metadata_title") or flag("output_name"),
        resolution=flag("resolution"),
        timesteps=timesteps if any(t is not None for t in timesteps) else None,
        clip_skip=flag("clip_skip"),
        extra=extra,
    )


# descriptive keys a tool carries over from its one input (title, date and merged_from are new)
_CARRIED_KEYS = ("author", "description", "license", "tags", "usage_hint", "trigger_phrase", "preprocessor")


def base_model_of(metadata: Mapping[str, str]) -> tuple[bool, bool]:
    """(v2, v_parameterization) a file's metadata states: `ss_v2` / `ss_v_parameterization`,
    else `modelspec.architecture`; (False, False) when it states neither."""
    if "ss_v2" in metadata:
        v2 = str(metadata["ss_v2"]).lower() == "true"
        return v2, v2 and str(metadata.get("ss_v_parameterization", "")).lower() == "true"
    arch = str(metadata.get("modelspec.architecture", ""))
    return arch.startswith("stable-diffusion-v2"), arch.startswith(ARCH_SD_V2_768_V)


def tool_output_metadata(
    kind: str,
    output: Union[str, os.PathLike],
    v2: Optional[bool] = None,
    v_parameterization: Optional[bool] = None,
    sources: Sequence[Mapping[str, str]] = (),
    merged_from: Sequence[Union[str, os.PathLike]] = (),
    timestamp: Optional[float] = None,
) -> dict[str, str]:
    """The `modelspec.*` keys of a file written by a LoRA / model tool (resize, merge, extract).

    Title is the output's file stem and the date is now (as sd-scripts' tools write them);
    `merged_from` lists the inputs' stems when several were combined. With exactly one source
    its descriptive keys (author, license, trigger phrase, ...) and resolution are kept. v2 /
    v-parameterization default to what the first source's metadata states.
    """
    import time

    first = sources[0] if sources else {}
    stated_v2, stated_v = base_model_of(first)
    v2 = stated_v2 if v2 is None else v2
    v_parameterization = stated_v if v_parameterization is None else v_parameterization
    extra: dict[str, Any] = {}
    resolution = None
    if len(sources) == 1:
        extra = {key: first.get(f"modelspec.{key}") for key in _CARRIED_KEYS}
        res = first.get("modelspec.resolution", "")
        resolution = [int(p) for p in res.split("x")] if re.fullmatch(r"\d+x\d+", res) else None
    if merged_from:
        extra["merged_from"] = ", ".join(os.path.splitext(os.path.basename(str(p)))[0] for p in merged_from)
    return build_metadata(
        kind, v2, v_parameterization, time.time() if timestamp is None else timestamp,
        title=os.path.splitext(os.path.basename(str(output)))[0], resolution=resolution, extra=extra,
    )


def with_tool_modelspec(
    metadata: Mapping[str, str], kind: str, output: Union[str, os.PathLike], **spec: Any
) -> dict[str, str]:
    """`metadata` with its `modelspec.*` keys replaced by `tool_output_metadata(kind, output, **spec)`."""
    kept = {k: v for k, v in metadata.items() if not k.startswith("modelspec.")}
    return {**kept, **tool_output_metadata(kind, output, **spec)}


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--metadata_*` flags of newer sd-scripts (written as `modelspec.*` keys)."""
    helps = {
        "metadata_title": "title written to modelspec.title (default: --output_name)",
        "metadata_tags": "comma-separated tags written to modelspec.tags",
        "metadata_is_negative_embedding": "'true' marks a textual-inversion embedding as a negative embedding",
    }
    for name, key in METADATA_FLAGS.items():
        parser.add_argument(f"--{name}", type=str, default=None, help=helps.get(name, f"written to modelspec.{key}"))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"modelspec kind must be one of {', '.join(KINDS)}, got {kind!r}")
