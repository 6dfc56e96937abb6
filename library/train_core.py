"""The one training loop shared by every trainer (LoRA, DreamBooth, fine-tune, textual inversion).

A script describes *what* trains and *what* is saved with a `TrainingMethod`; `run_training`
does everything else: accelerate set-up, model loading, dataset and latent cache, optimizer and
scheduler, the diffusion loss, gradient accumulation, saving cadence, states for `--resume`,
sample images, progress bar and trackers.

Exact resume by construction: batches come from keys `(epoch, batch_index)` (the dataset is
stateless), and all randomness of one micro-batch (noise, timesteps, VAE sampling, network
dropout) comes from a seed derived from `(seed, epoch, batch_index)`. A resumed run therefore
starts the sampler at the saved batch index and reproduces the uninterrupted run bit for bit.

NaN/inf losses are caught when the loss is read anyway (every step on CPU, every
`LOSS_READ_INTERVAL` steps on accelerators, before saves): no per-step host sync on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from library import nonfinite, preflight, resume_util, stage_timer, train_saving, train_util, weight_mapping
from library.caption_states import TextEmbeddingCache, captions_ahead, text_encode_fn  # noqa: F401 - re-exported
from library.errors import UserError
# the script-facing contract lives in train_method; re-exported (train_core.TrainingMethod, ...)
from library.train_method import TrainContext, TrainHooks, TrainingMethod, TrainResult  # noqa: F401

logger = logging.getLogger(__name__)

LOSS_READ_INTERVAL = 10  # optimizer steps between loss reads (host syncs) on accelerators


# --- helpers --------------------------------------------------------------------------
def step_seed(seed: int, epoch: int, batch_index: int) -> int:
    """Seed of all randomness of one micro-batch, derived statelessly from its key."""
    return int(np.random.SeedSequence([seed, epoch, batch_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _check_core_args(args: argparse.Namespace) -> None:
    """Checks of the core beyond `train_util.verify_training_args`."""
    if getattr(args, "pretrained_model_name_or_path", None) is None:
        raise UserError("--pretrained_model_name_or_path is required")
    if not getattr(args, "output_dir", None):
        raise UserError("--output_dir is required (the folder the trained model is saved to)")
    for flag in ("huggingface_repo_id", "save_state_to_huggingface", "resume_from_huggingface"):
        if getattr(args, flag, None):
            raise UserError(f"--{flag}: uploading to / resuming from the Hugging Face Hub is not supported (offline toolkit)")


def _build_accelerator(args: argparse.Namespace, find_unused_parameters: bool = False):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    log_with = getattr(args, "log_with", None)
    logging_dir = None
    if getattr(args, "logging_dir", None):
        logging_dir = str(Path(args.logging_dir) / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")
        log_with = log_with or "tensorboard"
    if log_with in ("tensorboard", "all") and logging_dir is None:
        raise UserError(f"--log_with {log_with} requires --logging_dir")
    if log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--log_with {log_with} needs the wandb package: pip install wandb")
    if log_with in ("wandb", "all") and getattr(args, "wandb_api_key", None):
        import wandb

        wandb.login(key=args.wandb_api_key)
    # a previous run in this process (tests, notebooks) may have fixed other precision settings
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        # gradient accumulation is driven by the loop itself (sync points at epoch ends
        # and resumable positions), so accelerate's own counter stays at 1
        accelerator = Accelerator(
            cpu=not _has_accelerator_device(),  # also makes torchrun/accelerate multi-process CPU runs use gloo
            mixed_precision=getattr(args, "mixed_precision", "no") or "no",
            # --torch_compile: accelerate's prepare() compiles the step module (the U-Net forward)
            dynamo_backend=(getattr(args, "dynamo_backend", None) or "inductor") if getattr(args, "torch_compile", False) else "no",
            log_with=log_with,
            project_dir=logging_dir,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        )
    except (ValueError, RuntimeError) as err:
        raise UserError(f"cannot set up accelerate (--mixed_precision {args.mixed_precision}): {err}") from err
    return accelerator


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


def _patch_scaler_for_fp16_grads(accelerator) -> None:
    """--full_fp16: let the GradScaler unscale fp16 gradients (torch refuses by default)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16


