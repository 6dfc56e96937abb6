"""Extended Textual Inversion (XTI): one embedding per U-Net cross-attention block.

An XTI embedding gives each cross-attention block of the U-Net its own vectors for the same
token. Two pieces make that work with an unmodified U-Net and with the shared sampling code:

* `XTITextEncoder` wraps the CLIP text encoder. For ids `[N, L]` it encodes the prompt once per
  block, with the token's ids swapped for that block's ids (all blocks in one batched pass),
  and returns the states side by side along the feature axis: `[N, L, num_blocks * D]`,
  block-major (`states[..., b*D:(b+1)*D]` belongs to block b). Anything that treats the text
  encoder as a black box that maps ids to states (`library.text_encoding`,
  `library.lpw_stable_diffusion`, `library.sampling`) therefore works unchanged, including
  `--clip_skip` (the wrapper's `final_layer_norm` normalises each block's slice) and long
  prompts (chunks are glued along the sequence axis, which the folding leaves alone).
* `apply_xti_processors(unet, blocks)` wraps the attention processor of every cross-attention
  (`attn2`) layer in an `XTIAttnProcessor` that hands its inner processor only its block's slice.
  Ordinary `[N, L, D]` states pass through untouched, so the patched U-Net still runs plain
  prompts.

Block names are the LDM block numbers of sd-scripts' XTI files (`IN01` … `MID` … `OUT11` for
SD 1.x / 2.x), derived from the U-Net config (`xti_blocks`), so smaller test U-Nets work too.

Generator use (`--XTI_embeddings`)::

    blocks, _ = embedding_files.read_xti_file(path)
    text_encoder = xti.load_xti_embedding(tokenizer, text_encoder, unet, token, blocks, str(path))
    # ... then encode prompts with `text_encoder` and run `unet` as usual
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from library.errors import UserError

_PROCESSOR_NAME = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.|^mid_block\.attentions\.\d+\.")


def _layers_per_block(config: Any, index: int) -> int:
    layers = config.layers_per_block
    return int(layers[index] if isinstance(layers, (list, tuple)) else layers)


def block_name_of(processor_name: str, config: Any) -> Optional[str]:
    """XTI block name (`IN01`, `MID`, `OUT03`, ...) of an `attn2` processor name, else None.

    LDM numbering: down block i has `layers + 1` input blocks (its resnets/attentions, then a
    downsampler) after `input_blocks.0` (conv_in); up block i has `layers + 1` output blocks.
    """
    if ".attn2." not in processor_name:
        return None
    if processor_name.startswith("mid_block."):
        return "MID"
    match = _PROCESSOR_NAME.match(processor_name)
    if match is None or match.group(1) is None:
        return None
    kind, block, attention = match.group(1), int(match.group(2)), int(match.group(3))
    if kind == "down_blocks":
        offset = sum(_layers_per_block(config, i) + 1 for i in range(block))
        return f"IN{offset + attention + 1:02d}"
    # up blocks hold one more resnet per level than the matching down block
    reversed_layers = [_layers_per_block(config, i) for i in range(len(config.up_block_types))][::-1]
    offset = sum(reversed_layers[i] + 1 for i in range(block))
    return f"OUT{offset + attention:02d}"


def _block_order(name: str) -> tuple[int, int]:
    if name == "MID":
        return (1, 0)
    return (0 if name.startswith("IN") else 2, int(name[-2:]))


def xti_blocks(unet: nn.Module) -> list[str]:
    """The U-Net's cross-attention blocks in forward order (16 for SD 1.x / 2.x: `embedding_files.SD_XTI_BLOCKS`)."""
    names = {block_name_of(name, unet.config) for name in unet.attn_processors}
    names.discard(None)
    return sorted(names, key=_block_order)  # type: ignore[arg-type]


class XTIAttnProcessor:
    """Gives the wrapped processor only this block's slice of block-major XTI states."""

    def __init__(self, inner: Any, block_index: int, num_blocks: int):
        self.inner, self.block_index, self.num_blocks = inner, block_index, num_blocks

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            dim = attn.to_k.in_features
            if encoder_hidden_states.shape[-1] == dim * self.num_blocks:
                start = self.block_index * dim
                encoder_hidden_states = encoder_hidden_states[..., start : start + dim]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def apply_xti_processors(unet: nn.Module, blocks: Sequence[str]) -> None:
    """Wrap every `attn2` processor so it reads its block's slice (idempotent)."""
    remove_xti_processors(unet)
    index = {name: i for i, name in enumerate(blocks)}
    processors = {}
    for name, processor in unet.attn_processors.items():
        block = block_name_of(name, unet.config)
        if block is not None:
            if block not in index:
                raise UserError(f"XTI: the U-Net block {block} has no embedding (file blocks: {', '.join(blocks)})")
            processor = XTIAttnProcessor(processor, index[block], len(blocks))
        processors[name] = processor
    unet.set_attn_processor(processors)


def remove_xti_processors(unet: nn.Module) -> None:
    """Put the original processors back."""
    processors = unet.attn_processors
    if any(isinstance(p, XTIAttnProcessor) for p in processors.values()):
        unet.set_attn_processor({n: p.inner if isinstance(p, XTIAttnProcessor) else p for n, p in processors.items()})


