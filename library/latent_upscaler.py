"""The small latent upscaler of sd-scripts' highres fix: architecture and weights loading.

The network refines the latents of a Lanczos-upscaled image: conv(4→C) + BN + ReLU, N residual
blocks (conv-BN-ReLU-conv-BN + skip, ReLU) with an extra skip around every group of four,
conv(C→M)+BN+ReLU, conv(M→M)+BN, a 1x1 conv(M→4) that starts at zero, and the input added
back, so it predicts a correction. sd-scripts' weights have C=128, M=64, N=20; the key names
(`conv1`, `bn1`, `resblock1.conv1`, ..., `conv_final`) are theirs, and the sizes are read from
the weights file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from library.errors import UserError
from library.safe_unpickle import load_pickle_checkpoint

logger = logging.getLogger(__name__)

GROUP = 4  # residual blocks between the long skips


def _conv_bn(in_channels: int, out_channels: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(channels, channels)
        self.conv2, self.bn2 = _conv_bn(channels, channels)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class Upscaler(nn.Module):
    def __init__(self, channels: int = 128, mid_channels: int = 64, num_blocks: int = 20, latent_channels: int = 4):
        super().__init__()
        if num_blocks % GROUP:
            raise UserError(f"latent upscaler: {num_blocks} residual blocks is not a multiple of {GROUP}")
        self.num_blocks = num_blocks
        self.conv1 = nn.Conv2d(latent_channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        for i in range(1, num_blocks + 1):
            self.add_module(f"resblock{i}", ResidualBlock(channels))
        self.conv2, self.bn2 = _conv_bn(channels, mid_channels)
        self.conv3, self.bn3 = _conv_bn(mid_channels, mid_channels)
        self.conv_final = nn.Conv2d(mid_channels, latent_channels, 1, 1, 0)
        _init(self)
        nn.init.zeros_(self.conv_final.weight)  # starts as the identity on the input latents

    def blocks(self) -> list[ResidualBlock]:
        return [getattr(self, f"resblock{i}") for i in range(1, self.num_blocks + 1)]

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(latents)))
        blocks = self.blocks()
        for start in range(0, len(blocks), GROUP):
            skip = x
            for block in blocks[start : start + GROUP]:
                x = block(x)
            x = x + skip
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.conv_final(x) + latents

    def support_latents(self) -> bool:
        """The generator's question: can it refine latents without the decoded image? No."""
        return False

    @torch.no_grad()
    def upscale(
        self,
        vae: Any,
        lowreso_images: Sequence[Image.Image],
        lowreso_latents: Optional[torch.Tensor],
        dtype: torch.dtype,
        width: int,
        height: int,
        batch_size: int = 1,
        vae_batch_size: int = 1,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Scaled latents (× the VAE's scaling factor) of the images upscaled to width×height.

        The images are resized with Lanczos, encoded by the VAE (a posterior sample), and
        refined by this network in batches of `batch_size`."""
        if not lowreso_images:
            raise UserError("latent upscaler: needs the low-resolution images (it does not work on latents alone)")
        device = next(self.parameters()).device
        pixels = torch.stack([
            torch.from_numpy(np.array(img.convert("RGB").resize((width, height), Image.LANCZOS))).permute(2, 0, 1)
            for img in lowreso_images
        ]).to(dtype) / 127.5 - 1.0
        latents = []
        for i in range(0, len(pixels), vae_batch_size):
            batch = pixels[i : i + vae_batch_size].to(vae.device, dtype=vae.dtype)
            latents.append(vae.encode(batch).latent_dist.sample(generator=generator).to(device, dtype=dtype))
        encoded = torch.cat(latents)
        refined = torch.cat([self(encoded[i : i + batch_size]) for i in range(0, len(encoded), batch_size)])
        return refined * vae.config.scaling_factor


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"latent upscaler weights not found: {path}")
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read latent upscaler weights {path}: {err}") from None
    state = load_pickle_checkpoint(path)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"latent upscaler weights {path}: expected a dict of tensors")
    return dict(state)


def upscaler_from_weights(weights: Mapping[str, torch.Tensor], source: Any = "<weights>") -> Upscaler:
    """An Upscaler shaped by the weights (channel counts, number of blocks), weights loaded."""
    try:
        channels, latent_channels = weights["conv1.weight"].shape[:2]
        mid_channels = weights["conv2.weight"].shape[0]
    except KeyError as err:
        raise UserError(f"latent upscaler weights {source}: no {err.args[0]} (not a latent upscaler?)") from None
    num_blocks = sum(1 for key in weights if key.startswith("resblock") and key.endswith(".conv1.weight"))
    model = Upscaler(int(channels), int(mid_channels), num_blocks, int(latent_channels))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"latent upscaler weights {source} do not fit the architecture ({first})") from None
    return model.eval()


def create_upscaler(**kwargs: Any) -> Upscaler:
    """The generator's entry (`--highres_fix_upscaler_args "weights=<file>"`)."""
    weights = kwargs.get("weights")
    if not weights:
        raise UserError("latent upscaler: pass its weights file (weights=<file>)")
    logger.info("loading latent upscaler weights: %s", weights)
    return upscaler_from_weights(read_weights(weights), weights)


def crop_to_multiple_of_8(image: Image.Image) -> Image.Image:
    width, height = image.width - image.width % 8, image.height - image.height % 8
    if width < 8 or height < 8:
        raise UserError(f"image of {image.width}x{image.height} is too small for the latent upscaler (8x8 at least)")
    return image if (width, height) == image.size else image.crop((0, 0, width, height))


@torch.no_grad()
def decode_latents(vae: Any, scaled_latents: torch.Tensor, vae_batch_size: int = 1) -> list[Image.Image]:
    """Scaled latents → RGB images."""
    images = []
    latents = scaled_latents / vae.config.scaling_factor
    for i in range(0, len(latents), vae_batch_size):
        decoded = vae.decode(latents[i : i + vae_batch_size].to(vae.device, dtype=vae.dtype)).sample
        array = ((decoded.float().cpu().permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        images.extend(Image.fromarray(a) for a in array)
    return images
