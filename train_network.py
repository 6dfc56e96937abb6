"""Train a LoRA / DyLoRA network for Stable Diffusion 1.x / 2.x (kohya-ss/sd-scripts compatible).

Usage (same flags and TOML keys as sd-scripts' train_network.py):

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir img --resolution 512 --output_dir out --output_name my_lora \\
        --network_module networks.lora --network_dim 8 --network_alpha 8 \\
        --learning_rate 1e-4 --max_train_epochs 10 --save_every_n_epochs 2 --cache_latents

    python train_network.py --config_file settings.toml      # CLI flags override TOML keys

`--network_module` picks the network (`networks.lora`: LoRA-LierLa, or LoRA-C3Lier with
`--network_args conv_dim=4`; `networks.dylora`). The output is a kohya-format LoRA file
(`.safetensors` with ss_* metadata and sshs_* hashes, or `.pt`/`.ckpt`) that A1111, ComfyUI
and diffusers load. `--save_state` writes resumable states; `--resume <state folder>`
continues a run exactly where it stopped. Runs under `accelerate launch` (one or more
processes) and plain `python`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import random
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from library import model_hash, modelspec, train_core, train_metadata, train_util
from library.cli import run_main
from library.errors import UserError

logger = logging.getLogger(__name__)

NETWORK_SAVE_FORMATS = ("safetensors", "ckpt", "pt")


def parse_network_args(values: Optional[Sequence[str]]) -> dict[str, str]:
    """`--network_args key=value ...` as a dict of strings (sd-scripts keeps the strings)."""
    kwargs: dict[str, str] = {}
    for item in values or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserError(f"--network_args: expected key=value, got {item!r}")
        kwargs[key.strip()] = value.strip()
    return kwargs


class NetworkTrainingMethod(train_core.TrainingMethod):
    """LoRA training: the base model is frozen, the network's modules train."""

    tracker_name = "network_train"
    script_name = "train_network.py"
    #: the base model stays frozen: token-embedding rows are only looked up, so the table can be
    #: mapped from a .safetensors file instead of read, and so can the U-Net and text encoder as far
    #: as results stay bit-identical (all of them with --mmap_frozen_weights; train_core /
    #: model_util.load_target_model / weight_mapping)
    maps_token_embedding = True
    #: the LoRA file holds no text-encoder weight: with --network_train_unet_only and every caption's
    #: states cached before the loop (and no sample prompts), the text encoder is freed (train_core)
    releases_cached_text_encoder = True
    #: --network_args that change the network's shape or scale (others, like dropouts and
    #: learning-rate weights, may change when a run is resumed)
    STRUCTURAL_NETWORK_ARGS = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims",
                               "conv_block_alphas", "unit")

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.network: Any = None
        self.network_kwargs = parse_network_args(getattr(args, "network_args", None))
        self.session_id = random.SystemRandom().randint(0, 2**32)
        # a module dropped for a step leaves its parameters without gradients
        self.ddp_find_unused_parameters = bool(self.network_kwargs.get("module_dropout"))
        self._metadata: Optional[dict[str, str]] = None

    # flags -----------------------------------------------------------------------
    def verify_args(self, args: argparse.Namespace) -> None:
        if not getattr(args, "network_module", None):
            raise UserError("--network_module is required (e.g. --network_module networks.lora)")
        if args.network_train_unet_only and args.network_train_text_encoder_only:
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only cannot be used together")
        if args.dim_from_weights and not args.network_weights:
            raise UserError("--dim_from_weights requires --network_weights")
        if args.network_weights and not Path(args.network_weights).is_file():
            raise UserError(f"--network_weights: file not found: {args.network_weights}")
        save_as = args.save_model_as or "safetensors"
        if save_as not in NETWORK_SAVE_FORMATS:
            raise UserError(f"--save_model_as must be one of {', '.join(NETWORK_SAVE_FORMATS)} for networks, got {save_as!r}")

    def state_fingerprint(self, args: argparse.Namespace) -> dict[str, Any]:
        dim, alpha = args.network_dim, args.network_alpha
        if args.network_module in ("networks.lora", "networks.dylora"):
            from networks.lora import parse_network_dim_alpha

            dim, alpha = parse_network_dim_alpha(dim, alpha)  # None means the module's default
        return {
            "network_module": args.network_module,
            # with --dim_from_weights the file decides; tensor shapes are checked when the state loads
            "network_dim": "from weights" if args.dim_from_weights else dim,
            "network_alpha": "from weights" if args.dim_from_weights else alpha,
            "network_args": {k: v for k, v in sorted(self.network_kwargs.items()) if k in self.STRUCTURAL_NETWORK_ARGS},
            "trains": "text encoder" if self.args.network_train_text_encoder_only
            else "U-Net" if self.args.network_train_unet_only else "U-Net and text encoder",
        }

    @property
    def train_unet(self) -> bool:
        return not self.args.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.args.network_train_unet_only

    def model_load_dtype(self, args: argparse.Namespace, weight_dtype: torch.dtype) -> torch.dtype:
        return weight_dtype  # the base model is frozen: no fp32 copy needed

    def fp8_models(self, args: argparse.Namespace) -> tuple[str, ...]:
        if getattr(args, "fp8_base_unet", False):  # sd-scripts: the text encoder stays in fp16 / bf16
            return ("unet",)
        return ("unet", "text_encoder") if getattr(args, "fp8_base", False) else ()

    def prepare_dataset(self, args: argparse.Namespace, dataset_group: Any) -> None:
        # the metadata's ss_new_sd_model_hash reads the whole model file: hash it in the
        # background while the model loads, instead of at the first save (seconds on a 4 GB file)
        from accelerate import PartialState  # set up by the core before this hook runs

        if self._writes_metadata() and PartialState().is_main_process:  # only the main process saves
            for path in (args.pretrained_model_name_or_path, getattr(args, "vae", None)):
                if path:
                    model_hash.prefetch_sha256(path)

    def _writes_metadata(self) -> bool:
        return not self.args.no_metadata and (self.args.save_model_as or "safetensors") == "safetensors"

    # network ---------------------------------------------------------------------
    def _network_module(self):
        name = self.args.network_module
        try:
            return importlib.import_module(name)
        except ImportError as err:
            raise UserError(f"--network_module {name}: cannot import it ({err})") from err

    def setup(self, ctx: train_core.TrainContext) -> None:
        args, models = self.args, ctx.models
        models.unet.requires_grad_(False)
        models.text_encoder.requires_grad_(False)
        module = self._network_module()
        if args.dim_from_weights:
            self.network, _ = module.create_network_from_weights(
                1, args.network_weights, models.vae, models.text_encoder, models.unet,
                neuron_dropout=getattr(args, "network_dropout", None), **self.network_kwargs,
            )
        else:
            self.network = module.create_network(
                1.0, args.network_dim, args.network_alpha, models.vae, models.text_encoder, models.unet,
                neuron_dropout=getattr(args, "network_dropout", None), **self.network_kwargs,
            )
        if self.network is None:
            raise UserError(f"--network_module {args.network_module}: create_network returned no network")
        self.network.apply_to(models.text_encoder, models.unet, self.train_text_encoder, self.train_unet)
        if args.network_weights:
            logger.info("loading network weights: %s", args.network_weights)
            self.network.load_weights(args.network_weights)
        if args.gradient_checkpointing and hasattr(self.network, "enable_gradient_checkpointing"):
            self.network.enable_gradient_checkpointing()
        self.network.prepare_grad_etc(models.text_encoder, models.unet)

    def trainable_modules(self, ctx: train_core.TrainContext) -> dict[str, torch.nn.Module]:
        return {"network": self.network}

    def optimizer_params(self, ctx: train_core.TrainContext) -> list:
        args = self.args
        return self.network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)

    def lr_log_names(self, ctx: train_core.TrainContext, num_groups: int) -> list[str]:
        # sd-scripts' tags: lr/textencoder and lr/unet; per-block groups are lr/group{i}
        names = list(getattr(self.network, "optimizer_group_names", []) or [])
        if len(names) == num_groups and num_groups <= 2:
            return [f"lr/{name}" for name in names]
        tags = [f"lr/group{i}" for i in range(num_groups)]
        if names[:1] == ["textencoder"]:
            tags[0] = "lr/textencoder"
        return tags

    def on_epoch_start(self, ctx: train_core.TrainContext, epoch: int) -> None:
        self.network.on_epoch_start(ctx.models.text_encoder, ctx.models.unet)

    # saving ------------------------------------------------------------------------
    def model_extension(self, args: argparse.Namespace) -> str:
        return "." + (args.save_model_as or "safetensors")

    def _base_metadata(self, ctx: train_core.TrainContext) -> dict[str, str]:
        if self._metadata is None:
            self._metadata = train_metadata.network_training_metadata(
                self.args,
                ctx.dataset_group,
                session_id=self.session_id,
                training_started_at=ctx.training_started_at,
                num_batches_per_epoch=ctx.batches_per_process,
                num_train_epochs=ctx.num_train_epochs,
                num_processes=ctx.accelerator.num_processes,
                optimizer_name=ctx.optimizer_name,
                optimizer_args=ctx.optimizer_args,
                network_args=self.network_kwargs or None,
                hash_models=self._writes_metadata(),
            )
        return self._metadata

    def save(self, ctx: train_core.TrainContext, path: Path, epoch_no: int, global_step: int, final: bool) -> None:
        metadata = train_metadata.metadata_for_save(
            self._base_metadata(ctx), global_step, epoch_no, no_metadata=bool(self.args.no_metadata)
        )
        if not self.args.no_metadata:  # newer sd-scripts: modelspec.* beside the ss_* keys
            metadata.update(modelspec.metadata_from_args(self.args, modelspec.LORA, ctx.training_started_at))
        self.network.save_weights(path, ctx.save_dtype, metadata if path.suffix == ".safetensors" else None)


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no_metadata", action="store_true", help="write only the network keys (ss_network_*) into the file's metadata")
    parser.add_argument(
        "--save_model_as", type=str, default="safetensors", choices=NETWORK_SAVE_FORMATS,
        help="file format of the saved network (safetensors keeps the ss_* metadata)",
    )
    parser.add_argument("--unet_lr", type=float, default=None, help="learning rate of the U-Net modules (default: --learning_rate)")
    parser.add_argument("--text_encoder_lr", type=float, default=None, help="learning rate of the text-encoder modules (default: --learning_rate)")
    parser.add_argument("--network_weights", type=str, default=None, help="start from the weights in this LoRA file")
    parser.add_argument("--network_module", type=str, default=None, help="Python module of the network: networks.lora or networks.dylora")
    parser.add_argument(
        "--network_dim", type=int, default=None, help="rank of the network modules (LoRA default 4)"
    )
    parser.add_argument(
        "--network_alpha", type=float, default=1,
        help="alpha: the network output is scaled by alpha / rank (default 1; set it to the rank for scale 1)",
    )
    parser.add_argument(
        "--network_dropout", type=float, default=None,
        help="dropout probability on the network's hidden activations each step (default: none; must be below 1)",
    )
    parser.add_argument(
        "--network_args", type=str, default=None, nargs="*", help="network options as key=value (conv_dim, conv_alpha, block_dims, down_lr_weight, unit, ...)"
    )
    parser.add_argument("--network_train_unet_only", action="store_true", help="train the U-Net modules only (no lora_te_* keys in the file)")
    parser.add_argument(
        "--network_train_text_encoder_only", action="store_true", help="train the text-encoder modules only (no lora_unet_* keys in the file)"
    )
    parser.add_argument(
        "--training_comment", type=str, default=None, help="free text written to ss_training_comment"
    )
    parser.add_argument(
        "--dim_from_weights", action="store_true",
        help="take each module's rank from the --network_weights file",
    )
    parser.add_argument(
        "--fp8_base", action="store_true",
        help="store the frozen U-Net's and text encoder's Linear / Conv2d weights in fp8 (e4m3): a quarter of "
        "fp32's memory; each layer computes in the mixed-precision dtype (fp32 with --mixed_precision no). "
        "Changes the results; on CPU steps get slower (the weights are cast every step)",
    )
    parser.add_argument(
        "--fp8_base_unet", action="store_true",
        help="as --fp8_base for the U-Net only; the text encoder stays in the mixed-precision dtype",
    )
    parser.add_argument(
        "--mmap_frozen_weights", action="store_true",
        help="map also the U-Net layers that can compute a matrix times a single row (read by default so that "
        "results match reading the whole model; the rest of a .safetensors single file is mapped anyway): "
        "slightly faster loading; changes the low bits of some results",
    )


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_util.add_sd_models_arguments(parser)
    train_util.add_dataset_arguments(parser, True, True, True)
    train_util.add_training_arguments(parser, True)
    train_util.add_optimizer_arguments(parser)
    train_util.add_dataset_config_argument(parser)
    train_util.add_custom_train_arguments(parser)
    add_network_arguments(parser)
    modelspec.add_metadata_arguments(parser)
    return parser


def train(args: argparse.Namespace, hooks: Optional[train_core.TrainHooks] = None) -> train_core.TrainResult:
    """Train a network with parsed `args` (library entry point; tests pass hooks)."""
    return train_core.run_training(args, NetworkTrainingMethod(args), hooks)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = setup_parser()
    args = train_util.parse_args_with_config(parser, argv)
    result = train(args)
    if result.final_model_path is not None:
        logger.info("model saved: %s", result.final_model_path)
    if getattr(args, "sample_prompts", None) and getattr(args, "output_dir", None):
        logger.info("sample images: %s", Path(args.output_dir) / "sample")


if __name__ == "__main__":
    sys.exit(run_main(main))