def _place(model: nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> None:
    """Move a model; cast only when the dtype really changes (diffusers warns on every cast).
    Weights stored in fp8 (`--fp8_base`) stay in fp8."""
    from library import fp8_layers

    model.to(device)
    if dtype is not None and fp8_layers.compute_dtype(model) != dtype:
        fp8_layers.cast_model(model, dtype)


def _noise_scheduler(args: argparse.Namespace, device: torch.device) -> Any:
    from library import custom_train_functions as ctf
    from library import samplers

    noise_scheduler = samplers.get_noise_scheduler(bool(getattr(args, "v_parameterization", False)))
    ctf.prepare_scheduler_for_custom_training(noise_scheduler, device)
    if getattr(args, "zero_terminal_snr", False):
        ctf.fix_noise_scheduler_betas_for_zero_terminal_snr(noise_scheduler)
    return noise_scheduler


def _set_attention(args: argparse.Namespace, unet: nn.Module, vae: nn.Module) -> None:
    if getattr(args, "xformers", False):
        if importlib.util.find_spec("xformers") is None:
            raise UserError("--xformers: the xformers package is not installed (pip install xformers)")
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
        logger.info("attention: xformers")
    elif getattr(args, "mem_eff_attn", False):
        # PyTorch's SDPA picks its memory-efficient kernel where the device has one
        logger.info("attention: --mem_eff_attn uses PyTorch scaled_dot_product_attention (memory-efficient kernel)")
    else:
        logger.info("attention: PyTorch scaled_dot_product_attention")


class DiffusionStep(nn.Module):
    """What accelerate/DDP wraps: trained modules are registered; frozen ones are not, which keeps
    them out of DDP broadcasts and saved states (a LoRA state holds only the network)."""

    def __init__(self, trainable: dict[str, nn.Module], unet: nn.Module, encode_text: Callable[[list[str]], torch.Tensor]):
        super().__init__()
        self.trainable = nn.ModuleDict(trainable)
        object.__setattr__(self, "_unet", unet)
        object.__setattr__(self, "_encode_text", encode_text)

    def forward(self, noisy_latents, timesteps, encoder_hidden_states=None, captions=None):
        if encoder_hidden_states is None:
            encoder_hidden_states = self._encode_text(captions)
        return self._unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]


# --- data, latents, text, samples ------------------------------------------------------
def _build_dataset_group(args: argparse.Namespace, method: TrainingMethod, accelerator: Any) -> Any:
    """The DatasetGroup from `--dataset_config` or the dataset flags (sd-scripts rules)."""
    from library import config_util

    train_util.prepare_dataset_args(args, method.support_finetuning)
    group = config_util.build_dataset_group(
        args, method.support_dreambooth, method.support_finetuning, method.support_dropout, seed=args.seed
    )
    group.set_step_mapping(accelerator.num_processes, args.gradient_accumulation_steps or 1)
    return group


def _cache_latents(
    args: argparse.Namespace, vae: nn.Module, dataset_group: Any, accelerator: Any, weight_dtype: torch.dtype,
    resume_stage: str = "setup",
) -> None:
    """Encode every image once with the VAE; the VAE then leaves the accelerator.
    `resume_stage`: the timing stage the caching interrupted (loading, when the VAE loads first)."""
    stage_timer.mark("caching")
    device = accelerator.device
    _place(vae, device, nonfinite.vae_dtype(args, weight_dtype))
    vae.eval()
    with torch.no_grad():
        dataset_group.cache_latents(
            vae, getattr(args, "vae_batch_size", 1) or 1, bool(getattr(args, "cache_latents_to_disk", False)),
            accelerator.is_main_process,
        )
    vae.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    stage_timer.mark(resume_stage)


def _vae_needed_after_caching(args: argparse.Namespace, sample_prompts: Sequence[Any]) -> bool:
    """With cached latents, only sample images use the VAE later (whole-model saves re-read it)."""
    return not getattr(args, "cache_latents", False) or bool(sample_prompts)


def _batches_per_rank(num_batches: int, world_size: int) -> int:
    from library.datasets import EpochBatchSampler

    return len(EpochBatchSampler(num_batches, 0, 0, 0, world_size))