class _FoldedLayerNorm(nn.Module):
    """The text encoder's final LayerNorm applied to each block's slice of folded states."""

    def __init__(self, norm: nn.Module, num_blocks: int):
        super().__init__()
        object.__setattr__(self, "norm", norm)  # owned by the text encoder, not by this view
        self.num_blocks = num_blocks

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        *lead, width = states.shape
        unfolded = states.reshape(*lead, self.num_blocks, width // self.num_blocks)
        return self.norm(unfolded).reshape(*lead, width)


@dataclass
class XTITokens:
    """Token ids of one XTI embedding: the ids prompts use, and each block's ids."""

    base_ids: list[int]  # [n] ids of `T, T1, …` as the tokenizer produces them
    block_ids: list[list[int]]  # [num_blocks][n] embedding rows used by each block


class XTITextEncoder(nn.Module):
    """Text encoder that returns block-major per-block states `[N, L, num_blocks * D]`."""

    def __init__(self, text_encoder: nn.Module, tokens: Sequence[XTITokens], num_blocks: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.tokens, self.num_blocks = list(tokens), num_blocks
        text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests it, 5 does not
        self.final_layer_norm = _FoldedLayerNorm(text_model.final_layer_norm, num_blocks)

    @property
    def config(self):
        return self.text_encoder.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.text_encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def get_input_embeddings(self) -> nn.Module:
        return self.text_encoder.get_input_embeddings()

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        inner = self.text_encoder
        enable = getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
        enable(*args, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def block_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[num_blocks * N, L]`: the ids once per block, XTI tokens swapped for the block's rows."""
        repeated = input_ids.repeat(self.num_blocks, 1).reshape(self.num_blocks, *input_ids.shape)
        swapped = repeated.clone()
        for token in self.tokens:
            block_ids = torch.tensor(token.block_ids, dtype=input_ids.dtype, device=input_ids.device)  # [B, n]
            for i, base in enumerate(token.base_ids):
                mask = repeated == base
                swapped = torch.where(mask, block_ids[:, i].reshape(-1, *([1] * input_ids.dim())), swapped)
        return swapped.reshape(-1, *input_ids.shape[1:])

    def _fold(self, states: torch.Tensor, count: int) -> torch.Tensor:
        per_block = states.reshape(self.num_blocks, count, *states.shape[1:])  # [blocks, N, L, D]
        return per_block.movedim(0, -2).reshape(count, *states.shape[1:-1], -1)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs):
        count = input_ids.shape[0]
        output = self.text_encoder(
            self.block_input_ids(input_ids), output_hidden_states=output_hidden_states, return_dict=True, **kwargs
        )
        hidden = None
        if output.hidden_states is not None:
            hidden = tuple(self._fold(h, count) for h in output.hidden_states)
        # transformers is imported here, not with the module: textual inversion's --help and flag
        # checks do without it (its package import alone takes about a second)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(
            last_hidden_state=self._fold(output.last_hidden_state, count), pooler_output=None, hidden_states=hidden
        )


def xti_token_strings(token_strings: Sequence[str], blocks: Sequence[str]) -> list[list[str]]:
    """sd-scripts' per-block token names: `[[T_IN01, T1_IN01, …], [T_IN02, …], …]`."""
    return [[f"{token}_{block}" for token in token_strings] for block in blocks]


def add_xti_tokens(tokenizer, text_encoder: nn.Module, token_strings: Sequence[str], blocks: Sequence[str], source: str) -> XTITokens:
    """Add `T, T1, …` (used in prompts) and their per-block tokens; rows are not initialised."""
    from library.embedding_files import add_tokens

    per_block = xti_token_strings(token_strings, blocks)
    all_ids = add_tokens(tokenizer, text_encoder, list(token_strings) + [t for row in per_block for t in row], source)
    n = len(token_strings)
    return XTITokens(all_ids[:n], [all_ids[n + b * n : n + (b + 1) * n] for b in range(len(blocks))])


def load_xti_embedding(
    tokenizer, text_encoder: nn.Module, unet: nn.Module, token_string: str,
    blocks: Mapping[str, torch.Tensor], source: str,
) -> XTITextEncoder:
    """Add an XTI embedding (`{block: [n, dim]}`, e.g. from `embedding_files.read_xti_file`) to the
    tokenizer / text encoder, patch the U-Net's processors and return the wrapping text encoder.
    The file's blocks must be exactly the U-Net's (`xti_blocks`)."""
    from library.embedding_files import token_strings as names_for

    unet_blocks = xti_blocks(unet)
    if set(blocks) != set(unet_blocks):
        raise UserError(
            f"{source}: XTI blocks {', '.join(sorted(blocks, key=_block_order))} do not match the U-Net's "
            f"cross-attention blocks {', '.join(unet_blocks)}"
        )
    first = next(iter(blocks.values()))
    dim = text_encoder.get_input_embeddings().embedding_dim
    if first.shape[-1] != dim:
        raise UserError(f"{source}: embedding dimension {first.shape[-1]} does not match the text encoder's {dim}")
    tokens = add_xti_tokens(tokenizer, text_encoder, names_for(token_string, int(first.shape[0])), unet_blocks, source)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for ids, block in zip(tokens.block_ids, unet_blocks):
            weight[ids] = blocks[block].to(device=weight.device, dtype=weight.dtype)
    apply_xti_processors(unet, unet_blocks)
    return XTITextEncoder(text_encoder, [tokens], len(unet_blocks))
