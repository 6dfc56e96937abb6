"""Textual inversion and XTI as `TrainingMethod`s (`train_textual_inversion.py`, `..._XTI.py`).

Only the new token rows of the text encoder's embedding matrix train. The whole matrix is the
optimizer's parameter (so gradients flow through the frozen encoder as in sd-scripts), and
after every optimizer step the rows of all other tokens are copied back from a saved copy:
every other text-encoder weight and the whole U-Net stay bit-identical.

Captions: `T` in a caption becomes `T T1 … T{n-1}` for n vectors; `--use_object_template` /
`--use_style_template` replace every caption by a random template naming the tokens. Both are
registered in `prepare_dataset`, so `--debug_dataset` shows the captions as trained.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from library import embedding_files, train_core, xti
from library.errors import UserError

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("safetensors", "pt", "ckpt")

# caption templates of the original textual-inversion paper (27 object, 19 style), as sd-scripts uses them
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
]


def add_textual_inversion_arguments(parser: argparse.ArgumentParser, xti_files: bool = False) -> None:
    """sd-scripts' textual-inversion flags (both trainers; XTI files are safetensors only)."""
    if xti_files:
        parser.add_argument("--save_model_as", type=str, default="safetensors", choices=("safetensors",),
                            help="format of the saved XTI embedding (safetensors only)")
    else:
        parser.add_argument(
            "--save_model_as", type=str, default="pt", choices=SAVE_FORMATS,
            help="format of the saved embedding: pt / ckpt (AUTOMATIC1111 layout) or safetensors (emb_params)",
        )
    parser.add_argument("--weights", type=str, default=None, help="start from the vectors of this embedding file")
    parser.add_argument("--num_vectors_per_token", type=int, default=1, help="number of vectors of the embedding (tokens T, T1, ...)")
    parser.add_argument("--token_string", type=str, default=None, help="the new token to train; captions must contain it (unless a template is used)")
    parser.add_argument("--init_word", type=str, default=None, help="initialise the vectors from this word's token embeddings")
    parser.add_argument("--use_object_template", action="store_true", help="ignore captions; use 'a photo of a {}'-style object templates")
    parser.add_argument("--use_style_template", action="store_true", help="ignore captions; use 'a painting in the style of {}'-style templates")
    from library import modelspec

    modelspec.add_metadata_arguments(parser)  # --metadata_title, --metadata_author, ... (modelspec.* keys)


