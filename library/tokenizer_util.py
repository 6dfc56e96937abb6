"""Offline CLIP tokenizers for SD v1 (CLIP ViT-L/14) and SD v2 (OpenCLIP ViT-H/14).

Both use the same BPE vocabulary, shipped as package data in `library/clip_tokenizer`
(see its NOTICE). They differ only in the padding token: v1 pads with the end-of-text
token (49407), v2 pads with "!" (id 0), as the hub tokenizers do.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from library.io_util import atomic_dir

if TYPE_CHECKING:  # transformers is imported when a tokenizer is loaded, not with this module
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
# The hub ids these tokenizers stand in for; used to name folders in --tokenizer_cache_dir.
V1_TOKENIZER_ID = "openai/clip-vit-large-patch14"
V2_TOKENIZER_ID = "stabilityai/stable-diffusion-2"
V2_PAD_TOKEN = "!"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407


def _cache_folder(cache_dir: str | Path, v2: bool) -> Path:
    repo_id = V2_TOKENIZER_ID if v2 else V1_TOKENIZER_ID
    return Path(cache_dir) / repo_id.replace("/", "_")


def load_tokenizer(v2: bool = False, tokenizer_cache_dir: str | Path | None = None) -> CLIPTokenizer:
    """Return the SD v1 or v2 tokenizer without touching the network.

    With `tokenizer_cache_dir`, a tokenizer saved there earlier (by this toolkit or by
    sd-scripts) is used; otherwise the packaged one is built and saved there for next time.
    """
    from transformers import CLIPTokenizer

    if tokenizer_cache_dir is not None:
        cached = _cache_folder(tokenizer_cache_dir, v2)
        if (cached / "tokenizer_config.json").is_file():
            logger.info("loading tokenizer from cache: %s", cached)
            return CLIPTokenizer.from_pretrained(str(cached))
    if v2:
        tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=V2_PAD_TOKEN)
    else:
        tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if tokenizer_cache_dir is not None:
        cached = _cache_folder(tokenizer_cache_dir, v2)
        logger.info("saving tokenizer to cache: %s", cached)
        with atomic_dir(cached) as tmp:
            tokenizer.save_pretrained(str(tmp))
    return tokenizer
