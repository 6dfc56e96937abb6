"""Shared training flags (sd-scripts names, types and defaults), `--config_file` TOML, flag checks,
output names and small helpers used by every trainer.

Flag groups mirror kohya-ss/sd-scripts `library/train_util.py` so that command lines and TOML
configs written for sd-scripts work unchanged. Flags of newer sd-scripts that this toolkit does
not implement are refused with one clear line (`check_unsupported_flags`) instead of argparse's
generic usage error.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import random
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import toml

from library.errors import UserError
from library.io_util import write_text_atomic

logger = logging.getLogger(__name__)

# output names (SPEC 1.9); `ext` passed to the name helpers may be "safetensors" or ".safetensors"
EPOCH_STATE_NAME = "{}-{:06d}-state"
EPOCH_FILE_NAME = "{}-{:06d}"
LAST_STATE_NAME = "{}-state"
DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_LAST_OUTPUT_NAME = "last"
DEFAULT_STEP_NAME = "at"
STEP_STATE_NAME = "{}-step{:08d}-state"
STEP_FILE_NAME = "{}-step{:08d}"

SAMPLER_CHOICES = [
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
]
MAX_TOKEN_LENGTH_CHOICES = [None, 150, 225]
MIXED_PRECISION_CHOICES = ["no", "fp16", "bf16"]
SAVE_PRECISION_CHOICES = [None, "float", "fp16", "bf16"]
SAVE_MODEL_AS_CHOICES = [None, "ckpt", "safetensors", "diffusers", "diffusers_safetensors"]
LOG_WITH_CHOICES = [None, "tensorboard", "wandb", "all"]

# Flags of newer sd-scripts that this toolkit does not implement, with a short reason.
# Values that are harmless (the sd-scripts default) are accepted: see _UNSUPPORTED_ALLOWED_VALUES.
_UNSUPPORTED_GROUPS: dict[str, tuple[str, ...]] = {
    "fp8 base weights are for frozen base models: only train_network.py has them": ("fp8_base", "fp8_base_unet"),
    "masked loss is not implemented": ("masked_loss", "alpha_mask", "conditioning_data_dir"),
    "only the l2 loss is implemented": ("loss_type",),
    "Huber / smooth-L1 losses are not implemented": ("huber_c", "huber_schedule", "huber_scale"),
    "this loss variant is not implemented": (
        "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss",
    ),
    "validation datasets are not implemented": (
        "validation_split", "validation_seed", "validate_every_n_steps", "validate_every_n_epochs",
        "max_validation_steps",
    ),
    "max-norm regularisation is not implemented": ("scale_weight_norms",),
    "merging base network weights is not implemented": ("base_weights", "base_weights_multiplier"),
    "this scheduler option is not implemented": ("lr_decay_steps", "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio"),
    "DDP tuning is not supported": ("ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph"),
    "this caption / dataset option is not implemented": (
        "cache_info", "caption_separator", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
        "caption_prefix", "caption_suffix", "dataset_class", "resize_interpolation", "skip_cache_check",
    ),
    "this resume / saving option is not implemented (use --save_state / --resume)": (
        "skip_until_initial_step", "initial_epoch", "initial_step", "mem_eff_save",
    ),
    "this script writes no modelspec metadata (the trainers register these flags themselves)": (
        "metadata_title", "metadata_author", "metadata_description", "metadata_license", "metadata_tags",
    ),
    "this tracker option is not supported": ("wandb_run_name", "log_tracker_config", "log_config"),
    "SDXL / SD3 options are not supported (SD 1.x / 2.x only)": (
        "sdxl", "learning_rate_te1", "learning_rate_te2",
        "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "train_text_encoder_1",
        "train_text_encoder_2", "disable_mmap_load_safetensors", "fused_backward_pass", "blocks_to_swap",
        "cpu_offload_checkpointing",
    ),
}
UNSUPPORTED_FLAGS: dict[str, str] = {name: why for why, names in _UNSUPPORTED_GROUPS.items() for name in names}
# unsupported flags whose sd-scripts default value is harmless and therefore accepted
_UNSUPPORTED_ALLOWED_VALUES: dict[str, tuple] = {
    "loss_type": ("l2",),
    "huber_c": (0.1,),
    "huber_schedule": ("snr",),
    "caption_separator": (",",),
    "keep_tokens_separator": ("",),
}
# sd-scripts' --dynamo_backend choices (those torch does not register here are refused at start)
DYNAMO_BACKEND_CHOICES = [
    "eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt", "onnxrt",
    "tensort", "ipex", "tvm",
]


class OutputConfigWritten(SystemExit):
    """Signal: `--output_config` wrote the TOML; the script must stop without training, status 0.

    A SystemExit subclass (code 0) so that a script that does not catch it still ends quietly with
    status 0, as sd-scripts does; scripts may catch it to clean up first. `.path` is the TOML written.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(0)
        self.path = path


