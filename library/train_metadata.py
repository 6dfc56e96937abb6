"""`ss_*` metadata of LoRA files, as sd-scripts' train_network.py writes it (SPEC 2.5).

`network_training_metadata` builds the values known when training starts;
`metadata_for_save` adds what changes per save (finish time, steps, epoch) and applies
`--no_metadata`. All values are strings (`str(value)`), as in sd-scripts: `"True"`, `"None"`.
The `sshs_*` hashes are added by the network's `save_weights`.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from library import model_hash, train_util

logger = logging.getLogger(__name__)

#: what `--no_metadata` keeps
MINIMUM_METADATA_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def base_model_version(v2: bool, v_parameterization: bool) -> str:
    """ss_base_model_version of newer sd-scripts: sd_v1, sd_v2 or sd_v2_v."""
    if not v2:
        return "sd_v1"
    return "sd_v2_v" if v_parameterization else "sd_v2"


def model_name_and_hashes(path: Optional[str], prefix: str, with_hashes: bool = True) -> dict[str, Any]:
    """`ss_{prefix}_name` (basename of a local path, else as given) and, for local files, the
    legacy A1111 hash and the full SHA-256 (`ss_{prefix}_hash`, `ss_new_{prefix}_hash`)."""
    if path is None:
        return {}
    entries: dict[str, Any] = {}
    name = str(path)
    local = Path(path)
    if local.exists():
        if local.is_file() and with_hashes:
            entries[f"ss_{prefix}_hash"] = model_hash.model_hash(local)
            entries[f"ss_new_{prefix}_hash"] = model_hash.calculate_sha256(local)
        name = local.name
    entries[f"ss_{prefix}_name"] = name
    return entries


def network_training_metadata(
    args: argparse.Namespace,
    dataset_group: Any,
    *,
    session_id: Optional[int] = None,
    training_started_at: Optional[float] = None,
    num_batches_per_epoch: int,
    num_train_epochs: int,
    num_processes: int,
    optimizer_name: str,
    optimizer_args: str,
    network_args: Optional[Mapping[str, str]] = None,
    hash_models: bool = True,
) -> dict[str, str]:
    """All `ss_*` entries known at the start of a LoRA run, as strings. `hash_models=False` leaves
    out the model file hashes (whole-file reads) when the metadata is not written anyway."""
    if session_id is None:
        session_id = random.randint(0, 2**32)
    if training_started_at is None:
        training_started_at = time.time()
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - scripts register different flags
    optimizer = optimizer_name + (f"({optimizer_args})" if optimizer_args else "")
    metadata: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": get("output_name"),
        "ss_learning_rate": get("learning_rate"),
        "ss_text_encoder_lr": get("text_encoder_lr"),
        "ss_unet_lr": get("unet_lr"),
        "ss_num_train_images": dataset_group.num_train_images,
        "ss_num_reg_images": dataset_group.num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_train_epochs,
        "ss_gradient_checkpointing": bool(get("gradient_checkpointing", False)),
        "ss_gradient_accumulation_steps": get("gradient_accumulation_steps", 1),
        "ss_max_train_steps": get("max_train_steps"),
        "ss_lr_warmup_steps": get("lr_warmup_steps", 0),
        "ss_lr_scheduler": get("lr_scheduler"),
        "ss_network_module": get("network_module"),
        "ss_network_dim": get("network_dim"),
        "ss_network_alpha": get("network_alpha"),
        "ss_network_dropout": get("network_dropout"),
        "ss_mixed_precision": get("mixed_precision", "no"),
        "ss_full_fp16": bool(get("full_fp16", False)),
        "ss_fp8_base": bool(get("fp8_base", False)),
        "ss_fp8_base_unet": bool(get("fp8_base_unet", False)),
        "ss_v2": bool(get("v2", False)),
        "ss_base_model_version": base_model_version(bool(get("v2", False)), bool(get("v_parameterization", False))),
        "ss_clip_skip": get("clip_skip"),
        "ss_max_token_length": get("max_token_length"),
        "ss_cache_latents": bool(get("cache_latents", False)),
        "ss_seed": get("seed"),
        "ss_lowram": bool(get("lowram", False)),
        "ss_noise_offset": get("noise_offset"),
        "ss_multires_noise_iterations": get("multires_noise_iterations"),
        "ss_multires_noise_discount": get("multires_noise_discount"),
        "ss_adaptive_noise_scale": get("adaptive_noise_scale"),
        "ss_training_comment": get("training_comment"),
        "ss_sd_scripts_commit_hash": train_util.get_git_revision_hash(),
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": get("max_grad_norm"),
        "ss_caption_dropout_rate": get("caption_dropout_rate", 0.0),
        "ss_caption_dropout_every_n_epochs": get("caption_dropout_every_n_epochs", 0),
        "ss_caption_tag_dropout_rate": get("caption_tag_dropout_rate", 0.0),
        "ss_face_crop_aug_range": get("face_crop_aug_range"),
        "ss_prior_loss_weight": get("prior_loss_weight", 1.0),
        "ss_min_snr_gamma": get("min_snr_gamma"),
    }
    uses_dataset_config = get("dataset_config") is not None
    total_batch_size = (get("train_batch_size", 1) or 1) * num_processes * (get("gradient_accumulation_steps", 1) or 1)
    metadata.update(dataset_group.metadata_for_training(uses_dataset_config, total_batch_size))
    if network_args:
        metadata["ss_network_args"] = json.dumps(dict(network_args))
    metadata.update(model_name_and_hashes(get("pretrained_model_name_or_path"), "sd_model", hash_models))
    metadata.update(model_name_and_hashes(get("vae"), "vae", hash_models))
    return {key: str(value) for key, value in metadata.items()}


def metadata_for_save(
    metadata: Mapping[str, str], global_step: int, epoch: int, no_metadata: bool = False
) -> dict[str, str]:
    """The metadata of one save: finish time, ss_steps, ss_epoch; `--no_metadata` keeps only
    the network description keys."""
    current = dict(metadata)
    current["ss_training_finished_at"] = str(time.time())
    current["ss_steps"] = str(global_step)
    current["ss_epoch"] = str(epoch)
    if no_metadata:
        return {key: current[key] for key in MINIMUM_METADATA_KEYS if key in current}
    return current
