"""Tiny random-weight BLIP and GIT models (transformers' own classes) saved as model folders,
and small image folders, for the captioner tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "cat", "dog", "red", "blue",
         "sky", "on", "the", "with", "words", "hello", "says", "that", "tree", "house", "green", "small"]
IMAGE_SIZE = 32


def _write_tokenizer(folder: Path):
    """A BERT word-piece tokenizer over WORDS, loaded back through from_pretrained (building it
    from vocab_file directly maps every word to [UNK] in transformers 5)."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}), encoding="utf-8"
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("a picture of a cat").input_ids == [2, 5, 6, 7, 5, 8, 3]
    return tokenizer


def _small_transformer(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **extra)


def write_tiny_blip(folder: Path, seed: int = 0) -> Path:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = _write_tokenizer(folder / "_tokenizer")
    config = BlipConfig(
        text_config=_small_transformer(vocab_size=len(WORDS), max_position_embeddings=64, bos_token_id=2,
                                       sep_token_id=3, pad_token_id=0, eos_token_id=3),
        vision_config=_small_transformer(image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_tiny_git(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = _write_tokenizer(folder / "_tokenizer")
    config = GitConfig(
        vision_config=_small_transformer(image_size=IMAGE_SIZE, patch_size=8),
        vocab_size=len(WORDS), max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        **_small_transformer(),
    )
    torch.manual_seed(seed)
    model = GitForCausalLM(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int = 3, size: tuple[int, int] = (48, 40), seed: int = 0) -> list[Path]:
    """`img0.png` ... random RGB images (different sizes per image when count > 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = size[0] + 8 * i, size[1]
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_corrupt_image(folder: Path, name: str = "broken.jpg") -> Path:
    path = folder / name
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return path
