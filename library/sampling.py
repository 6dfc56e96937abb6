"""Sample-prompt files and image generation, used by training samples and gen_img.

A prompt line is `prompt --n negative --w 512 --h 512 --d seed --s steps --l scale`
(SPEC 5.1). `generate_images` runs a plain denoising loop over a diffusers scheduler, the
UNet and the VAE with classifier-free guidance on long / weighted prompt embeddings;
`sample_images` wraps it for training: it saves PNGs named as sd-scripts names them and
leaves the models' modes and every RNG stream as it found them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import toml
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.errors import UserError
from library.io_util import atomic_path
from library.gen_pipeline import BatchSettings, GenModels, decode_latents, generate_latents, model_device
from library.samplers import check_sampler_name

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_STEPS = 30
DEFAULT_SAMPLE_SIZE = 512
DEFAULT_GUIDANCE_SCALE = 7.5
MIN_SAMPLE_SIZE = 64
MAX_SAMPLE_STEPS = 1000
MAX_SEED = 2**31 - 1


def floor_size(size: int) -> int:
    """Round a sample width/height down to a multiple of 8, at least 64 (with a warning when it changes)."""
    floored = max(MIN_SAMPLE_SIZE, int(size) - int(size) % 8)
    if floored != int(size):
        logger.warning("image size %d is not a multiple of 8 (at least %d); using %d", int(size), MIN_SAMPLE_SIZE, floored)
    return floored


def clamp_steps(steps: int) -> int:
    return max(1, min(MAX_SAMPLE_STEPS, int(steps)))


@dataclass
class SamplePrompt:
    """One sample image request; sizes and steps are normalised on creation."""

    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_SAMPLE_SIZE
    height: int = DEFAULT_SAMPLE_SIZE
    seed: int | None = None
    steps: int = DEFAULT_SAMPLE_STEPS
    scale: float = DEFAULT_GUIDANCE_SCALE
    sampler: str | None = None  # per-prompt sampler (`--ss`), else the run's sampler
    index: int = 0  # position among the file's prompts, used in the file name
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.width = floor_size(self.width)
        self.height = floor_size(self.height)
        self.steps = clamp_steps(self.steps)
        self.scale = float(self.scale)


# option letter(s) → (pattern of the value, SamplePrompt field). Prefix matches, as sd-scripts.
_OPTION_PATTERNS = [
    (re.compile(r"w (\d+)", re.IGNORECASE), "width"),
    (re.compile(r"h (\d+)", re.IGNORECASE), "height"),
    (re.compile(r"d (\d+)", re.IGNORECASE), "seed"),
    (re.compile(r"s (\d+)", re.IGNORECASE), "steps"),
    (re.compile(r"l ([\d.]+)", re.IGNORECASE), "scale"),
    (re.compile(r"n (.+)", re.IGNORECASE), "negative_prompt"),
    (re.compile(r"ss (\S+)", re.IGNORECASE), "sampler"),
]
_CONVERTERS = {"width": int, "height": int, "seed": int, "steps": int, "scale": float}


def split_prompt_line(line: str) -> tuple[str, list[str]]:
    """`prompt --a x --b y` → ("prompt", ["a x", "b y"]) (the line is split on " --", SPEC 5.1)."""
    prompt, *options = line.strip().split(" --")
    return prompt.strip(), options


def parse_prompt_options(options: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """SamplePrompt field values of the options this parser knows, and the other options.

    Unknown options are returned for callers with more of them (gen_img: --nl, --t, --am, ...);
    a bad value is ignored with a warning; a repeated option's last value wins.
    """
    values: dict[str, Any] = {}
    unparsed: list[str] = []
    for option in options:
        for pattern, field_name in _OPTION_PATTERNS:
            match = pattern.match(option)
            if not match:
                continue
            raw = match.group(1)
            try:
                values[field_name] = _CONVERTERS.get(field_name, str)(raw)
            except ValueError:
                logger.warning("ignoring sample prompt option with a bad value: --%s", option)
            break
        else:
            unparsed.append(option)
    return values, unparsed


def parse_prompt_line(line: str, index: int = 0) -> SamplePrompt | None:
    """Parse one prompt-file line; None for blank lines and `#` comments.

    Options follow the prompt as ` --<letter> <value>`; unknown ones are ignored and a
    repeated option's last value wins.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    prompt, options = split_prompt_line(line)
    values, unparsed = parse_prompt_options(options)
    extra = {"unparsed_options": unparsed} if unparsed else {}
    return SamplePrompt(prompt=prompt, index=index, extra=extra, **values)


# keys of HEAD's .toml / .json prompt files → SamplePrompt fields
_DICT_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "sample_steps": "steps",
    "scale": "scale",
    "sample_sampler": "sampler",
}