def default_if_none(value: Any, default: Any) -> Any:
    return default if value is None else value


def int_or_float(value: str) -> Union[int, float]:
    """argparse type for `--lr_warmup_steps`: an int step count, or a float ratio of the total steps."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer or a float, got {value!r}") from err


# region flag groups


def add_sd_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--v2", action="store_true", help="load a Stable Diffusion v2.x model")
    parser.add_argument("--v_parameterization", action="store_true", help="enable v-parameterization training")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="model to train: Diffusers folder or StableDiffusion .ckpt/.safetensors file")
    parser.add_argument("--tokenizer_cache_dir", type=str, default=None,
                        help="directory for caching the tokenizer (for offline training)")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--optimizer_type", type=str, default="",
        help="optimizer: AdamW (default), AdamW8bit, Lion, Lion8bit, SGDNesterov, SGDNesterov8bit, DAdaptation(DAdaptAdam), "
        "DAdaptAdaGrad, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, AdaFactor, or module.ClassName",
    )
    # backward compatibility
    parser.add_argument("--use_8bit_adam", action="store_true", help="use 8bit AdamW optimizer (requires bitsandbytes)")
    parser.add_argument("--use_lion_optimizer", action="store_true", help="use Lion optimizer (requires lion-pytorch)")
    parser.add_argument("--learning_rate", type=float, default=2.0e-6, help="learning rate")
    parser.add_argument("--max_grad_norm", default=1.0, type=float, help="max gradient norm, 0 for no clipping")
    parser.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                        help='additional arguments for optimizer (like "weight_decay=0.01 betas=0.9,0.999 ...")')
    parser.add_argument("--lr_scheduler_type", type=str, default="", help="custom scheduler module.Class")
    parser.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                        help='additional arguments for scheduler (like "T_max=100")')
    parser.add_argument(
        "--lr_scheduler", type=str, default="constant",
        help="scheduler: linear, cosine, cosine_with_restarts, polynomial, constant (default), constant_with_warmup, adafactor",
    )
    parser.add_argument(
        "--lr_warmup_steps", type=int_or_float, default=0,
        help="warmup steps of the lr scheduler (default 0), or a float below 1 as a ratio of the train steps",
    )
    parser.add_argument("--lr_scheduler_num_cycles", type=int, default=1,
                        help="number of restarts for cosine_with_restarts")
    parser.add_argument("--lr_scheduler_power", type=float, default=1, help="power of the polynomial scheduler")


def add_training_arguments(parser: argparse.ArgumentParser, support_dreambooth: bool) -> None:
    parser.add_argument("--output_dir", type=str, default=None, help="directory to write the trained model to")
    parser.add_argument("--output_name", type=str, default=None, help="base name of the trained model file")
    parser.add_argument("--huggingface_repo_id", type=str, default=None, help="huggingface repo name to upload to")
    parser.add_argument("--huggingface_repo_type", type=str, default=None, help="huggingface repo type to upload to")
    parser.add_argument("--huggingface_path_in_repo", type=str, default=None, help="path in the huggingface repo")
    parser.add_argument("--huggingface_token", type=str, default=None, help="huggingface token")
    parser.add_argument("--huggingface_repo_visibility", type=str, default=None,
                        help="huggingface repository visibility ('public', or 'private'/None for private)")
    parser.add_argument("--save_state_to_huggingface", action="store_true", help="save state to huggingface")
    parser.add_argument("--resume_from_huggingface", action="store_true",
                        help="resume from huggingface (--resume {repo_id}/{path_in_repo}:{revision}:{repo_type})")
    parser.add_argument("--async_upload", action="store_true", help="upload to huggingface asynchronously")
    parser.add_argument("--save_precision", type=str, default=None, choices=SAVE_PRECISION_CHOICES,
                        help="precision of saved models")
    parser.add_argument("--save_every_n_epochs", type=int, default=None, help="save a checkpoint every N epochs")
    parser.add_argument("--save_every_n_steps", type=int, default=None, help="save a checkpoint every N steps")
    parser.add_argument("--save_n_epoch_ratio", type=int, default=None,
                        help="save so that at least N checkpoints are written in total")
    parser.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch checkpoints")
    parser.add_argument("--save_last_n_epochs_state", type=int, default=None,
                        help="keep only the last N epoch states (overrides --save_last_n_epochs for states)")
    parser.add_argument("--save_last_n_steps", type=int, default=None,
                        help="keep step checkpoints of the last N steps only")
    parser.add_argument("--save_last_n_steps_state", type=int, default=None,
                        help="keep step states of the last N steps only (overrides --save_last_n_steps for states)")
    parser.add_argument("--save_state", action="store_true",
                        help="also save the training state (optimizer etc.) with each model save")
    parser.add_argument("--save_state_on_train_end", action="store_true",
                        help="save the training state at the end of training (also without --save_state)")
    parser.add_argument("--resume", type=str, default=None,
                        help="saved state folder to resume training from, or an output folder: its latest state is used")
    from library.nonfinite import add_nonfinite_arguments  # reliability flags live with their logic

    add_nonfinite_arguments(parser)
    parser.add_argument("--train_batch_size", type=int, default=1, help="batch size for training")
    parser.add_argument("--max_token_length", type=int, default=None, choices=MAX_TOKEN_LENGTH_CHOICES,
                        help="max token length of the text encoder (default 75; 150 or 225)")
    parser.add_argument("--mem_eff_attn", action="store_true", help="use memory efficient attention for CrossAttention")
    parser.add_argument("--xformers", action="store_true", help="use xformers for CrossAttention")
    parser.add_argument("--sdpa", action="store_true", help="use torch scaled_dot_product_attention for CrossAttention")
    parser.add_argument("--vae", type=str, default=None, help="checkpoint file or folder of a VAE to use instead")
    parser.add_argument("--max_train_steps", type=int, default=1600, help="training steps")
    parser.add_argument("--max_train_epochs", type=int, default=None,
                        help="training epochs (overrides --max_train_steps)")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=8, help="max worker processes of the loader")
    parser.add_argument("--persistent_data_loader_workers", action="store_true",
                        help="keep the loader workers between epochs")
    parser.add_argument("--seed", type=int, default=None, help="random seed for training")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="enable gradient checkpointing")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="number of steps to accumulate before an optimizer update")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=MIXED_PRECISION_CHOICES,
                        help="use mixed precision")
    parser.add_argument("--full_fp16", action="store_true", help="fp16 training including gradients")
    parser.add_argument("--full_bf16", action="store_true", help="bf16 training including gradients")
    parser.add_argument("--torch_compile", action="store_true",
                        help="compile the training step's U-Net forward with torch.compile (through accelerate)")
    parser.add_argument("--dynamo_backend", type=str, default="inductor", choices=DYNAMO_BACKEND_CHOICES,
                        help="torch.compile backend for --torch_compile (default inductor)")
    parser.add_argument("--clip_skip", type=int, default=None,
                        help="use the output of the n-th last layer of the text encoder (n>=1)")
    parser.add_argument("--logging_dir", type=str, default=None, help="write TensorBoard logs to this directory")
    parser.add_argument("--log_with", type=str, default=None, choices=LOG_WITH_CHOICES, help="logging tool(s) to use")
    parser.add_argument("--log_prefix", type=str, default=None, help="prefix for each log directory")
    parser.add_argument("--log_tracker_name", type=str, default=None, help="name of the tracker used for logging")
    parser.add_argument("--wandb_api_key", type=str, default=None, help="WandB API key to log in with")
    parser.add_argument("--noise_offset", type=float, default=None,
                        help="enable noise offset with this value (around 0.1)")
    parser.add_argument("--noise_offset_random_strength", action="store_true",
                        help="use a random strength between 0 and noise_offset for the noise offset")
    parser.add_argument("--multires_noise_iterations", type=int, default=None,
                        help="enable multires (pyramid) noise with this number of iterations (around 6-10)")
    parser.add_argument(
        "--ip_noise_gamma", type=float, default=None,
        help="enable input perturbation noise with this strength (around 0.1, arxiv.org/abs/2301.11706)",
    )
    parser.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                        help="use a random strength between 0 and ip_noise_gamma for input perturbation noise")
    parser.add_argument("--multires_noise_discount", type=float, default=0.3,
                        help="discount of multires noise (only with --multires_noise_iterations)")
    parser.add_argument("--adaptive_noise_scale", type=float, default=None,
                        help="add `latent mean absolute value * this value` to noise_offset")
    parser.add_argument("--zero_terminal_snr", action="store_true",
                        help="rescale the noise schedule betas to a zero terminal SNR")
    parser.add_argument("--min_timestep", type=int, default=None,
                        help="minimum timestep for U-Net training (0-999, default 0)")
    parser.add_argument("--max_timestep", type=int, default=None,
                        help="maximum timestep for U-Net training (1-1000, default 1000)")
    # accepted so that sd-scripts configs stating the default work; other values are refused
    parser.add_argument("--loss_type", type=str, default="l2", help="loss function; only l2 is supported")
    parser.add_argument("--lowram", action="store_true", help="low RAM optimisation: load models to VRAM")
    parser.add_argument("--highvram", action="store_true",
                        help="disable low VRAM optimisations (accepted; no effect here)")
    parser.add_argument("--sample_every_n_steps", type=int, default=None, help="generate sample images every N steps")
    parser.add_argument("--sample_at_first", action="store_true", help="generate sample images before training")
    parser.add_argument("--sample_every_n_epochs", type=int, default=None,
                        help="generate sample images every N epochs (overrides --sample_every_n_steps)")
    parser.add_argument("--sample_prompts", type=str, default=None, help="file of prompts for sample images")
    parser.add_argument("--sample_sampler", type=str, default="ddim", choices=SAMPLER_CHOICES,
                        help="sampler for sample images")
    parser.add_argument("--config_file", type=str, default=None,
                        help="read the arguments from this .toml file (CLI wins)")
    parser.add_argument("--output_config", action="store_true",
                        help="write the command line arguments to the --config_file .toml")
    if support_dreambooth:
        parser.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")


def add_dataset_arguments(
    parser: argparse.ArgumentParser, support_dreambooth: bool, support_caption: bool, support_caption_dropout: bool
) -> None:
    parser.add_argument("--train_data_dir", type=str, default=None, help="directory of the training images")
    parser.add_argument("--shuffle_caption", action="store_true", help="shuffle comma-separated caption tags")
    parser.add_argument("--caption_extension", type=str, default=".caption", help="extension of caption files")
    parser.add_argument(
        "--caption_extention", type=str, default=None,
        help="extension of caption files (old misspelling kept for compatibility; overrides --caption_extension)",
    )
    parser.add_argument("--keep_tokens", type=int, default=0,
                        help="keep the first N comma-separated tags fixed when shuffling")
    parser.add_argument("--color_aug", action="store_true", help="enable weak color augmentation")
    parser.add_argument("--flip_aug", action="store_true", help="enable horizontal flip augmentation")
    parser.add_argument("--face_crop_aug_range", type=str, default=None,
                        help="enable face-centred crop augmentation with this scale range (e.g. 2.0,4.0)")
    parser.add_argument("--random_crop", action="store_true", help="enable random crop instead of centre crop")
    parser.add_argument("--debug_dataset", action="store_true", help="show dataset samples (no training)")
    parser.add_argument("--resolution", type=str, default=None, help="training resolution ('size' or 'width,height')")
    parser.add_argument("--cache_latents", action="store_true",
                        help="cache latents in memory (augmentations must be off)")
    parser.add_argument("--vae_batch_size", type=int, default=1, help="batch size for caching latents")
    parser.add_argument("--cache_latents_to_disk", action="store_true",
                        help="cache latents to .npz files (augmentations must be off)")
    parser.add_argument("--enable_bucket", action="store_true", help="enable aspect-ratio buckets")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="minimum resolution of buckets")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="maximum resolution of buckets")
    parser.add_argument("--bucket_reso_steps", type=int, default=64,
                        help="resolution step of buckets (divisible by 8 recommended)")
    parser.add_argument("--bucket_no_upscale", action="store_true", help="make buckets per image without upscaling")
    parser.add_argument("--token_warmup_min", type=int, default=1,
                        help="start training with N tags (comma-separated parts)")
    parser.add_argument("--token_warmup_step", type=float, default=0,
                        help="the tag count reaches its maximum at step N (or N*max_train_steps if N<1)")
    if support_caption_dropout:
        parser.add_argument("--caption_dropout_rate", type=float, default=0.0, help="rate of dropping whole captions")
        parser.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                            help="drop all captions every N epochs")
        parser.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                            help="rate of dropping comma-separated tags")
    if support_dreambooth:
        parser.add_argument("--reg_data_dir", type=str, default=None, help="directory of regularization images")
    if support_caption:
        parser.add_argument("--in_json", type=str, default=None, help="metadata json of the dataset")
        parser.add_argument("--dataset_repeats", type=int, default=1,
                            help="repeat the dataset when training with captions")


def add_dataset_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset_config", type=Path, default=None, help="config file for the dataset (.toml/.json)")


def add_sd_saving_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save_model_as", type=str, default=None, choices=SAVE_MODEL_AS_CHOICES,
                        help="format of the saved model (default: same as the input model)")
    parser.add_argument("--use_safetensors", action="store_true",
                        help="save in safetensors format (when --save_model_as is not given)")


def add_custom_train_arguments(parser: argparse.ArgumentParser, support_weighted_captions: bool = True) -> None:
    parser.add_argument("--min_snr_gamma", type=float, default=None,
                        help="gamma of the min-SNR loss weighting strategy (5 is recommended)")
    if support_weighted_captions:
        parser.add_argument("--weighted_captions", action="store_true",
                            help="enable (word:1.2) style weights in captions")


# endregion

# region unsupported flags, --config_file


def _flag_used(name: str, value: Any) -> bool:
    if value is None or value is False:
        return False
    return value not in _UNSUPPORTED_ALLOWED_VALUES.get(name, ())


def _refuse(name: str, source: str) -> None:
    raise UserError(f"--{name}{source} is not supported by this toolkit: {UNSUPPORTED_FLAGS[name]}")


def check_unsupported_flags(
    argv_or_args: Union[Sequence[str], argparse.Namespace, Mapping[str, Any]],
    source: Optional[str] = None,
    known_flags: Optional[Iterable[str]] = None,
) -> None:
    """Refuse flags of newer sd-scripts that are not implemented, with a message naming the flag.

    Accepts a raw command line (before argparse, whose generic error would not say why) or a
    Namespace / mapping of values (e.g. keys read from a TOML config). `known_flags` are the flags
    the script's parser registers: a script that implements one of the listed flags itself wins.
    """
    where = f" (in {source})" if source else ""
    known = set(known_flags or ())

    def unsupported(name: str) -> bool:
        # flags registered only to accept their default value (e.g. --loss_type l2) are still checked
        return name in UNSUPPORTED_FLAGS and (name not in known or name in _UNSUPPORTED_ALLOWED_VALUES)

    if isinstance(argv_or_args, (argparse.Namespace, Mapping)):
        values = vars(argv_or_args) if isinstance(argv_or_args, argparse.Namespace) else argv_or_args
        for name, value in values.items():
            if unsupported(name) and _flag_used(name, value):
                _refuse(name, where)
        return
    tokens = list(argv_or_args)
    for index, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, has_value, inline_value = token[2:].partition("=")
        if not unsupported(name):
            continue
        if has_value:
            value: Any = inline_value
        elif index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
            value = tokens[index + 1]
        else:
            value = True
        allowed = {str(v) for v in _UNSUPPORTED_ALLOWED_VALUES.get(name, ())}
        if str(value) not in allowed:
            _refuse(name, where)


def _flatten_toml(config: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level tables are merged into one flat dict (sd-scripts ignores section names)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _parser_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    return {
        action.dest: action.default
        for action in parser._actions
        if action.dest != argparse.SUPPRESS and action.default is not argparse.SUPPRESS
    }


def _toml_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_toml_value(v) for v in value]
    if isinstance(value, list):
        return [_toml_value(v) for v in value]
    return value


def config_file_path(config_file: Union[str, os.PathLike]) -> Path:
    """`--config_file` path with `.toml` appended if missing."""
    text = str(config_file)
    return Path(text if text.endswith(".toml") else text + ".toml")


def write_output_config(args: argparse.Namespace, parser: argparse.ArgumentParser, config_path: Path) -> None:
    """Write the args that differ from the parser defaults as flat TOML; refuse to overwrite."""
    if config_path.exists():
        raise UserError(f"--output_config: {config_path} already exists; refusing to overwrite it")
    defaults = _parser_defaults(parser)
    values: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in ("config_file", "output_config", "wandb_api_key"):
            continue
        if key in defaults and value == defaults[key]:
            continue
        if value is None:  # TOML has no null; an absent key reads back as the default
            continue
        values[key] = _toml_value(value)
    write_text_atomic(config_path, toml.dumps(values))
    logger.info("saved config file: %s", config_path)


def load_config_toml(config_path: Path) -> dict[str, Any]:
    """Read a `--config_file` TOML and flatten its tables; clear errors for missing / broken files."""
    if not config_path.is_file():
        raise UserError(f"--config_file: {config_path} not found")
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config_file: cannot read {config_path}: {err}") from err
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # the message carries "(at line N, column M)"
        raise UserError(f"--config_file: TOML syntax error in {config_path}: {err}") from err
    return _flatten_toml(config)


def read_config_from_file(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
) -> argparse.Namespace:
    """Apply `--config_file` (SPEC 6.7): CLI > TOML > defaults; TOML values are used as-is.

    `argv` is the command line the script parsed (the library never reads sys.argv itself; None
    lets argparse use sys.argv, as sd-scripts does). With `--output_config` the non-default args are
    written to the TOML and `OutputConfigWritten` is raised: the script must stop, exit status 0.
    """
    if not args.config_file:
        if getattr(args, "output_config", False):
            raise UserError("--output_config needs --config_file (the .toml to write)")
        return args
    config_path = config_file_path(args.config_file)
    if args.output_config:
        write_output_config(args, parser, config_path)
        raise OutputConfigWritten(config_path)

    logger.info("loading settings from %s", config_path)
    flat = load_config_toml(config_path)
    check_unsupported_flags(flat, source=str(config_path), known_flags=iter_flag_names(parser))
    from library.input_checks import check_config_values

    check_config_values(flat, parser, f"--config_file {config_path}", ignore=UNSUPPORTED_FLAGS)
    args = parser.parse_args(argv, namespace=argparse.Namespace(**flat))
    args.config_file = os.path.splitext(str(args.config_file))[0]
    return args


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Script helper: parse `argv` (None: argparse reads the command line), refusing unsupported
    newer sd-scripts flags with a clear message, then apply `--config_file` (may raise
    `OutputConfigWritten`). Other unknown flags get argparse's usual error."""
    known = set(iter_flag_names(parser))
    args, extras = parser.parse_known_args(argv)
    check_unsupported_flags(extras, known_flags=known)
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    check_unsupported_flags(args, known_flags=known)
    return read_config_from_file(args, parser, argv)


