"""BLIP / GIT captioners on tiny random-weight transformers models saved as folders."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune import make_captions, make_captions_by_git  # noqa: E402
from library.caption_models import BLIP_PROMPT, remove_text_words, strip_prompt  # noqa: E402
from library.captioning import caption_path, find_images, iter_image_batches  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from tests.caption_fixtures import write_corrupt_image, write_images, write_tiny_blip, write_tiny_git  # noqa: E402


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return write_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory):
    return write_tiny_git(tmp_path_factory.mktemp("git") / "tiny-git")


def read_caption(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text[:-1]


def reference_blip(folder: Path, image: Path, **generate) -> str:
    """What transformers itself generates for one image, prompted like the captioner."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[BLIP_PROMPT], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **generate)
    return strip_prompt(processor.batch_decode(out, skip_special_tokens=True)[0], BLIP_PROMPT)


def test_blip_beam_search_matches_transformers(tmp_path, blip_dir):
    images = write_images(tmp_path / "imgs", count=3)
    make_captions.main([str(tmp_path / "imgs"), "--caption_weights", str(blip_dir), "--beam_search",
                        "--num_beams", "2", "--max_length", "12", "--min_length", "4", "--batch_size", "2"])
    captions = {p.name: read_caption(caption_path(p, ".caption")) for p in images}
    assert sorted(captions) == ["img0.png", "img1.png", "img2.png"]
    for image in images:
        expected = reference_blip(blip_dir, image, num_beams=2, max_length=12, min_length=4, repetition_penalty=1.0)
        assert expected  # the tiny vocabulary has only real words: never empty
        assert captions[image.name] == expected


def test_blip_sampling_is_seeded(tmp_path, blip_dir):
    write_images(tmp_path / "imgs", count=2)
    argv = [str(tmp_path / "imgs"), "--model_id", str(blip_dir), "--max_length", "10", "--min_length", "3",
            "--caption_extension", ".txt", "--seed", "7"]
    make_captions.main(argv)
    first = [read_caption(tmp_path / "imgs" / f"img{i}.txt") for i in range(2)]
    make_captions.main(argv)
    assert [read_caption(tmp_path / "imgs" / f"img{i}.txt") for i in range(2)] == first
    assert not list((tmp_path / "imgs").glob("*.caption"))


def test_git_captions_match_transformers_and_recursive(tmp_path, git_dir):
    from transformers import AutoProcessor, GitForCausalLM

    write_images(tmp_path / "imgs", count=1)
    nested = write_images(tmp_path / "imgs" / "sub", count=1, seed=3)[0]
    make_captions_by_git.main([str(tmp_path / "imgs"), "--model_id", str(git_dir), "--max_length", "9",
                               "--recursive", "--caption_extension", ".txt"])
    processor = AutoProcessor.from_pretrained(git_dir)
    model = GitForCausalLM.from_pretrained(git_dir).eval()
    for image in (tmp_path / "imgs" / "img0.png", nested):
        pixels = processor(images=[Image.open(image).convert("RGB")], return_tensors="pt").pixel_values
        with torch.no_grad():
            expected = processor.batch_decode(model.generate(pixel_values=pixels, max_length=9), skip_special_tokens=True)[0]
        assert read_caption(caption_path(image, ".txt")) == expected.strip()


def test_remove_words_phrases():
    assert remove_text_words('a red sign with the words "hello world" on it') == "a red sign"
    assert remove_text_words("a shop with a sign that says open") == "a shop"
    assert remove_text_words("a shirt with the number 23, on a chair") == "a shirt, on a chair"
    assert remove_text_words("a cat with the name tom on the collar sitting") == "a cat sitting"
    assert remove_text_words("a dog on the grass") == "a dog on the grass"


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, git_dir, caplog):
    write_images(tmp_path / "imgs", count=2)
    broken = write_corrupt_image(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING):
        make_captions_by_git.main([str(tmp_path / "imgs"), "--model_id", str(git_dir), "--max_length", "6",
                                   "--batch_size", "2"])
    assert any(str(broken) in rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING)
    assert sorted(p.name for p in (tmp_path / "imgs").glob("*.caption")) == ["img0.caption", "img1.caption"]


def test_loader_workers_give_the_same_batches(tmp_path):
    paths = write_images(tmp_path, count=3)
    write_corrupt_image(tmp_path, "zz.png")
    paths = find_images(tmp_path)
    in_main = [[(item.path, item.data.shape) for item in b] for b in iter_image_batches(paths, 2, None)]
    workers = [[(item.path, item.data.shape) for item in b] for b in iter_image_batches(paths, 2, 2)]
    assert in_main == workers
    assert [len(b) for b in in_main] == [2, 1]  # the corrupt 4th image leaves the 2nd batch short
    assert in_main[0][1][1] == (40, 56, 3)


