"""SD 1.x ControlNet loading (original `control_model.*` files and diffusers layouts), as a
module and as a tool that converts between the layouts.

As a module it offers what `gen_img_diffusers.py` uses: `load_control_net(s)`, `save_control_net`,
`ControlNetSpec`, `make_units`, `ControlNetUnit`, `control_net_residuals` (library/control_net.py) and `get_preprocessor`,
`prepare_hint` (library/control_hint.py). As a tool it loads any supported ControlNet and
writes it in the layout asked for, or (`--from_unet`) starts a new ControlNet from a
Stable Diffusion model's UNet.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.cli import run_main  # noqa: E402
from library.control_hint import get_preprocessor, prepare_hint  # noqa: E402,F401 - re-exported
from library.control_net import (  # noqa: E402,F401 - re-exported
    ControlNetSpec,
    ControlNetUnit,
    control_net_residuals,
    load_control_net,
    load_control_nets,
    make_units,
    save_control_net,
)
from library.model_util import load_target_model, precision_to_dtype  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=str, required=True,
                        help="ControlNet to read: original-layout .safetensors/.pth/.ckpt, diffusers-layout .safetensors or folder")
    parser.add_argument("--save_to", type=str, required=True,
                        help="output: a .safetensors file, or a folder for --layout diffusers")
    parser.add_argument("--layout", type=str, default="original", choices=["original", "diffusers"],
                        help="layout to write (default original: control_model.* keys)")
    parser.add_argument("--from_unet", action="store_true",
                        help="--model is a Stable Diffusion checkpoint: write a new ControlNet copied from its UNet "
                             "(zero convolutions at zero, as at the start of ControlNet training)")
    parser.add_argument("--v2", action="store_true", help="the ControlNet is for SD 2.x (per-block head counts)")
    parser.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision of the written weights (default: as loaded, float32)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    if args.from_unet:
        from diffusers import ControlNetModel

        unet = load_target_model(args.model, v2=args.v2 or None).unet
        model = ControlNetModel.from_unet(unet)
    else:
        model = load_control_net(args.model, v2=args.v2)
    print(save_control_net(model, args.save_to, args.layout, precision_to_dtype(args.save_precision)))


if __name__ == "__main__":
    sys.exit(run_main(main))