# endregion

# region checks


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    # scripts register different flag groups, and TOML may add unknown keys
    return getattr(args, name, default)


def _xformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("xformers") is not None


# backends torch registers that only work with another package installed
_DYNAMO_BACKEND_PACKAGES = {"tvm": "tvm", "onnxrt": "onnxruntime", "openxla": "torch_xla", "ipex": "intel_extension_for_pytorch"}


def _check_dynamo_backend(backend: str) -> None:
    """--dynamo_backend must be one torch registers here (others need packages it does not have)."""
    import torch
    import torch._dynamo  # only with --torch_compile: the import costs ~70 MiB

    available = set(torch._dynamo.list_backends(exclude_tags=()))
    if backend not in available:
        raise UserError(f"--dynamo_backend {backend} is not available here (torch has: {', '.join(sorted(available))})")
    if backend == "cudagraphs" and not torch.cuda.is_available():
        raise UserError("--dynamo_backend cudagraphs needs a CUDA GPU")
    package = _DYNAMO_BACKEND_PACKAGES.get(backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(f"--dynamo_backend {backend} needs the {package} package, which is not installed")


def verify_training_args(args: argparse.Namespace) -> None:
    """sd-scripts consistency checks of the training flags; UserError names the flags involved.

    Adjusts a few values in place as sd-scripts does (cache_latents_to_disk implies cache_latents,
    sample_every_n_* <= 0 disables sampling).
    """
    if _get(args, "v_parameterization") and not _get(args, "v2"):
        logger.warning("--v_parameterization without --v2: v-prediction is meant for SD2 768 models")
    if _get(args, "v2") and _get(args, "clip_skip") is not None:
        logger.warning("--v2 with --clip_skip is unusual: SD2 already uses the penultimate layer")
    if _get(args, "cache_latents_to_disk") and not _get(args, "cache_latents"):
        args.cache_latents = True
        logger.info("--cache_latents_to_disk enables --cache_latents")
    if _get(args, "cache_latents"):
        for aug in ("color_aug", "random_crop"):
            if _get(args, aug):
                raise UserError(f"--cache_latents cannot be used with --{aug} (latents are computed once)")

    if _get(args, "torch_compile"):
        _check_dynamo_backend(_get(args, "dynamo_backend", "inductor") or "inductor")

    mixed_precision = _get(args, "mixed_precision", "no")
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise UserError(f"--mixed_precision must be one of no, fp16, bf16 (got {mixed_precision!r})")
    if _get(args, "full_fp16") and _get(args, "full_bf16"):
        raise UserError("--full_fp16 and --full_bf16 cannot be used together")
    if _get(args, "full_fp16") and mixed_precision != "fp16":
        raise UserError("--full_fp16 requires --mixed_precision fp16")
    if _get(args, "full_bf16") and mixed_precision != "bf16":
        raise UserError("--full_bf16 requires --mixed_precision bf16")
    if _get(args, "save_precision") not in SAVE_PRECISION_CHOICES:
        raise UserError(f"--save_precision must be one of float, fp16, bf16 (got {_get(args, 'save_precision')!r})")
    if _get(args, "max_token_length") not in MAX_TOKEN_LENGTH_CHOICES:
        raise UserError(f"--max_token_length must be 150 or 225, or left out for 75 (got {args.max_token_length!r})")

    if _get(args, "noise_offset") is not None and _get(args, "multires_noise_iterations") is not None:
        raise UserError("--noise_offset and --multires_noise_iterations cannot be used at the same time")
    if _get(args, "adaptive_noise_scale") is not None and _get(args, "noise_offset") is None:
        raise UserError("--adaptive_noise_scale requires --noise_offset")
    if _get(args, "noise_offset_random_strength") and _get(args, "noise_offset") is None:
        logger.warning("--noise_offset_random_strength has no effect without --noise_offset")
    if _get(args, "ip_noise_gamma_random_strength") and _get(args, "ip_noise_gamma") is None:
        logger.warning("--ip_noise_gamma_random_strength has no effect without --ip_noise_gamma")
    if _get(args, "zero_terminal_snr") and not _get(args, "v_parameterization"):
        logger.warning("--zero_terminal_snr without --v_parameterization: training results may be unexpected")
    if _get(args, "loss_type", "l2") != "l2":
        _refuse("loss_type", "")

    min_timestep, max_timestep = _get(args, "min_timestep"), _get(args, "max_timestep")
    if min_timestep is not None and not 0 <= min_timestep <= 999:
        raise UserError(f"--min_timestep must be in 0..999 (got {min_timestep})")
    if max_timestep is not None and not 1 <= max_timestep <= 1000:
        raise UserError(f"--max_timestep must be in 1..1000 (got {max_timestep})")
    if min_timestep is not None and max_timestep is not None and min_timestep >= max_timestep:
        raise UserError(f"--min_timestep ({min_timestep}) must be below --max_timestep ({max_timestep})")

    warmup = _get(args, "lr_warmup_steps", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
        raise UserError(f"--lr_warmup_steps must be a step count or a ratio in [0, 1) (got {warmup!r})")
    if isinstance(warmup, float) and warmup >= 1:
        raise UserError(f"--lr_warmup_steps {warmup}: a float is a ratio of the train steps and must be below 1")

    for name in ("train_batch_size", "gradient_accumulation_steps"):
        value = _get(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")
    if _get(args, "xformers") and not _xformers_available():
        raise UserError("--xformers needs the xformers package, which is not installed; use --sdpa instead")
    for name in ("sample_every_n_epochs", "sample_every_n_steps"):
        value = _get(args, name)
        if value is not None and value <= 0:
            logger.warning("--%s %s is not positive: sampling by it is disabled", name, value)
            setattr(args, name, None)


def _parse_number_list(value: Any, flag: str, kind: type) -> tuple:
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    else:
        parts = [p.strip() for p in str(value).split(",")]
    try:
        return tuple(kind(p) for p in parts)
    except (TypeError, ValueError) as err:
        raise UserError(f"--{flag}: cannot read {value!r} as numbers") from err


def prepare_dataset_args(args: argparse.Namespace, support_metadata: bool) -> None:
    """Normalise the dataset flags in place as sd-scripts does.

    `--caption_extention` (old spelling) overrides `--caption_extension`; `--resolution` becomes a
    (width, height) tuple; `--face_crop_aug_range` a (low, high) tuple.
    """
    if _get(args, "caption_extention") is not None:
        args.caption_extension = args.caption_extention
        args.caption_extention = None

    if _get(args, "resolution") is not None:
        resolution = _parse_number_list(args.resolution, "resolution", int)
        if len(resolution) == 1:
            resolution = (resolution[0], resolution[0])
        if len(resolution) != 2 or min(resolution) <= 0:
            raise UserError(f"--resolution must be 'size' or 'width,height' (got {args.resolution!r})")
        args.resolution = resolution

    if _get(args, "face_crop_aug_range") is not None:
        crop_range = _parse_number_list(args.face_crop_aug_range, "face_crop_aug_range", float)
        if len(crop_range) != 2 or crop_range[0] > crop_range[1]:
            raise UserError(f"--face_crop_aug_range must be 'low,high' with low <= high (got {args.face_crop_aug_range!r})")
        args.face_crop_aug_range = crop_range

    if support_metadata and _get(args, "in_json") is not None and (_get(args, "color_aug") or _get(args, "random_crop")):
        logger.warning("latents in the .npz cache are ignored when --color_aug or --random_crop is given")


# endregion

# region utils

from library.git_revision import get_git_revision_hash  # noqa: E402,F401  (sd-scripts' train_util name)


def resolve_seed(args: argparse.Namespace) -> int:
    """`--seed`, or a fresh random seed stored back into `args.seed` (so metadata and resume see it)."""
    seed = _get(args, "seed")
    if seed is None:
        seed = random.SystemRandom().randint(0, 2**32 - 1)
        args.seed = seed
    return int(seed)


def make_generator(seed: int, *offsets: int, device: Union[str, "torch.device"] = "cpu") -> "torch.Generator":
    """A torch.Generator seeded from `seed` and optional offsets (e.g. step), independent of global RNG."""
    import torch

    mixed = int(seed) & 0xFFFFFFFFFFFF
    for offset in offsets:
        mixed = (mixed * 1_000_003 + int(offset) + 1) & 0x7FFFFFFFFFFFFFFF
    generator = torch.Generator(device=device)
    generator.manual_seed(mixed)
    return generator


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch global RNGs (for code outside our explicit generators)."""
    from accelerate.utils import set_seed as accelerate_set_seed

    accelerate_set_seed(int(seed))


def _dot_ext(ext: str) -> str:
    return ext if not ext or ext.startswith(".") else "." + ext


def get_epoch_ckpt_name(args: argparse.Namespace, ext: str, epoch_no: int) -> str:
    """`{output_name|epoch}-{epoch:06d}{.ext}`; ext "" gives the Diffusers folder name."""
    model_name = default_if_none(_get(args, "output_name"), DEFAULT_EPOCH_NAME)
    return EPOCH_FILE_NAME.format(model_name, epoch_no) + _dot_ext(ext)


def get_step_ckpt_name(args: argparse.Namespace, ext: str, step_no: int) -> str:
    """`{output_name|at}-step{step:08d}{.ext}`."""
    model_name = default_if_none(_get(args, "output_name"), DEFAULT_STEP_NAME)
    return STEP_FILE_NAME.format(model_name, step_no) + _dot_ext(ext)


def get_last_ckpt_name(args: argparse.Namespace, ext: str) -> str:
    """`{output_name|last}{.ext}`."""
    model_name = default_if_none(_get(args, "output_name"), DEFAULT_LAST_OUTPUT_NAME)
    return model_name + _dot_ext(ext)


def get_epoch_state_name(args: argparse.Namespace, epoch_no: int) -> str:
    return EPOCH_STATE_NAME.format(default_if_none(_get(args, "output_name"), DEFAULT_EPOCH_NAME), epoch_no)


def get_step_state_name(args: argparse.Namespace, step_no: int) -> str:
    return STEP_STATE_NAME.format(default_if_none(_get(args, "output_name"), DEFAULT_STEP_NAME), step_no)


def get_last_state_name(args: argparse.Namespace) -> str:
    return LAST_STATE_NAME.format(default_if_none(_get(args, "output_name"), DEFAULT_LAST_OUTPUT_NAME))


def resolve_lr_warmup_steps(lr_warmup_steps: Union[int, float], num_training_steps: int) -> int:
    """`--lr_warmup_steps` as steps: a float (< 1) is a ratio of `num_training_steps`."""
    if isinstance(lr_warmup_steps, float):
        return int(lr_warmup_steps * num_training_steps)
    return int(lr_warmup_steps)


def iter_flag_names(parser: argparse.ArgumentParser) -> Iterable[str]:
    """All long option names of a parser (without the leading dashes)."""
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                yield option[2:]


# endregion


# region names user scripts import from sd-scripts' train_util
# They live in their own modules here; resolved on first use (no import cycles, no start-up cost).
_REEXPORTS: dict[str, str] = {
    **{name: "library.datasets" for name in (
        "BaseDataset", "DreamBoothDataset", "FineTuningDataset", "DatasetGroup", "ImageInfo",
        "BaseSubset", "DreamBoothSubset", "FineTuningSubset", "debug_dataset",
    )},
    "BucketManager": "library.buckets",
    "make_bucket_resolutions": "library.buckets",
    "load_tokenizer": "library.tokenizer_util",
    "load_target_model": "library.model_util",
    "get_optimizer": "library.optimizers",
    "get_scheduler_fix": "library.optimizers",
    "glob_images": "library.image_util",
    "load_image": "library.image_util",
    "IMAGE_EXTENSIONS": "library.image_util",
    "sample_images": "library.sampling",
    "add_config_arguments": "library.config_util",
    "add_metadata_arguments": "library.modelspec",
}


def __getattr__(name: str) -> Any:
    module_name = _REEXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later look-ups skip this function
    return value


# endregion
