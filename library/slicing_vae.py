"""Memory-efficient VAE decode / encode in horizontal slices (`--vae_slices N`).

A plain `AutoencoderKL.decode` keeps several full-resolution activations alive at once
(the GroupNorm output, the activation, the convolution output, the residual). Here every
norm → activation → convolution chain of the full-resolution stages runs on N bands of
rows, writing into one preallocated output, so only one band of temporaries exists at a
time. The result is the plain decode up to float rounding because nothing is approximated:

- 3×3 convolutions read one halo row from each neighbouring band (and the band edge rows,
  computed from the wrong zero padding, are dropped);
- GroupNorm statistics are taken over the whole tensor (two passes over the bands) before
  any band is normalised;
- nearest 2× upsampling and the stride-2 downsampling read exactly the input rows their
  output rows depend on;
- the mid block (with its global attention) runs whole: it works at latent resolution,
  where memory is small.

The diffusers modules and their weights are used as they are; only the order in which
their operations run changes. Layouts other than the SD VAE (`UpDecoderBlock2D` /
`DownEncoderBlock2D` of `ResnetBlock2D`s) are refused with a clear error.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from library.errors import UserError

logger = logging.getLogger(__name__)

Bands = list[tuple[int, int]]


def row_bands(height: int, num_slices: int) -> Bands:
    """`num_slices` (at most `height`) contiguous row ranges [start, end) covering `height` rows."""
    num_slices = max(1, min(int(num_slices), height))
    step = math.ceil(height / num_slices)
    return [(start, min(start + step, height)) for start in range(0, height, step)]


def _unsupported(what: str) -> UserError:
    return UserError(f"--vae_slices: this VAE has {what}, which sliced decoding does not support; run without --vae_slices")


def _group_norm_stats(x: torch.Tensor, norm: nn.GroupNorm, bands: Bands) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and 1/std over the whole tensor, accumulated band by band (float32)."""
    b, c, h, w = x.shape
    groups = norm.num_groups
    count = (c // groups) * h * w
    total = x.new_zeros((b, groups), dtype=torch.float32)
    for start, end in bands:
        total += x[:, :, start:end].float().reshape(b, groups, -1).sum(-1)
    mean = total / count
    # second pass around the mean: sum-of-squares minus squared mean loses digits on large images
    squares = torch.zeros_like(total)
    for start, end in bands:
        centred = x[:, :, start:end].float().reshape(b, groups, -1) - mean[:, :, None]
        squares += centred.square().sum(-1)
    return mean, torch.rsqrt(squares / count + norm.eps)


def _normalise(
    piece: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    b, c, h, w = piece.shape
    groups = norm.num_groups
    grouped = (piece.float().reshape(b, groups, -1) - mean[:, :, None]) * rstd[:, :, None]
    out = grouped.reshape(b, c, h, w)
    if norm.affine:
        out = out * norm.weight.float()[None, :, None, None] + norm.bias.float()[None, :, None, None]
    return out.to(piece.dtype)


def _check_same_conv(conv: nn.Conv2d) -> int:
    """Halo (rows needed on each side) of a stride-1 'same' convolution."""
    kh, kw = conv.kernel_size
    if conv.stride != (1, 1) or kh % 2 == 0 or conv.padding != (kh // 2, kw // 2) or conv.dilation != (1, 1):
        raise _unsupported(f"a convolution {conv}")
    return kh // 2


def _sliced_conv(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bands: Bands,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    add: Callable[[int, int], torch.Tensor] | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """conv(prepare(x)) (+ add(start, end)) band by band; `prepare` must be row-local (norm with
    global stats, activation).

    `in_place` writes the result over `x` (same channel count): each band is stored one band
    late, once the next band, the last reader of its rows as a halo, has been computed. The
    caller must own `x`.
    """
    halo = _check_same_conv(conv)
    height = x.shape[2]
    in_place = in_place and conv.out_channels == x.shape[1] and min(e - s for s, e in bands) >= halo
    out = x if in_place else None
    pending: tuple[int, int, torch.Tensor] | None = None
    for start, end in bands:
        lo, hi = max(0, start - halo), min(height, end + halo)
        piece = x[:, :, lo:hi]
        if prepare is not None:
            piece = prepare(piece)
        result = conv(piece)[:, :, start - lo : start - lo + (end - start)]
        if add is not None:
            result = result + add(start, end)
        if out is None:
            out = result.new_empty((x.shape[0], result.shape[1], height, result.shape[3]))
        if in_place:
            if pending is not None:
                out[:, :, pending[0] : pending[1]] = pending[2]
            pending = (start, end, result)
        else:
            out[:, :, start:end] = result
        del piece, result
    if pending is not None:
        out[:, :, pending[0] : pending[1]] = pending[2]
    return out


def _norm_act(norm: nn.GroupNorm, act: nn.Module, mean: torch.Tensor, rstd: torch.Tensor):
    return lambda piece: act(_normalise(piece, norm, mean, rstd))


def _sliced_norm_act_conv(
    x: torch.Tensor,
    norm: nn.Module,
    act: nn.Module,
    conv: nn.Conv2d,
    num_slices: int,
    add: Callable[[int, int], torch.Tensor] | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    if not isinstance(norm, nn.GroupNorm):
        raise _unsupported(f"a {type(norm).__name__} normalisation")
    bands = row_bands(x.shape[2], num_slices)
    mean, rstd = _group_norm_stats(x, norm, bands)
    return _sliced_conv(x, conv, bands, _norm_act(norm, act, mean, rstd), add, in_place)


def _sliced_resnet(block: nn.Module, x: torch.Tensor, num_slices: int) -> torch.Tensor:
    """A ResnetBlock2D holding two full-size tensors at a time (its input and one activation)."""
    if (
        not isinstance(block, ResnetBlock2D)
        or block.upsample is not None
        or block.downsample is not None
        or block.time_emb_proj is not None
    ):
        raise _unsupported(f"a {type(block).__name__} block")
    if block.training and block.dropout.p > 0:
        raise _unsupported("dropout in training mode")
    h = _sliced_norm_act_conv(x, block.norm1, block.nonlinearity, block.conv1, num_slices)

    def shortcut(start: int, end: int) -> torch.Tensor:
        rows = x[:, :, start:end]
        return block.conv_shortcut(rows) if block.conv_shortcut is not None else rows

    # h is ours: the second convolution (plus the shortcut) overwrites it band by band
    h = _sliced_norm_act_conv(h, block.norm2, block.nonlinearity, block.conv2, num_slices, shortcut, in_place=True)
    if block.output_scale_factor != 1.0:
        h /= block.output_scale_factor
    return h


def _sliced_upsample(up: nn.Module, x: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Nearest 2× upsampling then a 'same' conv; each output band reads its input rows plus one halo row."""
    if not isinstance(up, Upsample2D) or up.use_conv_transpose or not up.interpolate or up.norm is not None or not up.use_conv:
        raise _unsupported(f"an upsampler {type(up).__name__}")
    conv = up.conv if up.name == "conv" else up.Conv2d_0
    halo = _check_same_conv(conv)
    in_halo = math.ceil(halo / 2)
    height = x.shape[2]
    out = None
    for start, end in row_bands(height, num_slices):
        lo, hi = max(0, start - in_halo), min(height, end + in_halo)
        upsampled = F.interpolate(x[:, :, lo:hi], scale_factor=2.0, mode="nearest")
        offset = 2 * (start - lo)
        result = conv(upsampled)[:, :, offset : offset + 2 * (end - start)]
        if out is None:
            out = result.new_empty((x.shape[0], result.shape[1], 2 * height, result.shape[3]))
        out[:, :, 2 * start : 2 * end] = result
        del upsampled, result
    return out


def _sliced_downsample(down: nn.Module, x: torch.Tensor, num_slices: int) -> torch.Tensor:
    """The SD VAE downsampler: pad one zero row/column at the bottom/right, 3×3 conv, stride 2."""
    conv = getattr(down, "conv", None)
    if (
        not isinstance(down, Downsample2D)
        or not down.use_conv
        or down.padding != 0
        or down.norm is not None
        or not isinstance(conv, nn.Conv2d)
        or conv.kernel_size != (3, 3)
        or conv.stride != (2, 2)
        or conv.padding != (0, 0)
    ):
        raise _unsupported(f"a downsampler {type(down).__name__}")
    height = x.shape[2]
    out_height = height // 2  # padded height h+1, kernel 3, stride 2
    out = None
    for start, end in row_bands(out_height, num_slices):
        hi = 2 * end + 1  # output row j reads input rows 2j .. 2j+2
        piece = x[:, :, 2 * start : min(hi, height)]
        piece = F.pad(piece, (0, 1, 0, 1 if hi > height else 0))
        result = conv(piece)
        if out is None:
            out = result.new_empty((x.shape[0], result.shape[1], out_height, result.shape[3]))
        out[:, :, start:end] = result
        del piece, result
    return out


def _sliced_level(block: nn.Module, resamplers, resample, sample: torch.Tensor, num_slices: int) -> torch.Tensor:
    """One encoder / decoder level: its resnets, then its down- or upsampler."""
    if getattr(block, "attentions", None):
        raise _unsupported(f"attention in the {type(block).__name__} block")
    for resnet in block.resnets:
        sample = _sliced_resnet(resnet, sample, num_slices)
    for resampler in resamplers or []:
        sample = resample(resampler, sample, num_slices)
    return sample


@torch.no_grad()
def decode_sliced(vae: AutoencoderKL, latents: torch.Tensor, num_slices: int) -> torch.Tensor:
    """`vae.decode(latents).sample`, computed in `num_slices` bands of rows (less peak memory)."""
    decoder = vae.decoder
    z = vae.post_quant_conv(latents) if vae.post_quant_conv is not None else latents
    sample = decoder.conv_in(z)
    sample = decoder.mid_block(sample, None)
    sample = sample.to(next(iter(decoder.up_blocks.parameters())).dtype)
    for block in decoder.up_blocks:
        sample = _sliced_level(block, block.upsamplers, _sliced_upsample, sample, num_slices)
    return _sliced_norm_act_conv(sample, decoder.conv_norm_out, decoder.conv_act, decoder.conv_out, num_slices)


@torch.no_grad()
def encode_sliced(vae: AutoencoderKL, images: torch.Tensor, num_slices: int) -> DiagonalGaussianDistribution:
    """`vae.encode(images).latent_dist`, computed in `num_slices` bands of rows."""
    encoder = vae.encoder
    sample = _sliced_conv(images, encoder.conv_in, row_bands(images.shape[2], num_slices))
    for block in encoder.down_blocks:
        sample = _sliced_level(block, block.downsamplers, _sliced_downsample, sample, num_slices)
    sample = encoder.mid_block(sample)
    sample = _sliced_norm_act_conv(sample, encoder.conv_norm_out, encoder.conv_act, encoder.conv_out, num_slices)
    if vae.quant_conv is not None:
        sample = vae.quant_conv(sample)
    return DiagonalGaussianDistribution(sample)


def set_vae_slices(vae: AutoencoderKL, num_slices: int | None) -> AutoencoderKL:
    """Make `vae.decode` / `vae.encode` slice (`num_slices` > 1) or behave as stock (None, 0, 1).

    Only this instance changes: its `_decode` / `_encode` steps are replaced, so every caller
    of `vae.decode(...).sample` / `vae.encode(...).latent_dist` (pipelines, the latent cache)
    gets the sliced computation unchanged. diffusers' own tiling is bypassed while slicing.
    Returns the VAE.
    """
    for name in ("_decode", "_encode"):
        vae.__dict__.pop(name, None)
    if num_slices is None or int(num_slices) <= 1:
        return vae
    num_slices = int(num_slices)

    def _decode(z: torch.Tensor, return_dict: bool = True):
        sample = decode_sliced(vae, z, num_slices)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def _encode(x: torch.Tensor) -> torch.Tensor:
        return encode_sliced(vae, x, num_slices).parameters

    vae._decode = _decode
    vae._encode = _encode
    logger.info("VAE decodes and encodes in %d slices", num_slices)
    return vae
