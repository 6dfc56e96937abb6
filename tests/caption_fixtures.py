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

SIZE = 16
# (name, category, bias logit, weight on mean B, G, R in [0, 1])
TAGS = [
    ("general", 9, 0.847, (0, 0, 0)),          # p 0.70
    ("explicit", 9, -1.386, (0, 0, 4.0)),      # red image: p 0.93 > 0.70
    ("long_hair", 0, 2.197, (0, 0, 0)),        # p 0.90
    ("blue_sky", 0, -3.0, (6.0, 0, 0)),        # blue image 0.95, red image 0.05
    ("^_^", 0, 0.405, (0, 0, 0)),              # p 0.60
    ("hatsune_miku", 4, 0.0, (0, 0, 0)),       # p 0.50
    ("red_shirt", 0, -0.847, (0, 0, 0)),       # p 0.30
    ("cat_girl", 4, 1.386, (0, 0, 0)),         # p 0.80
]


def write_wd14_model(folder: Path, tags=TAGS, csv_rows=None, size: int = SIZE) -> Path:
    """A WD14-layout folder: model.onnx (NHWC input, mean colour → linear → sigmoid) + selected_tags.csv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper


    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[3] for t in tags], dtype=np.float32).T / 255.0  # [3, T] on 0-255 means
    bias = np.array([t[2] for t in tags], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "B"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", len(tags)])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = csv_rows if csv_rows is not None else [(i, t[0], t[1]) for i, t in enumerate(tags)]
    lines = ["tag_id,name,category,count"] + [f"{i},{name},{cat},100" for i, name, cat in rows]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


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
        text_config=_small_transformer(vocab_size=len(WORDS), max_position_embeddings=128, bos_token_id=2,
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
        vocab_size=len(WORDS), max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=0,
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


def doc_commands(doc: Path, prefix: str) -> list[list[str]]:
    """The argv (without `python <script>`) of every `python <prefix>...` line in the doc's bash blocks."""
    import shlex

    commands, in_block = [], False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```bash" if not in_block else False
            continue
        if in_block and line.startswith(f"python {prefix}"):
            words = shlex.split(line)
            commands.append([words[1]] + words[2:])
    return commands
