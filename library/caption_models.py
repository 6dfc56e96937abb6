"""BLIP and GIT captioning through transformers' own classes (no vendored model code).

BLIP: `BlipForConditionalGeneration` + `BlipProcessor`, prompted with "a picture of " like the
original BLIP captioner, the prompt cut from the result. GIT: `GitForCausalLM` +
`AutoProcessor`. Both take a local folder (`save_pretrained` layout) or a hub id.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from library.captioning import LoadedImage, load_pretrained
from library.errors import UserError

logger = logging.getLogger(__name__)

BLIP_DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
GIT_DEFAULT_MODEL = "microsoft/git-large-textcaps"
BLIP_PROMPT = "a picture of "


@dataclass
class CaptionModel:
    model: Any
    processor: Any
    device: torch.device


def _to_pil(batch: list[LoadedImage]) -> list[Image.Image]:
    return [Image.fromarray(item.data) for item in batch]


def load_blip(name: str, device: torch.device, flag: str = "--caption_weights") -> CaptionModel:
    """BLIP captioning model and processor from a folder or hub id."""
    if name.lower().endswith((".pth", ".pt", ".ckpt")) or name.startswith(("http://", "https://")):
        raise UserError(
            f"{flag} {name}: this is a checkpoint of the original BLIP code; pass a transformers BLIP "
            f"folder or hub id instead (default {BLIP_DEFAULT_MODEL})"
        )
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor, model = load_pretrained(
        [BlipProcessor.from_pretrained, BlipForConditionalGeneration.from_pretrained], name, flag, "BLIP"
    )
    return CaptionModel(model.to(device).eval(), processor, device)


@torch.no_grad()
def blip_captions(
    blip: CaptionModel,
    batch: list[LoadedImage],
    beam_search: bool = False,
    num_beams: int = 1,
    top_p: float = 0.9,
    max_length: int = 75,
    min_length: int = 5,
) -> list[str]:
    """Captions of one batch: beam search, or nucleus sampling (the BLIP default) otherwise."""
    inputs = blip.processor(images=_to_pil(batch), text=[BLIP_PROMPT] * len(batch), return_tensors="pt")
    inputs = {key: value.to(blip.device) for key, value in inputs.items()}
    if beam_search:
        options: dict[str, Any] = {"num_beams": num_beams, "repetition_penalty": 1.0}
    else:
        # sampling as the original BLIP captioner does it: top-p with a mild repetition penalty
        options = {"do_sample": True, "top_p": top_p, "num_beams": 1, "repetition_penalty": 1.1}
    output = blip.model.generate(**inputs, max_length=max_length, min_length=min_length, **options)
    texts = blip.processor.batch_decode(output, skip_special_tokens=True)
    return [strip_prompt(text, BLIP_PROMPT) for text in texts]


def strip_prompt(text: str, prompt: str) -> str:
    text = text.strip()
    prompt = prompt.strip()
    if text.lower().startswith(prompt.lower()):
        text = text[len(prompt):]
    return text.strip()


def load_git(name: str, device: torch.device, flag: str = "--model_id") -> CaptionModel:
    """GIT captioning model and processor from a folder or hub id."""
    from transformers import AutoProcessor, GitForCausalLM

    processor, model = load_pretrained([AutoProcessor.from_pretrained, GitForCausalLM.from_pretrained], name, flag, "GIT")
    return CaptionModel(model.to(device).eval(), processor, device)


@torch.no_grad()
def git_captions(git: CaptionModel, batch: list[LoadedImage], max_length: int = 50, remove_words: bool = False) -> list[str]:
    pixel_values = git.processor(images=_to_pil(batch), return_tensors="pt").pixel_values.to(git.device)
    output = git.model.generate(pixel_values=pixel_values, max_length=max_length)
    texts = [text.strip() for text in git.processor.batch_decode(output, skip_special_tokens=True)]
    return [remove_text_words(text) if remove_words else text for text in texts]


# GIT (trained on TextCaps) likes to read out the text it sees; these phrases name that text
_QUOTED_OR_WORD = r"(?:\"[^\"]*\"|'[^']*'|[\w']+)"
_TEXT_PHRASES = [
    # "with the words hello world on it", "and the name bob", "has the letters abc on the front"
    re.compile(rf"\b(?:with|and|has) the (?:words?|letters?|name|text) {_QUOTED_OR_WORD}(?: (?:is |are )?(?:on|in) (?:the |a |her |his |its |their )?\w+)?", re.I),
    # "with a sign that says stop", "that says 'open' on it"
    re.compile(rf"(?:\bwith a sign )?\bthat (?:says|reads) {_QUOTED_OR_WORD}(?: on it)?", re.I),
    # "with the number 23"
    re.compile(r"\bwith the number \w+", re.I),
]


def remove_text_words(caption: str) -> str:
    """`--remove_words`: drop phrases that quote the text written in the image."""
    for pattern in _TEXT_PHRASES:
        caption = pattern.sub("", caption)
    caption = re.sub(r"\s{2,}", " ", caption)
    return re.sub(r"\s+([,.])", r"\1", caption).strip()
