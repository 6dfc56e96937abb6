"""`gen_img_diffusers.py`'s run: models, networks and embeddings, prompt lines → batches →
images (txt2img, img2img, inpainting, highres fix), PNGs with their settings.

The images themselves come from `library.gen_pipeline` — the same code the training samples
use.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import torch
from PIL import Image

from library import gen_args, gen_regional, weight_mapping
from library.errors import UserError
from library.gen_jobs import (
    ImageJob,
    JobDefaults,
    SeedSource,
    batches,
    highres_first_size,
    image_sources,
    jobs_for_line,
    open_image,
    parse_line,
    planned_sizes,
    read_prompt_file,
)
from library.control_net import ControlNetSpec
from library.gen_control import control_kwargs_fn, load_from_args
from library.gen_embeddings import PromptToken, expand_prompt, load_embeddings
from library.gen_networks import LoadedNetwork, load_networks, set_multipliers
from library.gen_pipeline import (
    BatchSettings,
    GenModels,
    decode_latents,
    generate_latents,
    image_to_tensor,
    latent_scale_factor,
    mask_to_tensor,
)
from library.model_hash import model_hash
from library.model_util import load_target_model
from library.png_info import ImageRecord, image_file_name, text_chunks
from library.sampling import save_png

logger = logging.getLogger(__name__)


@dataclass
class ImageSources:
    """Image files of --image_path and --mask_path (used in turn, image by image) and --guide_image_path
    (ControlNet hints, in `control_net.make_units`' order)."""

    init: list[Path]
    masks: list[Path]
    guides: list[Path]


@dataclass
class Generator:
    """A loaded model with its networks, ready to turn jobs into saved images."""

    args: argparse.Namespace
    models: GenModels
    networks: list[LoadedNetwork]
    outdir: Path
    model_name: str | None = None
    model_hash: str | None = None
    tokens: list[PromptToken] = field(default_factory=list)  # embedding tokens to expand in prompts
    control_nets: list[ControlNetSpec] = field(default_factory=list)
    guide_images: list[Image.Image] = field(default_factory=list)  # ControlNet hint sources
    sequence_number: int = 0
    batch_count: int = 0
    written: list[Path] = field(default_factory=list)

    # -- one batch ---------------------------------------------------------------------
    def batch_latents(
        self, jobs: Sequence[ImageJob], width: int, height: int, steps: int, strength: float,
        init: Sequence[Image.Image] | None = None, init_latents: torch.Tensor | None = None, desc: str = "sampling",
    ) -> torch.Tensor:
        """Denoised latents of one batch at the given size / steps / strength (one stage)."""
        first = jobs[0]
        settings = BatchSettings(
            width, height, steps, first.scale, first.sampler, first.negative_scale, strength
        )
        init_images = None
        if init is not None and init_latents is None:
            init_images = torch.cat([image_to_tensor(image, width, height) for image in init])
        prompts = [expand_prompt(j.prompt, self.tokens) for j in jobs]
        negative_prompts = [expand_prompt(j.negative_prompt, self.tokens) for j in jobs]
        common = dict(
            seeds=[j.seed for j in jobs], init_images=init_images, init_latents=init_latents,
            unet_kwargs_fn=control_kwargs_fn(self.control_nets, self.guide_images, width, height, len(jobs)),
            progress_desc=desc,
        )
        if first.mask is not None and self.args.image_path is None:  # --mask_path holds region masks
            count = gen_regional.num_parts(first.prompt)
            if count > 1:
                return self._regional_latents(first, settings, prompts, negative_prompts, count, common)
            return generate_latents(self.models, settings, prompts, negative_prompts, **common)
        masks = None
        if first.mask is not None:
            masks = torch.cat([mask_to_tensor(job.mask, width, height) for job in jobs])
        return generate_latents(self.models, settings, prompts, negative_prompts, masks=masks, **common)

    def _regional_latents(self, first: ImageJob, settings: BatchSettings, prompts, negative_prompts, count, common):
        if settings.negative_scale is not None:
            raise UserError("regional prompts (AND with --mask_path) do not support --negative_scale / --nl")
        if any(n.merged or getattr(n.network, "_pre_calculated", False) for n in self.networks):
            raise UserError("regional LoRA needs unmerged networks (drop --network_merge / --network_pre_calc)")
        networks = [n.network for n in self.networks]
        guided = settings.scale > 1.0
        masks = gen_regional.latent_masks(self.models, first.mask, count, settings.width, settings.height)
        embeddings = gen_regional.regional_embeddings(self.models, networks, prompts, negative_prompts, guided)
        combine = gen_regional.guidance_fn(masks, len(prompts), guided, settings.scale)
        with gen_regional.regions_active(networks, masks, count, len(prompts), guided):
            return generate_latents(
                self.models, settings, prompts, negative_prompts, embeddings=embeddings, guidance_fn=combine, **common
            )

    def process_batch(self, jobs: Sequence[ImageJob]) -> list[Image.Image]:
        """Generate and save one batch; returns the final images."""
        self.batch_count += 1
        first = jobs[0]
        set_multipliers(self.networks, first.network_muls)
        desc = f"batch {self.batch_count}"
        init = [job.init_image for job in jobs] if first.init_image is not None else None
        strength = first.strength
        if self.args.highres_fix_scale is None:
            latents = self.batch_latents(jobs, first.width, first.height, first.steps, strength, init, None, desc)
            images = decode_latents(self.models, latents)
            self._save(jobs, images, "", first.width, first.height, strength if init else None)
            return images

        # highres fix: a small 1st stage, upscaled, then img2img at the requested size
        width_1st, height_1st = highres_first_size(first.width, first.height, self.args.highres_fix_scale)
        latents = self.batch_latents(
            jobs, width_1st, height_1st, self.args.highres_fix_steps, strength, init, None, f"{desc} (1st stage)"
        )
        images_1st = None
        if self.args.highres_fix_save_1st or not self.args.highres_fix_latents_upscaling:
            images_1st = decode_latents(self.models, latents)
        if self.args.highres_fix_save_1st:
            self._save(jobs, images_1st, "0", width_1st, height_1st, strength if init else None)
        strength_2nd = self.args.highres_fix_strength
        if strength_2nd is None:
            strength_2nd = self.args.strength if self.args.strength is not None else gen_args.DEFAULT_STRENGTH
        factor = latent_scale_factor(self.models.vae)
        if self.args.highres_fix_latents_upscaling:
            upscaled = torch.nn.functional.interpolate(
                latents, size=(first.height // factor, first.width // factor), mode="bilinear", align_corners=False
            )
            latents = self.batch_latents(jobs, first.width, first.height, first.steps, strength_2nd, [], upscaled, desc)
        else:
            upscaled_images = [image.resize((first.width, first.height), Image.LANCZOS) for image in images_1st]
            latents = self.batch_latents(
                jobs, first.width, first.height, first.steps, strength_2nd, upscaled_images, None, f"{desc} (2nd stage)"
            )
        images = decode_latents(self.models, latents)
        self._save(jobs, images, "1", first.width, first.height, strength_2nd)
        return images

    # -- saving ------------------------------------------------------------------------
    def _record(self, job: ImageJob, width: int, height: int, strength: float | None) -> ImageRecord:
        return ImageRecord(
            prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed, sampler=job.sampler,
            steps=job.steps, scale=job.scale, width=width, height=height, negative_scale=job.negative_scale,
            clip_prompt=job.clip_prompt, strength=strength, clip_skip=self.args.clip_skip,
            model_name=self.model_name, model_hash=self.model_hash,
        )

    def _target(self, job: ImageJob, position: int, stage: str, timestamp: str) -> Path:
        original = job.init_image_name if self.args.use_original_file_name else None
        if self.args.sequential_file_name:
            if stage != "0":  # the 1st-stage image shares its final image's number
                self.sequence_number += 1
            number = self.sequence_number + (1 if stage == "0" else 0)
            name = image_file_name(position, job.seed, stage, number, original)
        else:
            name = image_file_name(position, job.seed, stage, None, original, timestamp)
        target = self.outdir / name
        counter = 1
        while target.exists():  # never overwrite an image (two batches in one second, same seed)
            target = self.outdir / f"{Path(name).stem}-{counter}.png"
            counter += 1
        return target

    def _save(
        self, jobs: Sequence[ImageJob], images: Sequence[Image.Image], stage: str, width: int, height: int,
        strength: float | None,
    ) -> None:
        timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
        for position, (job, image) in enumerate(zip(jobs, images)):
            image.info = text_chunks(self._record(job, width, height, strength))
            target = self._target(job, position, stage, timestamp)
            save_png(image, target)
            self.written.append(target)
            logger.info("saved %s", target)

    # -- prompt lines --------------------------------------------------------------------
    def run_lines(self, lines: Iterable[str], seeds: SeedSource, defaults: JobDefaults, sources: "ImageSources") -> None:
        """Generate the images of the given lines, batching across lines."""
        jobs: list[ImageJob] = []
        for line in lines:
            parsed = parse_line(line)
            if parsed is None:
                continue
            jobs.extend(jobs_for_line(parsed, defaults, seeds, sources.init, sources.masks, len(jobs)))
        for batch in batches(jobs, self.args.batch_size):
            self.process_batch(batch)


def _dtype(args: argparse.Namespace) -> torch.dtype:
    if args.fp16:
        return torch.float16
    if args.bf16:
        return torch.bfloat16
    return torch.float32


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _set_attention(args: argparse.Namespace, unet) -> None:
    if args.xformers or args.diffusers_xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError("--xformers: the xformers package is not installed") from None
        unet.enable_xformers_memory_efficient_attention()
    elif args.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if args.opt_channels_last:
        unet.to(memory_format=torch.channels_last)


def load_generator(args: argparse.Namespace, sizes: Sequence[tuple[int, int]] | None = None) -> Generator:
    """Load the model, its networks and embeddings as the flags say.

    `sizes`: every (width, height) the run will generate at, where known. The frozen text encoder
    and the U-Net layers that give bit-identical results at those sizes when mapped from a
    `.safetensors` file (`weight_mapping`) are mapped, not copied; unknown sizes map no U-Net layer.
    Writes into mapped weights (`--network_merge`) go to private pages, never to the file.
    """
    dtype, device = _dtype(args), _device()
    loaded = load_target_model(
        args.ckpt, v2=args.v2 or None, v_parameterization=args.v_parameterization, vae=args.vae,
        dtype=dtype, device=device, tokenizer_cache_dir=args.tokenizer_cache_dir,
        map_frozen_weights="exact", smallest_latent_side=weight_mapping.smallest_latent_side(sizes or []),
    )
    for model in (loaded.unet, loaded.vae, loaded.text_encoder):
        model.eval().requires_grad_(False)
    _set_attention(args, loaded.unet)
    from library.slicing_vae import set_vae_slices  # diffusers VAE blocks: only once a model is loaded

    set_vae_slices(loaded.vae, args.vae_slices)
    control_nets = load_from_args(args, loaded.unet, loaded.v2, dtype, device)
    networks = load_networks(args, loaded.text_encoder, loaded.unet, loaded.vae, dtype, device)
    text_encoder, tokens = load_embeddings(args, loaded.tokenizer, loaded.text_encoder, loaded.unet)
    models = GenModels(
        loaded.unet, loaded.vae, text_encoder, loaded.tokenizer,
        v_parameterization=args.v_parameterization, clip_skip=args.clip_skip,
        max_embeddings_multiples=args.max_embeddings_multiples or 1,
        vae_batch_size=gen_args.vae_batch_size(args),
    )
    source = Path(args.ckpt)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    generator = Generator(
        args, models, networks, outdir, model_name=source.stem if source.is_file() else source.name,
        model_hash=model_hash(source) if source.is_file() else None, tokens=tokens,
        control_nets=control_nets,
    )
    if args.sequential_file_name:
        generator.sequence_number = _last_sequence_number(outdir)
    return generator


def _last_sequence_number(outdir: Path) -> int:
    """Sequential names continue after the highest number already in the folder."""
    numbers = [0]
    for path in outdir.glob("*.png"):
        digits = path.stem.rsplit("_", 1)[-1].split("-")[0]
        if digits.isdigit() and len(digits) >= 6:
            numbers.append(int(digits[-6:]))
    return max(numbers)


def run(args: argparse.Namespace, stdin: TextIO | None = None) -> list[Path]:
    """Generate everything `args` asks for; returns the written image paths."""
    sources = ImageSources(
        image_sources(args.image_path, "--image_path"),
        image_sources(args.mask_path, "--mask_path"),
        [p for path in args.guide_image_path or [] for p in image_sources(path, "--guide_image_path")],
    )
    lines: list[str] = []
    if args.from_file:
        lines = read_prompt_file(args.from_file)
    elif args.prompt is not None:
        lines = [args.prompt]
    defaults = JobDefaults(
        width=args.W, height=args.H, steps=args.steps, scale=args.scale, sampler=args.sampler,
        negative_scale=args.negative_scale, strength=args.strength, images_per_prompt=args.images_per_prompt,
    )
    # interactive lines come later: their sizes are not known at loading
    sizes = planned_sizes(lines, defaults, bool(sources.init), args.highres_fix_scale) if lines else None
    generator = load_generator(args, sizes)
    generator.guide_images = [open_image(path, "RGB") for path in sources.guides]
    seeds = SeedSource(args.seed, args.iter_same_seed)
    if args.interactive and not lines:
        if stdin is None:
            raise UserError("--interactive needs a stdin stream")
        _interactive(generator, stdin, seeds, defaults, sources)
    else:
        for iteration in range(args.n_iter):
            logger.info("iteration %d/%d", iteration + 1, args.n_iter)
            seeds.start_iteration()
            generator.run_lines(lines, seeds, defaults, sources)
    logger.info("wrote %d images to %s", len(generator.written), generator.outdir)
    return generator.written


def _interactive(generator: Generator, stdin: TextIO, seeds: SeedSource, defaults: JobDefaults, sources: "ImageSources") -> None:
    """Read prompt lines until EOF; each line is generated (`--n_iter` times) before the next is read."""
    while True:
        print("Type prompt (end with Ctrl-D / EOF):", flush=True)
        line = stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        for _ in range(generator.args.n_iter):
            seeds.start_iteration()
            generator.run_lines([line], seeds, defaults, sources)
