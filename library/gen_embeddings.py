"""Embeddings for generation: `--textual_inversion_embeddings` and `--XTI_embeddings`.

Each file's token is its file stem, as in sd-scripts and AUTOMATIC1111. An embedding of n
vectors adds the tokens `T, T1, …, T{n-1}` (`library.embedding_files`); a prompt names it with
`T` alone, which `expand_prompt` turns into all n tokens before encoding. Files are read by
`library.embedding_files` (sd-scripts, A1111 `.pt` through the restricted unpickler, diffusers)
and XTI files are wired in by `library.xti`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from library import embedding_files, xti
from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class PromptToken:
    token: str
    num_vectors: int


def load_embeddings(args, tokenizer, text_encoder, unet) -> tuple[Any, list[PromptToken]]:
    """Add every TI / XTI embedding; returns the text encoder to use (XTI wraps it) and the tokens."""
    tokens: list[PromptToken] = []
    for file in args.textual_inversion_embeddings or []:
        token, ids = embedding_files.load_embedding_into(tokenizer, text_encoder, Path(file))
        tokens.append(PromptToken(token, len(ids)))
        logger.info("textual inversion embedding %s: token '%s', %d vectors", file, token, len(ids))
    xti_files = list(args.XTI_embeddings or [])
    if len(xti_files) > 1:
        raise UserError("--XTI_embeddings: one XTI file at a time is supported")
    for file in xti_files:
        path = Path(file)
        blocks, _ = embedding_files.read_xti_file(path)
        num_vectors = int(next(iter(blocks.values())).shape[0])
        text_encoder = xti.load_xti_embedding(tokenizer, text_encoder, unet, path.stem, blocks, str(path))
        tokens.append(PromptToken(path.stem, num_vectors))
        logger.info("XTI embedding %s: token '%s', %d vectors per block", file, path.stem, num_vectors)
    return text_encoder, tokens


def expand_prompt(text: str, tokens: Sequence[PromptToken]) -> str:
    """Write each multi-vector token of `text` as all of its tokens (whole words only)."""
    for item in tokens:
        if item.num_vectors > 1:
            names = " ".join(embedding_files.token_strings(item.token, item.num_vectors))
            text = re.sub(rf"(?<![\w]){re.escape(item.token)}(?![\w])", names, text)
    return text