def _make_loader(args: argparse.Namespace, ctx: TrainContext, start_epoch: int, start_batch: int) -> Any:
    """The run's DataLoader (datasets.make_dataloader); the loop moves it from epoch to epoch."""
    from library import datasets

    accelerator = ctx.accelerator
    return datasets.make_dataloader(
        ctx.dataset_group, start_epoch, start_batch,
        n_workers=int(getattr(args, "max_data_loader_n_workers", 0) or 0),
        persistent=bool(getattr(args, "persistent_data_loader_workers", False)),
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        pin_memory=accelerator.device.type == "cuda",
    )


def _batch_latents(batch: dict, ctx: TrainContext, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents of a batch: cached ones, or VAE-encoded now (no grad)."""
    vae = ctx.models.vae
    latents = batch.get("latents")
    if latents is not None:
        latents = latents.to(device, dtype=ctx.weight_dtype, non_blocking=True)
    else:
        images = batch["images"].to(device, dtype=vae.dtype, non_blocking=True)  # float32 with --no_half_vae
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator)
        latents = torch.nan_to_num(latents, 0.0).to(ctx.weight_dtype)  # fp16 VAEs may overflow on some images
    return latents * vae.config.scaling_factor


def _sample_during_training(args, ctx: TrainContext, method: TrainingMethod, epoch: Optional[int], step: int) -> None:
    from library import sampling

    if not sampling.should_sample(
        epoch, step, getattr(args, "sample_every_n_epochs", None), getattr(args, "sample_every_n_steps", None),
        bool(getattr(args, "sample_at_first", False)),
    ):
        return
    accelerator = ctx.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        text_encoder, unet = method.sampling_models(ctx)
        sampling.sample_images(
            args.output_dir, getattr(args, "output_name", None), epoch, step, ctx.sample_prompts,
            unet, ctx.models.vae, text_encoder, ctx.models.tokenizer,
            sampler_name=getattr(args, "sample_sampler", "ddim") or "ddim",
            v_parameterization=bool(getattr(args, "v_parameterization", False)),
            clip_skip=getattr(args, "clip_skip", None), device=accelerator.device, dtype=ctx.weight_dtype,
            prompt_replacement=method.prompt_replacement(ctx),
        )
    accelerator.wait_for_everyone()


# --- the loop -------------------------------------------------------------------------
class _Runner:
    """State of one run; `run_training` is the entry point."""

    def __init__(self, args: argparse.Namespace, method: TrainingMethod, hooks: TrainHooks):
        self.args, self.method, self.hooks = args, method, hooks
        self.pending: list[tuple[int, torch.Tensor, list[float]]] = []  # (step, loss, lrs) not read yet
        self.step_losses: list[float] = []
        self.epoch_losses: list[float] = []

    # set-up ---------------------------------------------------------------------------
    def setup(self) -> Any:
        """Check flags, set up accelerate and build the DatasetGroup (returned); no model yet."""
        from library import model_util, sampling

        args, method = self.args, self.method
        _check_core_args(args)
        train_util.verify_training_args(args)
        if getattr(args, "cache_latents_to_disk", False):
            args.cache_latents = True
        method.verify_args(args)
        if getattr(args, "resume", None):
            args.resume = str(resume_util.resolve_resume_path(args.resume))  # an output folder: its latest state
        resume_state = train_saving.read_resume_json(getattr(args, "resume", None))
        self.fingerprint = resume_util.run_fingerprint(args, method)  # recorded in every state
        if getattr(args, "resume", None):  # another run's state stops here, before data and models load
            resume_util.check_run_fingerprint(args.resume, resume_state, self.fingerprint)
        if args.seed is None and "seed" in resume_state:
            args.seed = int(resume_state["seed"])  # a resumed run keeps the random seed it started with
        train_util.resolve_seed(args)
        sample_prompts = sampling.load_sample_prompts(args.sample_prompts) if getattr(args, "sample_prompts", None) else []
        if not getattr(args, "debug_dataset", False):  # --debug_dataset writes nothing
            preflight.check_training_outputs(args, bool(sample_prompts))  # not at the first save, hours later
        self.guard = nonfinite.NonFiniteGuard(args)
        accelerator = _build_accelerator(args, method.ddp_find_unused_parameters)
        weight_dtype = model_util.precision_to_dtype(args.mixed_precision) or torch.float32
        save_dtype = model_util.precision_to_dtype(getattr(args, "save_precision", None))
        if getattr(args, "full_fp16", False) and save_dtype is None:
            save_dtype = torch.float16
        torch.manual_seed(args.seed)
        dataset_group = _build_dataset_group(args, method, accelerator)  # data errors before the slow model load
        method.prepare_dataset(args, dataset_group)
        if len(dataset_group) == 0:
            raise UserError("no training images found: check --train_data_dir / --dataset_config")
        if getattr(args, "cache_latents_to_disk", False) and not getattr(args, "debug_dataset", False):
            preflight.check_latent_cache_folders(preflight.latent_cache_folders(dataset_group))
        self.accelerator, self.weight_dtype, self.save_dtype = accelerator, weight_dtype, save_dtype
        self.sample_prompts, self.dataset_group, self.resume_state = sample_prompts, dataset_group, resume_state
        return dataset_group

    def load_models(self) -> TrainContext:
        from library import model_util

        args, method, accelerator, weight_dtype = self.args, self.method, self.accelerator, self.weight_dtype
        load_device = accelerator.device if getattr(args, "lowram", False) else torch.device("cpu")
        self.latents_cached = False
        use_vae_first = None
        if not _vae_needed_after_caching(args, self.sample_prompts):
            # cache latents before the U-Net and text encoder load; the VAE's weights are then
            # freed, so the three models are never resident together (the run's memory peak)
            def use_vae_first(vae: nn.Module) -> None:
                if getattr(args, "xformers", False):  # as _set_attention does for the later models
                    vae.enable_xformers_memory_efficient_attention()
                _cache_latents(args, vae, self.dataset_group, accelerator, weight_dtype, resume_stage="loading")
                self.latents_cached = True

        maps_rows = bool(getattr(method, "maps_token_embedding", False))
        mapping = ("all" if getattr(args, "mmap_frozen_weights", False) else "exact") if maps_rows else "none"
        sizes = [*self.dataset_group.bucket_resolutions(), *((p.width, p.height) for p in self.sample_prompts)]
        models = model_util.load_target_model(
            args.pretrained_model_name_or_path,
            v2=bool(getattr(args, "v2", False)),
            v_parameterization=bool(getattr(args, "v_parameterization", False)),
            vae=getattr(args, "vae", None),
            dtype=method.model_load_dtype(args, weight_dtype),
            device=load_device,
            tokenizer_cache_dir=getattr(args, "tokenizer_cache_dir", None),
            use_vae_first=use_vae_first,
            # a method that only looks token rows up maps the table (model_util.load_target_model);
            # its base stays frozen, so the rest is mapped as far as results stay bit-identical,
            # and with --mmap_frozen_weights all of it
            map_token_embedding=maps_rows,
            map_frozen_weights=mapping,
            smallest_latent_side=weight_mapping.smallest_latent_side(sizes),
            fp8_models=method.fp8_models(args),
        )
        if models.v2 and not args.v2:
            logger.info("the model is an SD v2 model: training as v2")
            args.v2 = True
        ctx = TrainContext(
            args=args, accelerator=accelerator, models=models, weight_dtype=weight_dtype, save_dtype=self.save_dtype,
            sample_prompts=self.sample_prompts, dataset_group=self.dataset_group,
        )
        ctx.noise_scheduler = _noise_scheduler(args, accelerator.device)
        self.ctx = ctx
        return ctx

    def prepare(self) -> None:
        args, method, ctx, accelerator = self.args, self.method, self.ctx, self.ctx.accelerator
        models = ctx.models
        device = accelerator.device
        _set_attention(args, models.unet, models.vae)
        if args.cache_latents and not self.latents_cached:
            _cache_latents(args, models.vae, ctx.dataset_group, accelerator, ctx.weight_dtype)
        torch.manual_seed(args.seed)  # network initialisation does not depend on what ran before
        method.setup(ctx)

        frozen_dtype = ctx.weight_dtype
        models.vae.requires_grad_(False)
        models.vae.eval()
        if not args.cache_latents:
            _place(models.vae, device, nonfinite.vae_dtype(args, frozen_dtype))
        for model in (models.unet, models.text_encoder):  # trained base weights keep their dtype
            _place(model, device, None if any(p.requires_grad for p in model.parameters()) else frozen_dtype)
        if args.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            models.unet.train()
            if method.train_text_encoder:
                enable = getattr(models.text_encoder, "activation_checkpointing_enable", None)
                (enable or models.text_encoder.gradient_checkpointing_enable)()
                models.text_encoder.train()
        else:
            models.unet.train(method.train_unet)
            models.text_encoder.train(method.train_text_encoder)

        trainable = method.trainable_modules(ctx)
        trainable_params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
        if not trainable_params:
            raise UserError("nothing to train: the training method has no trainable parameters")
        if getattr(args, "full_fp16", False) or getattr(args, "full_bf16", False):
            logger.info("full %s training: trained weights and gradients in %s", args.mixed_precision, ctx.weight_dtype)
            for module in trainable.values():
                module.to(ctx.weight_dtype)

        from library import optimizers

        ctx.optimizer_name, ctx.optimizer_args, optimizer = optimizers.get_optimizer(args, method.optimizer_params(ctx))
        self._compute_lengths()
        lr_scheduler = optimizers.get_scheduler_fix(args, optimizer, accelerator.num_processes)

        self.encode_text = self._make_text_encoder()
        step_module = DiffusionStep(trainable, models.unet, self.encode_text)
        step_module, optimizer, lr_scheduler = accelerator.prepare(step_module, optimizer, lr_scheduler)
        if getattr(args, "full_fp16", False):
            _patch_scaler_for_fp16_grads(accelerator)
        self.step_module = ctx.step_module = step_module
        self.trainable_params = trainable_params
        ctx.optimizer, ctx.lr_scheduler = optimizer, lr_scheduler

        self.start_epoch, self.start_batch = 0, 0
        if getattr(args, "resume", None):
            state = train_saving.load_train_state(accelerator, args.resume) or self.resume_state
            ctx.global_step, self.start_epoch, self.start_batch = train_saving.resume_position(
                state, accelerator.num_processes, ctx.num_batches_per_epoch
            )
            self.guard.skipped = int(state.get("skipped_nonfinite_steps", 0) or 0)  # older states: 0
        if isinstance(self.encode_text, TextEmbeddingCache):
            self._fill_text_cache()

    def _fill_text_cache(self) -> None:
        """Encode the captions of every batch the run will show before the loop starts, so the
        text encoder never runs inside a step (lazily, each new caption cost a step a text-encoder
        forward). Same states bit for bit: one caption per call, frozen encoder in eval mode."""
        args, ctx, cache = self.args, self.ctx, self.encode_text
        stage_timer.mark("caching")
        world = ctx.accelerator.num_processes
        batches = max(0, ctx.max_train_steps - ctx.global_step) * (args.gradient_accumulation_steps or 1) * world
        captions = captions_ahead(ctx.dataset_group, self.start_epoch, self.start_batch, batches, cache.max_entries)
        added = cache.fill(captions)
        logger.info("text encoder outputs cached for %d captions", added)
        if self.method.releases_cached_text_encoder and not ctx.sample_prompts and len(captions) < cache.max_entries:
            # every caption the loop will show is cached (captions_ahead was not cut at the limit)
            # and nothing samples: the encoder's weights are not needed again, as the VAE's are not
            from library import model_util

            cache.seal()
            model_util.release_weights(ctx.models.text_encoder)
            model_util.return_freed_memory()
            logger.info("text encoder released: the states of every caption of the run are cached")
        stage_timer.mark("setup")

    def _compute_lengths(self) -> None:
        args, ctx = self.args, self.ctx
        world = ctx.accelerator.num_processes
        ctx.num_batches_per_epoch = len(ctx.dataset_group)
        self.batches_per_rank = _batches_per_rank(ctx.num_batches_per_epoch, world)
        ctx.batches_per_process = self.batches_per_rank
        accumulation = args.gradient_accumulation_steps or 1
        self.updates_per_epoch = math.ceil(self.batches_per_rank / accumulation)
        if getattr(args, "max_train_epochs", None):
            args.max_train_steps = args.max_train_epochs * self.updates_per_epoch
            logger.info("--max_train_epochs %d => %d steps", args.max_train_epochs, args.max_train_steps)
        ctx.max_train_steps = args.max_train_steps
        ctx.num_train_epochs = math.ceil(args.max_train_steps / self.updates_per_epoch)
        if hasattr(ctx.dataset_group, "set_max_train_steps"):
            ctx.dataset_group.set_max_train_steps(args.max_train_steps)

    def _make_text_encoder(self) -> Callable[[list[str]], torch.Tensor]:
        args, ctx, method = self.args, self.ctx, self.method
        encode = text_encode_fn(args, ctx)
        # unpadded states differ in length per caption: they cannot be cached one caption at a time
        fixed = ctx.dataset_group.captions_are_fixed() and not getattr(args, "no_token_padding", False)
        if not method.train_text_encoder and fixed:
            logger.info("caching text encoder outputs per caption")
            return TextEmbeddingCache(encode, ctx.accelerator.device)
        return encode

    # the loop ---------------------------------------------------------------------------
    def train(self) -> TrainResult:
        args, ctx, method, accelerator = self.args, self.ctx, self.method, self.ctx.accelerator
        plan = train_saving.SavePlan.from_args(args, ctx.num_train_epochs)
        self.plan = plan
        ext = method.model_extension(args)
        if accelerator.is_main_process:
            accelerator.init_trackers(getattr(args, "log_tracker_name", None) or method.tracker_name)
        (logger.info if accelerator.is_main_process else logger.debug)(
            "training: %d batches per epoch, %d epochs, %d steps, %d processes, batch size %s, accumulation %d",
            ctx.num_batches_per_epoch, ctx.num_train_epochs, ctx.max_train_steps, accelerator.num_processes,
            getattr(args, "train_batch_size", None), args.gradient_accumulation_steps,
        )
        progress = tqdm(
            total=ctx.max_train_steps, initial=ctx.global_step, smoothing=0,
            disable=not accelerator.is_local_main_process, desc="steps",
        )
        self.progress = progress
        if self.hooks.on_train_start is not None:
            self.hooks.on_train_start(ctx)
        read_every = 1 if accelerator.device.type == "cpu" else LOSS_READ_INTERVAL
        if getattr(args, "sample_at_first", False) and ctx.global_step == 0:
            self._sample(epoch=0, step=0)

        stage_timer.mark("loop")
        loader = _make_loader(args, ctx, self.start_epoch, self.start_batch)
        accumulation = args.gradient_accumulation_steps or 1
        world = accelerator.num_processes
        epoch = self.start_epoch
        micro = self.start_batch // world  # this rank's position in the epoch
        stopped = ctx.global_step >= ctx.max_train_steps
        if not stopped:
            self._epoch_start(epoch)
        finished = stopped
        step_loss = None
        while not finished and epoch < ctx.num_train_epochs:
            loader.sampler.set_epoch(epoch, micro * world)  # persistent workers keep serving the loader
            for (key_epoch, batch_index), batch in loader:
                if key_epoch != epoch:
                    raise RuntimeError(f"batch order broken: got epoch {key_epoch} while in epoch {epoch}")
                sync = (micro + 1) % accumulation == 0 or micro + 1 == self.batches_per_rank
                seed = step_seed(args.seed, epoch, batch_index)
                torch.manual_seed(seed)  # network dropout and other users of the global RNG
                generator = torch.Generator(device=accelerator.device).manual_seed(seed)
                with accelerator.no_sync(self.step_module) if not sync else contextlib.nullcontext():
                    loss = self._loss(batch, generator)
                    accelerator.backward(loss / accumulation)
                detached = loss.detach()
                step_loss = detached if step_loss is None else step_loss + detached
                micro += 1
                if sync:
                    if self.guard.skips and not self.guard.step_is_finite(step_loss, accelerator):
                        self._skip_nonfinite_step(micro, accumulation, step_loss)
                    else:
                        self._optimizer_step(micro, accumulation, step_loss)
                    step_loss = None
                    if len(self.pending) >= read_every:
                        self._read_losses()
                    self._after_step(epoch, micro, ext)
                if micro == self.batches_per_rank:
                    self._epoch_end(epoch, ext)
                    epoch, micro = epoch + 1, 0
                    if epoch < ctx.num_train_epochs and ctx.global_step < ctx.max_train_steps:
                        self._epoch_start(epoch)
                if self._stop_requested():
                    stopped = finished = True
                    break
                if ctx.global_step >= ctx.max_train_steps or epoch >= ctx.num_train_epochs:
                    finished = True
                    break
            else:
                finished = micro != 0  # defensive: an epoch's keys ran out before its last batch
        self.position = (epoch, micro)
        self._read_losses()
        progress.close()
        final_path = None
        if not stopped:
            stage_timer.mark("save")
            final_path = self._final_save(ext)
        ctx.accelerator.end_training()
        if self.hooks.on_train_end is not None:
            self.hooks.on_train_end(ctx)
        return TrainResult(ctx.global_step, ctx.epoch, list(self.step_losses), final_path, stopped)

    def _optimizer_step(self, micro: int, accumulation: int, step_loss: torch.Tensor) -> None:
        args, ctx = self.args, self.ctx
        if getattr(args, "max_grad_norm", 0):
            ctx.accelerator.clip_grad_norm_(self.trainable_params, args.max_grad_norm)
        ctx.optimizer.step()
        ctx.lr_scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.global_step += 1
        stage_timer.step_done()
        self.method.on_step_end(ctx)
        self.progress.update(1)
        micro_in_step = micro % accumulation or accumulation
        lrs = [float(lr) for lr in ctx.lr_scheduler.get_last_lr()]
        self.pending.append((ctx.global_step, step_loss / micro_in_step, lrs))

    def _skip_nonfinite_step(self, micro: int, accumulation: int, step_loss: torch.Tensor) -> None:
        """--skip_nonfinite_steps: drop this step's gradients; the step counts, the weights stay."""
        ctx = self.ctx
        ctx.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when no optimizer step came before (a skipped first step)
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            ctx.lr_scheduler.step()  # the schedule stays aligned with the step count (and with resume)
        ctx.global_step += 1
        self.progress.update(1)
        lrs = [float(lr) for lr in ctx.lr_scheduler.get_last_lr()]
        if self.guard.skipped >= self.guard.limit:
            self.progress.close()  # the run stops: the error line then starts on its own line
        self.guard.record_skip(ctx.global_step, float(step_loss.float() / (micro % accumulation or accumulation)), lrs)

    def _stop_requested(self) -> bool:
        stop = self.hooks.stop_after_step
        return stop is not None and self.ctx.global_step >= stop

    def _epoch_start(self, epoch: int) -> None:
        self.ctx.epoch = epoch
        self.epoch_losses = []
        logger.info("epoch %d/%d", epoch + 1, self.ctx.num_train_epochs)
        self.method.on_epoch_start(self.ctx, epoch)

    def _loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        from library import custom_train_functions as ctf

        args, ctx = self.args, self.ctx
        device = ctx.accelerator.device
        latents = _batch_latents(batch, ctx, device, generator)
        noise, noisy_latents, timesteps = ctf.get_timesteps_and_noisy_latents(args, ctx.noise_scheduler, latents, generator)
        captions = list(batch["captions"])
        if self.method.train_text_encoder:
            prediction = self.step_module(noisy_latents, timesteps, captions=captions)
        else:
            with torch.no_grad():
                states = self.encode_text(captions)
            prediction = self.step_module(noisy_latents, timesteps, states)
        target = ctf.get_target(ctx.noise_scheduler, latents, noise, timesteps, bool(getattr(args, "v_parameterization", False)))
        return ctf.compute_loss(args, ctx.noise_scheduler, prediction, target, timesteps, batch.get("loss_weights"))

    def _read_losses(self) -> None:
        """Read pending losses (one host sync), check them, update progress bar and trackers."""
        if not self.pending:
            return
        ctx, accelerator = self.ctx, self.ctx.accelerator
        values = torch.stack([loss.float() for _, loss, _ in self.pending]).cpu().tolist()
        for (step, _, lrs), value in zip(self.pending, values):
            if not math.isfinite(value):
                self.progress.close()  # the error line then starts on its own line
            self.guard.check(step, value, lrs)
            self.step_losses.append(value)
            self.epoch_losses.append(value)
            average = sum(self.epoch_losses) / len(self.epoch_losses)
            logs = {"loss/current": value, "loss/average": average}
            names = self.method.lr_log_names(ctx, len(lrs))
            for name, lr, group in zip(names, lrs, ctx.optimizer.param_groups):
                logs[name] = lr
                if "d" in group:  # D-Adaptation / Prodigy report the effective lr
                    logs[f"{name}/d*lr"] = float(group["d"]) * float(group["lr"])
            accelerator.log(logs, step=step)
        self.progress.set_postfix(avr_loss=f"{average:.4g}", loss=f"{value:.4g}", lr=f"{lrs[0]:.3g}")
        self.pending = []

    def _after_step(self, epoch: int, micro: int, ext: str) -> None:
        args, ctx, plan = self.args, self.ctx, self.plan
        step = ctx.global_step
        self._sample(epoch=None, step=step)
        if plan.saves_at_step(step):
            self._read_losses()
            self._save_model(plan.step_model_path(step, ext), epoch, step, final=False)
            self._remove(plan.outdated_step_model(step, ext))
            if plan.save_state:
                self._save_state(plan.step_state_dir(step), epoch, micro)
                self._remove(plan.outdated_step_state(step))

    def _epoch_end(self, epoch: int, ext: str) -> None:
        plan = self.plan
        epoch_no = epoch + 1
        self._read_losses()
        if self.epoch_losses:
            self.ctx.accelerator.log({"loss/epoch": sum(self.epoch_losses) / len(self.epoch_losses)}, step=epoch_no)
        if plan.saves_at_epoch_end(epoch_no):
            self._save_model(plan.epoch_model_path(epoch_no, ext), epoch_no, self.ctx.global_step, final=False)
            self._remove(plan.outdated_epoch_model(epoch_no, ext))
            if plan.save_state:
                self._save_state(plan.epoch_state_dir(epoch_no), epoch_no, 0)
                self._remove(plan.outdated_epoch_state(epoch_no))
        self._sample(epoch=epoch_no, step=self.ctx.global_step)

    def _final_save(self, ext: str) -> Optional[Path]:
        plan, ctx = self.plan, self.ctx
        path = plan.last_model_path(ext)
        self._save_model(path, ctx.num_train_epochs, ctx.global_step, final=True)
        if plan.save_state or getattr(self.args, "save_state_on_train_end", False):
            self._save_state(plan.last_state_dir(), *self.position)
        return path

    def _save_model(self, path: Path, epoch_no: int, step: int, final: bool) -> None:
        accelerator = self.ctx.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            logger.info("saving model: %s", path)
            self.method.save(self.ctx, path, epoch_no, step, final)
        accelerator.wait_for_everyone()

    def _save_state(self, state_dir: Path, epoch: int, micro_in_epoch: int) -> None:
        ctx = self.ctx
        if micro_in_epoch >= self.batches_per_rank:  # a step that ended an epoch
            epoch, micro_in_epoch = epoch + 1, 0
        train_state = train_saving.train_state_dict(
            ctx.global_step, epoch, micro_in_epoch, ctx.accelerator.num_processes, self.args.seed, ctx.max_train_steps,
            run=self.fingerprint, skipped_nonfinite_steps=self.guard.skipped,
        )
        train_saving.save_train_state(ctx.accelerator, state_dir, train_state)

    def _remove(self, path: Optional[Path]) -> None:
        if self.ctx.accelerator.is_main_process:
            train_saving.remove_old(path)

    def _sample(self, epoch: Optional[int], step: int) -> None:
        if self.ctx.sample_prompts:
            _sample_during_training(self.args, self.ctx, self.method, epoch, step)


def run_training(args: argparse.Namespace, method: TrainingMethod, hooks: Optional[TrainHooks] = None) -> TrainResult:
    """Train with `method` according to `args` (sd-scripts flags); returns losses and the output path."""
    stage_timer.reset()
    runner = _Runner(args, method, hooks or TrainHooks())
    dataset_group = runner.setup()
    if getattr(args, "debug_dataset", False):  # like sd-scripts: show the batches, load no model, train nothing
        from library import datasets

        datasets.debug_dataset(dataset_group, epoch=0, max_batches=8)
        return TrainResult(0, 0, [], None, True)
    stage_timer.mark("loading")
    runner.load_models()
    stage_timer.mark("setup")
    runner.prepare()
    result = runner.train()
    stage_timer.finish()  # SD_TRAINER_TIMINGS=<file>: the stage timings are written there
    return result