def prompt_from_dict(entry: dict[str, Any], index: int, source: str) -> SamplePrompt:
    """A SamplePrompt from one entry of a .toml / .json prompt file."""
    if not isinstance(entry, dict):
        raise UserError(f"{source}: prompt entry {index} must be a table/object, got {type(entry).__name__}")
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in entry.items():
        if key in _DICT_KEYS:
            values[_DICT_KEYS[key]] = value
        else:
            extra[key] = value
    values.setdefault("prompt", "")
    for name in ("prompt", "negative_prompt", "sampler"):
        if values.get(name) is not None and not isinstance(values[name], str):
            raise UserError(f"{source}: '{name}' of prompt entry {index} must be a string")
    try:
        for name, convert in _CONVERTERS.items():
            if values.get(name) is not None:
                values[name] = convert(values[name])
    except (TypeError, ValueError) as error:
        raise UserError(f"{source}: bad value in prompt entry {index}: {error}") from None
    return SamplePrompt(index=index, extra=extra, **values)


def load_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a `--sample_prompts` file: text (one prompt per line), `.toml` or `.json`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sample prompt file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read sample prompt file {path}: {error}") from None
    if suffix == ".toml":
        try:
            data = toml.loads(text)
        except toml.TomlDecodeError as error:
            raise UserError(f"invalid TOML in sample prompt file {path}: {error}") from None
        base = data.get("prompt")
        if not isinstance(base, dict) or not isinstance(base.get("subset"), list):
            raise UserError(f"sample prompt file {path} needs a [prompt] table with [[prompt.subset]] entries")
        defaults = {key: value for key, value in base.items() if key != "subset"}
        entries = [{**defaults, **subset} if isinstance(subset, dict) else subset for subset in base["subset"]]
        prompts = [prompt_from_dict(entry, i, str(path)) for i, entry in enumerate(entries)]
    elif suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"invalid JSON in sample prompt file {path}: {error}") from None
        if not isinstance(entries, list):
            raise UserError(f"sample prompt file {path} must hold a JSON list of prompt objects")
        prompts = [prompt_from_dict(entry, i, str(path)) for i, entry in enumerate(entries)]
    else:
        prompts = []
        for line in text.splitlines():
            parsed = parse_prompt_line(line, index=len(prompts))
            if parsed is not None:
                prompts.append(parsed)
    for prompt in prompts:  # a typo must fail now, not at the first sample hours into training
        if prompt.sampler is not None:
            check_sampler_name(prompt.sampler, f"sampler of prompt {prompt.index} in {path}")
    return prompts


def should_sample(
    epoch: int | None,
    steps: int,
    sample_every_n_epochs: int | None,
    sample_every_n_steps: int | None,
    sample_at_first: bool = False,
) -> bool:
    """Whether to sample now, as sd-scripts decides.

    Called with `epoch=None` after an optimizer step and with the epoch number at the end
    of an epoch; `steps == 0` is the call before training (`--sample_at_first`). With
    `--sample_every_n_epochs`, `--sample_every_n_steps` is ignored.
    """
    if steps == 0:
        return sample_at_first
    if sample_every_n_epochs is not None:
        return epoch is not None and epoch % sample_every_n_epochs == 0
    if sample_every_n_steps is not None:
        return epoch is None and steps % sample_every_n_steps == 0
    return False


def _as_sample_prompts(prompts: str | SamplePrompt | Sequence[str | SamplePrompt]) -> list[SamplePrompt]:
    if isinstance(prompts, (str, SamplePrompt)):
        prompts = [prompts]
    return [p if isinstance(p, SamplePrompt) else SamplePrompt(prompt=p, index=i) for i, p in enumerate(prompts)]


def _generate_one(
    unet,
    vae,
    text_encoder,
    tokenizer,
    request: SamplePrompt,
    prompt: str,
    negative_prompt: str,
    seed: int,
    sampler_name: str,
    v_parameterization: bool,
    clip_skip: int | None,
    max_embeddings_multiples: int,
    show_progress: bool,
) -> Image.Image:
    models = GenModels(
        unet, vae, text_encoder, tokenizer, v_parameterization=v_parameterization, clip_skip=clip_skip,
        max_embeddings_multiples=max_embeddings_multiples,
    )
    settings = BatchSettings(request.width, request.height, request.steps, request.scale, sampler_name)
    latents = generate_latents(models, settings, [prompt], [negative_prompt], [seed], show_progress=show_progress)
    return decode_latents(models, latents)[0]