class TextualInversionMethod(train_core.TrainingMethod):
    """Trains the embedding rows of `--token_string` (n vectors); everything else is frozen."""

    tracker_name = "textual_inversion"
    script_name = "train_textual_inversion.py"
    support_dropout = False  # sd-scripts' TI dataset config has no caption dropout keys
    #: file formats `--save_model_as` accepts
    save_formats: tuple[str, ...] = SAVE_FORMATS

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.token_ids: list[int] = []  # rows that train
        self._frozen_index: Optional[torch.Tensor] = None
        self._frozen_rows: Optional[torch.Tensor] = None

    # flags ----------------------------------------------------------------------------------
    @property
    def token_strings(self) -> list[str]:
        return embedding_files.token_strings(self.args.token_string, self.args.num_vectors_per_token)

    def new_token_strings(self) -> list[str]:
        """Every token this method adds to the tokenizer."""
        return self.token_strings

    def verify_args(self, args: argparse.Namespace) -> None:
        from library.tokenizer_util import load_tokenizer

        if not args.token_string:
            raise UserError("--token_string is required (the new token to train, e.g. --token_string mychar)")
        if args.num_vectors_per_token < 1:
            raise UserError(f"--num_vectors_per_token must be at least 1, got {args.num_vectors_per_token}")
        if args.use_object_template and args.use_style_template:
            raise UserError("--use_object_template and --use_style_template cannot be used together")
        save_as = args.save_model_as or "pt"
        if save_as not in self.save_formats:
            raise UserError(f"--save_model_as must be one of {', '.join(self.save_formats)} here, got {save_as!r}")
        if args.weights and not Path(args.weights).is_file():
            raise UserError(f"--weights: file not found: {args.weights}")
        # the tokenizer ships with the package: check tokens before the slow dataset / model work
        tokenizer = load_tokenizer(bool(getattr(args, "v2", False)), getattr(args, "tokenizer_cache_dir", None))
        embedding_files.check_new_tokens(tokenizer, self.new_token_strings(), "--token_string")
        if args.init_word is not None:
            init_ids = tokenizer(args.init_word, add_special_tokens=False).input_ids
            if not init_ids:
                raise UserError(f"--init_word {args.init_word!r} has no tokens")
            if len(init_ids) > args.num_vectors_per_token:
                raise UserError(
                    f"--init_word {args.init_word!r} has {len(init_ids)} tokens, more than "
                    f"--num_vectors_per_token {args.num_vectors_per_token}"
                )

    def state_fingerprint(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"token_string": args.token_string, "num_vectors_per_token": args.num_vectors_per_token}

    # captions -------------------------------------------------------------------------------
    def prepare_dataset(self, args: argparse.Namespace, dataset_group: Any) -> None:
        tokens = " ".join(self.token_strings)
        if args.use_object_template or args.use_style_template:
            templates = OBJECT_TEMPLATES if args.use_object_template else STYLE_TEMPLATES
            logger.info("captions: %s templates naming %r", "object" if args.use_object_template else "style", tokens)
            dataset_group.add_replacement("", [template.format(tokens) for template in templates])
        elif len(self.token_strings) > 1:
            dataset_group.add_replacement(args.token_string, tokens)

    def prompt_replacement(self, ctx: train_core.TrainContext) -> Optional[tuple[str, str]]:
        if len(self.token_strings) > 1:
            return self.args.token_string, " ".join(self.token_strings)
        return None

    # set-up ---------------------------------------------------------------------------------
    @property
    def train_unet(self) -> bool:
        return False

    @property
    def train_text_encoder(self) -> bool:
        return True  # gradients reach the embedding through the (frozen) encoder

    def model_load_dtype(self, args: argparse.Namespace, weight_dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # the text encoder holds the trained rows: fp32 master weights

    def _initial_vectors(self, text_encoder: nn.Module, tokenizer, count: int) -> Optional[torch.Tensor]:
        """`[count, dim]` start vectors from --weights or --init_word (None keeps the resize init)."""
        args = self.args
        weight = text_encoder.get_input_embeddings().weight
        if args.weights:
            vectors = embedding_files.load_embedding_vectors(args.weights)
            self._check_weights(vectors, weight.shape[1], args.weights)
            return vectors
        if args.init_word is not None:
            init_ids = tokenizer(args.init_word, add_special_tokens=False).input_ids
            return torch.stack([weight[init_ids[i % len(init_ids)]].detach() for i in range(count)])
        return None

    def _check_weights(self, vectors: torch.Tensor, dim: int, source: str) -> None:
        if vectors.shape[1] != dim:
            raise UserError(
                f"--weights {source}: embedding dimension {vectors.shape[1]} does not match the text encoder's {dim} "
                "(an embedding for another model version, SD1 vs SD2?)"
            )
        if vectors.shape[0] != self.args.num_vectors_per_token:
            raise UserError(
                f"--weights {source}: the file has {vectors.shape[0]} vectors but --num_vectors_per_token is "
                f"{self.args.num_vectors_per_token}"
            )

    def _add_tokens(self, ctx: train_core.TrainContext) -> list[int]:
        models = ctx.models
        ids = embedding_files.add_tokens(models.tokenizer, models.text_encoder, self.token_strings, "--token_string")
        vectors = self._initial_vectors(models.text_encoder, models.tokenizer, len(ids))
        if vectors is not None:
            weight = models.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = vectors.to(weight.dtype)
        return ids

    def setup(self, ctx: train_core.TrainContext) -> None:
        models = ctx.models
        models.unet.requires_grad_(False)
        models.text_encoder.requires_grad_(False)
        self.token_ids = self._add_tokens(ctx)
        embedding = models.text_encoder.get_input_embeddings()
        embedding.requires_grad_(True)
        logger.info("training tokens %s (ids %s)", models.tokenizer.convert_ids_to_tokens(self.token_ids), self.token_ids)
        frozen = torch.ones(embedding.num_embeddings, dtype=torch.bool)
        frozen[self.token_ids] = False
        self._frozen_index = frozen.nonzero().squeeze(1).to(embedding.weight.device)
        self._frozen_rows = embedding.weight.detach()[self._frozen_index].clone()

    def trainable_modules(self, ctx: train_core.TrainContext) -> dict[str, nn.Module]:
        return {"token_embedding": ctx.models.text_encoder.get_input_embeddings()}

    def on_step_end(self, ctx: train_core.TrainContext) -> None:
        # the optimizer updated the whole matrix (weight decay, momentum): put the other rows back
        weight = ctx.models.text_encoder.get_input_embeddings().weight
        if self._frozen_rows.device != weight.device or self._frozen_rows.dtype != weight.dtype:
            # setup ran before the model moved to the accelerator (and before --full_fp16 casts): follow it once
            self._frozen_index = self._frozen_index.to(weight.device)
            self._frozen_rows = self._frozen_rows.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            weight.index_copy_(0, self._frozen_index, self._frozen_rows)

    # saving ---------------------------------------------------------------------------------
    def model_extension(self, args: argparse.Namespace) -> str:
        return "." + (args.save_model_as or "pt")

    def trained_vectors(self, ctx: train_core.TrainContext) -> torch.Tensor:
        """The `[n, dim]` trained vectors (a CPU copy)."""
        weight = ctx.models.text_encoder.get_input_embeddings().weight
        return weight.detach()[self.token_ids].float().cpu().clone()

    def save(self, ctx: train_core.TrainContext, path: Path, epoch_no: int, global_step: int, final: bool) -> None:
        embedding_files.save_embedding(
            path, self.trained_vectors(ctx), name=self.args.token_string, step=global_step,
            dtype=ctx.save_dtype, metadata=self.metadata(ctx, global_step, epoch_no),
        )

    def metadata(self, ctx: train_core.TrainContext, global_step: int, epoch_no: int) -> dict[str, str]:
        """safetensors metadata of a saved embedding: `modelspec.*` (as newer sd-scripts) and a few `ss_*` keys."""
        from library import modelspec, train_metadata

        args = self.args
        spec = modelspec.metadata_from_args(args, modelspec.TEXTUAL_INVERSION, ctx.training_started_at)
        return {
            **spec,
            "ss_token_string": args.token_string,
            "ss_num_vectors_per_token": str(args.num_vectors_per_token),
            "ss_base_model_version": train_metadata.base_model_version(bool(args.v2), bool(args.v_parameterization)),
            "ss_steps": str(global_step),
            "ss_epoch": str(epoch_no),
        }


class XTIMethod(TextualInversionMethod):
    """Extended textual inversion: n vectors per U-Net cross-attention block."""

    tracker_name = "textual_inversion_xti"
    script_name = "train_textual_inversion_XTI.py"
    save_formats = ("safetensors",)

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.blocks: list[str] = []
        self.tokens: Optional[xti.XTITokens] = None
        self.text_encoder: Optional[nn.Module] = None  # the wrapped encoder

    def new_token_strings(self) -> list[str]:
        from library.embedding_files import SD_XTI_BLOCKS

        # the U-Net is not loaded yet when flags are checked: check the SD block names
        return self.token_strings + [t for row in xti.xti_token_strings(self.token_strings, SD_XTI_BLOCKS) for t in row]

    def verify_args(self, args: argparse.Namespace) -> None:
        args.save_model_as = args.save_model_as or "safetensors"
        super().verify_args(args)

    def _initial_blocks(self, ctx: train_core.TrainContext) -> Optional[dict[str, torch.Tensor]]:
        args = self.args
        if not args.weights:
            return None
        from library.embedding_files import read_xti_file

        blocks, _ = read_xti_file(args.weights)
        if set(blocks) != set(self.blocks):
            raise UserError(
                f"--weights {args.weights}: XTI blocks {', '.join(sorted(blocks))} do not match the U-Net's {', '.join(self.blocks)}"
            )
        dim = ctx.models.text_encoder.get_input_embeddings().embedding_dim
        for vectors in blocks.values():
            self._check_weights(vectors, dim, args.weights)
        return blocks

    def _add_tokens(self, ctx: train_core.TrainContext) -> list[int]:
        models = ctx.models
        self.blocks = xti.xti_blocks(models.unet)
        if not self.blocks:
            raise UserError(f"{self.args.pretrained_model_name_or_path}: the U-Net has no cross-attention blocks")
        self.tokens = xti.add_xti_tokens(models.tokenizer, models.text_encoder, self.token_strings, self.blocks, "--token_string")
        weight = models.text_encoder.get_input_embeddings().weight
        blocks = self._initial_blocks(ctx)
        with torch.no_grad():
            if blocks is not None:
                for ids, block in zip(self.tokens.block_ids, self.blocks):
                    weight[ids] = blocks[block].to(weight.dtype)
            else:
                # without --init_word every block starts from the same (resize-initialised) vectors
                start = self._initial_vectors(models.text_encoder, models.tokenizer, len(self.token_strings))
                start = weight[self.tokens.base_ids].clone() if start is None else start.to(weight.dtype)
                for ids in self.tokens.block_ids:
                    weight[ids] = start
        return [i for ids in self.tokens.block_ids for i in ids]

    def setup(self, ctx: train_core.TrainContext) -> None:
        super().setup(ctx)
        models = ctx.models
        xti.apply_xti_processors(models.unet, self.blocks)
        # the core encodes captions (and samples) with models.text_encoder: give it the per-block encoder
        self.text_encoder = xti.XTITextEncoder(models.text_encoder, [self.tokens], len(self.blocks))
        models.text_encoder = self.text_encoder

    def _base_text_encoder(self, ctx: train_core.TrainContext) -> nn.Module:
        te = ctx.models.text_encoder
        return te.text_encoder if isinstance(te, xti.XTITextEncoder) else te

    def trained_blocks(self, ctx: train_core.TrainContext) -> dict[str, torch.Tensor]:
        weight = self._base_text_encoder(ctx).get_input_embeddings().weight.detach()
        return {block: weight[ids].float().cpu().clone() for block, ids in zip(self.blocks, self.tokens.block_ids)}

    def trained_vectors(self, ctx: train_core.TrainContext) -> torch.Tensor:
        return torch.cat(list(self.trained_blocks(ctx).values()))

    def save(self, ctx: train_core.TrainContext, path: Path, epoch_no: int, global_step: int, final: bool) -> None:
        embedding_files.save_xti_file(
            path, self.trained_blocks(ctx), dtype=ctx.save_dtype, metadata=self.metadata(ctx, global_step, epoch_no)
        )
