"""gen_img_diffusers.py with --textual_inversion_embeddings (sd-scripts safetensors and A1111 .pt)
and --XTI_embeddings: the token changes the image, prompts without it stay as they were."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gen_helpers import generate_pixels, one_line_error
from library import embedding_files, xti


def generate(model: Path, outdir: Path, prompt: str, *extra: str) -> np.ndarray:
    return generate_pixels(model, outdir, *extra, prompt=prompt)


def random_vectors(tiny_models_v1, count: int, seed: int) -> torch.Tensor:
    dim = tiny_models_v1[2].get_input_embeddings().embedding_dim
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))


def test_ti_embeddings_change_the_image(tmp_path, tiny_model_files_v1, tiny_models_v1):
    model = tiny_model_files_v1["safetensors"]
    # the layouts train_textual_inversion.py writes: sd-scripts `emb_params` (.safetensors) and A1111 (.pt)
    ours = embedding_files.save_embedding(tmp_path / "mychar.safetensors", random_vectors(tiny_models_v1, 2, 1))
    a1111 = embedding_files.save_embedding(tmp_path / "otherchar.pt", random_vectors(tiny_models_v1, 1, 2), step=10)
    flags = ["--textual_inversion_embeddings", str(ours), str(a1111)]
    base = generate(model, tmp_path / "base", "a photo of a cat")
    assert np.array_equal(generate(model, tmp_path / "plain", "a photo of a cat", *flags), base)
    with_ours = generate(model, tmp_path / "ours", "a photo of mychar", *flags)
    with_a1111 = generate(model, tmp_path / "a1111", "a photo of otherchar", *flags)
    without = generate(model, tmp_path / "without", "a photo of")
    assert np.abs(with_ours - without).max() > 0
    assert np.abs(with_a1111 - without).max() > 0
    assert np.abs(with_ours - with_a1111).max() > 0


def test_corrupt_and_wrong_embeddings_are_one_line_errors(tmp_path, capsys, tiny_model_files_v1):
    corrupt = tmp_path / "broken.pt"
    corrupt.write_bytes(b"PK\x03\x04 not a zip")
    wrong_dim = embedding_files.save_embedding(tmp_path / "wide.safetensors", torch.zeros(1, 1024))
    base = ["--ckpt", str(tiny_model_files_v1["safetensors"]), "--outdir", str(tmp_path), "--prompt", "a",
            "--W", "64", "--H", "64", "--steps", "2"]
    for path in (corrupt, wrong_dim):
        assert path.name in one_line_error(capsys, base + ["--textual_inversion_embeddings", str(path)])


def test_xti_embedding_changes_the_image(tmp_path, tiny_model_files_v1, tiny_models_v1):
    model = tiny_model_files_v1["safetensors"]
    unet = tiny_models_v1[0]
    blocks = {name: random_vectors(tiny_models_v1, 1, i) for i, name in enumerate(xti.xti_blocks(unet))}
    path = embedding_files.save_xti_file(tmp_path / "xtichar.safetensors", blocks)
    base = generate(model, tmp_path / "base", "a photo of a cat")
    plain = generate(model, tmp_path / "plain", "a photo of a cat", "--XTI_embeddings", str(path))
    # a prompt without the token gives every block the same states: the base image up to fp rounding
    assert np.abs(plain - base).max() <= 1
    with_token = generate(model, tmp_path / "xti", "a photo of xtichar", "--XTI_embeddings", str(path))
    without = generate(model, tmp_path / "without", "a photo of")
    assert np.abs(with_token - without).max() > 0


def test_embedding_trained_by_train_textual_inversion(tmp_path, tiny_model_files_v1):
    """The trainer's own output file (runs once train_textual_inversion.py is in the tree)."""
    trainer = pytest.importorskip("train_textual_inversion")
    from train_helpers import make_image_folder

    model = tiny_model_files_v1["safetensors"]
    images = make_image_folder(tmp_path / "data", count=2, repeats=1)
    for caption in images.glob("*/*.txt"):
        caption.write_text("a photo of mychar, " + caption.read_text(encoding="utf-8"), encoding="utf-8")
    trainer.main([
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images), "--caption_extension", ".txt",
        "--resolution", "64", "--output_dir", str(tmp_path / "ti"), "--output_name", "mychar",
        "--token_string", "mychar", "--init_word", "dog", "--learning_rate", "5e-2", "--optimizer_type", "AdamW",
        "--train_batch_size", "2", "--max_train_steps", "3", "--seed", "42", "--max_data_loader_n_workers", "0",
        "--save_model_as", "safetensors",
    ])
    embedding = tmp_path / "ti" / "mychar.safetensors"
    with_token = generate(model, tmp_path / "with", "a photo of mychar", "--textual_inversion_embeddings", str(embedding))
    without = generate(model, tmp_path / "without", "a photo of")
    assert np.abs(with_token - without).max() > 0