def generate_images(
    unet,
    vae,
    text_encoder,
    tokenizer,
    prompts: str | SamplePrompt | Sequence[str | SamplePrompt],
    sampler_name: str = "ddim",
    v_parameterization: bool = False,
    clip_skip: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_embeddings_multiples: int = 3,
    prompt_replacement: tuple[str, str] | None = None,
    show_progress: bool = True,
) -> list[Image.Image]:
    """Generate one image per prompt; models must already be on `device` (default: the UNet's).

    Each model runs in its own dtype; `dtype` float16/bfloat16 (the training's mixed
    precision) also runs them under `torch.autocast`, as sd-scripts samples, so fp32
    network weights work beside half-precision model weights. A prompt without a seed
    gets a fresh random one. Each image's `info` holds its prompt, negative-prompt, seed,
    sampler, steps and scale (strings), ready for PNG text chunks.
    """
    device = torch.device(device) if device is not None else model_device(unet)
    use_autocast = dtype is not None and dtype != torch.float32
    seed_source = random.Random()  # own OS-seeded source: drawing a seed leaves the global stream alone
    images = []
    for request in _as_sample_prompts(prompts):
        prompt, negative_prompt = request.prompt, request.negative_prompt or ""
        if prompt_replacement is not None:
            prompt = prompt.replace(prompt_replacement[0], prompt_replacement[1])
            negative_prompt = negative_prompt.replace(prompt_replacement[0], prompt_replacement[1])
        seed = request.seed if request.seed is not None else seed_source.randint(0, MAX_SEED)
        sampler = request.sampler or sampler_name
        logger.info(
            "sample prompt: %s (negative: %s, seed %d, %dx%d)", prompt, negative_prompt, seed, request.width, request.height
        )
        autocast = torch.autocast(device.type, dtype=dtype) if use_autocast else contextlib.nullcontext()
        with autocast:
            image = _generate_one(
                unet, vae, text_encoder, tokenizer, request, prompt, negative_prompt, seed, sampler,
                v_parameterization, clip_skip, max_embeddings_multiples, show_progress,
            )
        image.info.update(
            {
                "prompt": prompt,
                "negative-prompt": negative_prompt,
                "seed": str(seed),
                "sampler": sampler,
                "steps": str(request.steps),
                "scale": str(request.scale),
            }
        )
        images.append(image)
    return images


class _PreservedState:
    """Saves the RNG streams and the models' train/eval modes and devices; restores them on exit."""

    def __init__(self, models: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.models = models
        self.device = device

    def __enter__(self) -> "_PreservedState":
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.numpy_rng = np.random.get_state()
        self.python_rng = random.getstate()
        self.modes = [{module: module.training for module in model.modules()} for model in self.models]
        self.devices = [model_device(model) for model in self.models]
        for model in self.models:
            model.eval()
            model.to(self.device)
        return self

    def __exit__(self, *exc_info) -> None:
        for model, device, modes in zip(self.models, self.devices, self.modes):
            model.to(device)
            for module, training in modes.items():
                module.training = training
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)


def sample_file_name(output_name: str | None, epoch: int | None, steps: int, index: int, seed: int | None) -> str:
    """`{output_name_}{YYYYmmddHHMMSS}_{e%06d|%06d}_{idx:02d}[_{seed}].png` (SPEC 1.9)."""
    prefix = f"{output_name}_" if output_name else ""
    timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    progress = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
    seed_suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{timestamp}_{progress}_{index:02d}{seed_suffix}.png"


def save_png(image: Image.Image, target: Path) -> None:
    """Write `image` atomically as PNG with its `info` strings as text chunks."""
    metadata = PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            metadata.add_text(key, value)
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG", pnginfo=metadata)


def sample_images(
    output_dir: str | Path,
    output_name: str | None,
    epoch: int | None,
    steps: int,
    prompts: str | Path | Sequence[SamplePrompt],
    unet,
    vae,
    text_encoder,
    tokenizer,
    sampler_name: str = "ddim",
    v_parameterization: bool = False,
    clip_skip: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_embeddings_multiples: int = 3,
    prompt_replacement: tuple[str, str] | None = None,
) -> list[Path]:
    """Generate the training samples into `<output_dir>/sample/` and return the written paths.

    `prompts` is a prompt file path or parsed prompts. `epoch` is set for end-of-epoch
    samples (file name `e000003`), None for step samples (`000150`). Models are used in
    eval mode on `device` (default: the UNet's) and put back as they were; `dtype` is the
    mixed-precision dtype (see `generate_images`). Torch, CUDA, numpy and Python RNG
    states are restored, so training continues on the same stream.
    """
    if isinstance(prompts, (str, Path)):
        prompts = load_sample_prompts(prompts)
    sample_dir = Path(output_dir) / "sample"
    sample_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else model_device(unet)
    written: list[Path] = []
    with _PreservedState([unet, vae, text_encoder], device):
        for request in prompts:
            (image,) = generate_images(
                unet, vae, text_encoder, tokenizer, request, sampler_name=sampler_name,
                v_parameterization=v_parameterization, clip_skip=clip_skip, device=device, dtype=dtype,
                max_embeddings_multiples=max_embeddings_multiples, prompt_replacement=prompt_replacement,
                show_progress=False,
            )
            target = sample_dir / sample_file_name(output_name, epoch, steps, request.index, request.seed)
            save_png(image, target)
            written.append(target)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("wrote %d sample images to %s", len(written), sample_dir)
    return written