@pytest.mark.parametrize("script", [make_captions, make_captions_by_git])
def test_bad_inputs_are_one_line(tmp_path, capsys, script, monkeypatch):
    import huggingface_hub.constants

    # no network here anyway; offline mode makes the hub refuse at once instead of resolving a host
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x", encoding="utf-8")
    flag = "--caption_weights" if script is make_captions else "--model_id"

    def error_of(argv):
        assert run_main(script.main, argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        return err

    assert "no images" in error_of([str(empty)]) and str(empty) in error_of([str(empty)])
    write_images(tmp_path / "imgs", count=1)
    missing = tmp_path / "models" / "nothing-here"
    err = error_of([str(tmp_path / "imgs"), flag, str(missing)])
    assert str(missing) in err and "not found" in err
    # a hub id that is not cached, offline: names the model and how to pass a folder
    err = error_of([str(tmp_path / "imgs"), flag, "someone/not-a-cached-model"])
    assert "someone/not-a-cached-model" in err and f"{flag} <folder>" in err
    assert not list((tmp_path / "imgs").glob("*.caption"))


def test_original_blip_checkpoint_is_refused(tmp_path, capsys):
    write_images(tmp_path, count=1)
    assert run_main(make_captions.main, [str(tmp_path), "--caption_weights", "model_large_caption.pth"]) == 1
    assert "transformers BLIP folder" in capsys.readouterr().err


def test_caption_extention_spelling(tmp_path, git_dir):
    write_images(tmp_path, count=1)
    make_captions_by_git.main([str(tmp_path), "--model_id", str(git_dir), "--max_length", "5",
                               "--caption_extention", ".cap2"])
    assert (tmp_path / "img0.cap2").is_file()


def test_find_images_errors(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        find_images(tmp_path / "missing")
    (tmp_path / "sub").mkdir()
    write_images(tmp_path / "sub", count=1)
    with pytest.raises(UserError, match="--recursive"):
        find_images(tmp_path)
    assert find_images(tmp_path, recursive=True) == [tmp_path / "sub" / "img0.png"]
    assert np.asarray(Image.open(tmp_path / "sub" / "img0.png")).shape == (40, 48, 3)


def test_docs_examples(tmp_path, monkeypatch, blip_dir, git_dir):
    """The worked examples of docs/captioning.md, on tiny models at the paths the doc uses."""
    import shutil

    from finetune import tag_images_by_wd14_tagger
    from tests.caption_fixtures import doc_commands, write_wd14_model

    doc = Path(__file__).resolve().parent.parent / "docs" / "captioning.md"
    commands = doc_commands(doc, "finetune/")
    assert [c[0] for c in commands] == ["finetune/make_captions.py", "finetune/make_captions_by_git.py",
                                        "finetune/tag_images_by_wd14_tagger.py"]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(blip_dir, tmp_path / "models" / "blip-large")
    shutil.copytree(git_dir, tmp_path / "models" / "git-large-textcaps")
    write_wd14_model(tmp_path / "wd14_tagger_model" / "SmilingWolf_wd-v1-4-convnext-tagger-v2")
    images = tmp_path / "train_images"
    images.mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(images / "red.png")
    Image.new("RGB", (30, 20), (0, 0, 255)).save(images / "blue.png")
    scripts = {"finetune/make_captions.py": make_captions, "finetune/make_captions_by_git.py": make_captions_by_git,
               "finetune/tag_images_by_wd14_tagger.py": tag_images_by_wd14_tagger}
    for script, *argv in commands:
        scripts[script].main(argv)
    for stem in ("red", "blue"):
        assert read_caption(images / f"{stem}.caption") and read_caption(images / f"{stem}.git.txt") is not None
    assert read_caption(images / "red.txt") == "explicit, long hair, ^_^, cat girl"
    assert read_caption(images / "blue.txt") == "general, long hair, blue sky, ^_^, cat girl"


def test_hub_id_from_the_cache_offline(tmp_path, git_dir, monkeypatch):
    """A hub id already in the Hugging Face cache loads without the network."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny--git-test"
    commit = "0" * 40
    shutil.copytree(git_dir, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("_tokenizer"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    write_images(tmp_path / "imgs", count=1)
    make_captions_by_git.main([str(tmp_path / "imgs"), "--model_id", "tiny/git-test", "--max_length", "6"])
    local = tmp_path / "local"
    write_images(local, count=1)
    make_captions_by_git.main([str(local), "--model_id", str(git_dir), "--max_length", "6"])
    assert read_caption(tmp_path / "imgs" / "img0.caption") == read_caption(local / "img0.caption")
