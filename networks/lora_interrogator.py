"""List the vocabulary tokens whose text-encoder output a LoRA changes most.

Same arguments as sd-scripts' networks/lora_interrogator.py:

    python networks/lora_interrogator.py --sd_model model.safetensors --model my_lora.safetensors

Prints the top 100 tokens as `[rank]: token_id token : mean |difference|`. The LoRA needs
text-encoder modules (`lora_te_*`); one trained with --network_train_unet_only cannot be
interrogated.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.model_util import load_target_model  # noqa: E402
from networks import lora  # noqa: E402
from library.lora_modules import load_lora_file  # noqa: E402
from networks.lora_interrogate import rank_tokens, token_states  # noqa: E402

logger = logging.getLogger(__name__)

TOP_N = 100


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v2", action="store_true", help="the model is SD 2.x (also detected from the weights)")
    parser.add_argument("--sd_model", type=str, required=True, help="SD model the LoRA is for (file or Diffusers folder)")
    parser.add_argument("--model", type=str, required=True, help="LoRA file to interrogate (.safetensors/.pt/.ckpt)")
    parser.add_argument("--batch_size", type=int, default=16, help="token ids per text-encoder batch")
    parser.add_argument("--clip_skip", type=int, default=None, help="use the n-th text-encoder layer from the end (n >= 1)")
    return parser


def interrogate(args: argparse.Namespace) -> list[tuple[int, float]]:
    """Print the top tokens; returns every token id with its change, largest first."""
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be a positive integer, got {args.batch_size}")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError(f"--clip_skip must be at least 1, got {args.clip_skip}")
    weights_sd, _ = load_lora_file(args.model)
    if not any(key.startswith(lora.LORA_PREFIX_TEXT_ENCODER + "_") for key in weights_sd):
        raise UserError(f"{args.model}: this LoRA has no text-encoder modules (lora_te_*); there is nothing to interrogate")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    logger.info("loading SD model: %s", args.sd_model)
    models = load_target_model(args.sd_model, v2=args.v2 or None, dtype=dtype, device=device)
    text_encoder, tokenizer = models.text_encoder, models.tokenizer
    network, weights_sd = lora.create_network_from_weights(
        1.0, args.model, models.vae, text_encoder, models.unet, weights_sd=weights_sd
    )
    if not network.text_encoder_loras:
        raise UserError(f"{args.model}: none of its text-encoder modules match a layer of {args.sd_model}")
    token_ids = range(0, max(tokenizer.all_special_ids) + 1)
    logger.info("interrogating token ids %d to %d", token_ids.start, token_ids.stop - 1)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    original = token_states(text_encoder, bos, eos, token_ids, args.batch_size, args.clip_skip)

    network.apply_to(text_encoder, models.unet, apply_text_encoder=True, apply_unet=False)
    network.load_state_dict(weights_sd, strict=False)  # the U-Net modules were dropped
    network.to(device, dtype=dtype).eval()
    with_lora = token_states(text_encoder, bos, eos, token_ids, args.batch_size, args.clip_skip)
    network.restore()

    ranked = rank_tokens(original, with_lora, token_ids.start)
    print(f"top {TOP_N}:")
    for rank, (token, diff) in enumerate(ranked[:TOP_N]):
        text = tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens([token]))
        print(f"[{rank:3d}]: {token:5d} {text:<20s}: {diff:.5f}")
    return ranked


def main(argv: Optional[Sequence[str]] = None) -> list[tuple[int, float]]:
    return interrogate(setup_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
