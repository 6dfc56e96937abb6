"""PNG text chunks and file names of generated images.

Chunks as sd-scripts' generator writes them (`prompt`, `seed`, `sampler`, `steps`, `scale`,
`negative-prompt`, `negative-scale`, `clip-prompt`; SPEC 7.1) plus an AUTOMATIC1111-style
`parameters` chunk — the one A1111's "PNG Info" tab and image sites read:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model hash: 0123abcd, ...
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

# sd-scripts sampler names → the names A1111 shows for the same method
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "pndm": "PLMS",
    "lms": "LMS",
    "k_lms": "LMS",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
    "dpmsolver": "DPM2M",
    "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ 2S",
}


@dataclass
class ImageRecord:
    """The settings one image was generated with."""

    prompt: str
    negative_prompt: str
    seed: int
    sampler: str
    steps: int
    scale: float
    width: int
    height: int
    negative_scale: float | None = None
    clip_prompt: str | None = None
    strength: float | None = None  # img2img / inpaint / highres-fix 2nd stage
    clip_skip: int | None = None
    model_name: str | None = None
    model_hash: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # more "Key: value" pairs for `parameters`


def _a1111_value(value: Any) -> str:
    text = str(value)
    # A1111 quotes values that hold its separators
    if any(c in text for c in ',:"\n'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def a1111_parameters(record: ImageRecord) -> str:
    """The `parameters` text A1111 writes for these settings."""
    lines = [record.prompt]
    if record.negative_prompt:
        lines.append(f"Negative prompt: {record.negative_prompt}")
    pairs: list[tuple[str, Any]] = [
        ("Steps", record.steps),
        ("Sampler", A1111_SAMPLER_NAMES.get(record.sampler, record.sampler)),
        ("CFG scale", record.scale),
        ("Seed", record.seed),
        ("Size", f"{record.width}x{record.height}"),
    ]
    if record.model_hash:
        pairs.append(("Model hash", record.model_hash))
    if record.model_name:
        pairs.append(("Model", record.model_name))
    if record.strength is not None:
        pairs.append(("Denoising strength", record.strength))
    if record.clip_skip is not None and record.clip_skip > 1:
        pairs.append(("Clip skip", record.clip_skip))
    pairs.extend(record.extra.items())
    lines.append(", ".join(f"{key}: {_a1111_value(value)}" for key, value in pairs))
    return "\n".join(lines)


def text_chunks(record: ImageRecord) -> dict[str, str]:
    """All PNG text chunks of an image (sd-scripts' keys and A1111's `parameters`)."""
    chunks = {
        "prompt": record.prompt,
        "seed": str(record.seed),
        "sampler": record.sampler,
        "steps": str(record.steps),
        "scale": str(record.scale),
        "negative-prompt": record.negative_prompt,
    }
    if record.negative_scale is not None:
        chunks["negative-scale"] = str(record.negative_scale)
    if record.clip_prompt is not None:
        chunks["clip-prompt"] = record.clip_prompt
    chunks["parameters"] = a1111_parameters(record)
    return chunks


_PAIR = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Read a `parameters` chunk back: `{"prompt", "negative_prompt", "Steps", "Seed", ...}`."""
    lines = text.split("\n")
    result: dict[str, str] = {}
    settings = lines.pop() if len(lines) > 1 else ""
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")]
    if negative:
        result["negative_prompt"] = "\n".join(lines[negative[0]:])[len("Negative prompt: "):]
        lines = lines[: negative[0]]
    result["prompt"] = "\n".join(lines)
    for key, value in _PAIR.findall(settings):
        value = value.strip()
        if value.startswith('"'):
            value = value[1:-1].replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        result[key.strip()] = value
    return result


def image_file_name(
    index: int,
    seed: int,
    highres_stage: str = "",
    sequence_number: int | None = None,
    original_name: str | None = None,
    timestamp: str | None = None,
) -> str:
    """sd-scripts' output names (SPEC 7.1).

    `im_{YYYYmmddHHMMSS}_{stage}{index:03d}_{seed}.png`, or `im_{stage}{n:06d}.png` with
    `--sequential_file_name` (`sequence_number` is 1-based); `stage` is "0" / "1" for the
    highres-fix stages. `original_name` (`--use_original_file_name`) is put in front.
    """
    if sequence_number is not None:
        name = f"im_{highres_stage}{sequence_number:06d}.png"
    else:
        timestamp = timestamp or time.strftime("%Y%m%d%H%M%S", time.localtime())
        name = f"im_{timestamp}_{highres_stage}{index:03d}_{seed}.png"
    return f"{original_name}_{name}" if original_name else name
