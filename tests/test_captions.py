"""Caption files and per-step caption processing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataset_fixtures import write_text
from library.captions import CaptionSettings, process_caption, read_caption, update_tag_frequency, warmup_steps
from library.errors import UserError

CAPTION = "sks dog, red collar, grass, sunny, park, smiling"


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def test_shuffle_keep_tokens_deterministic_and_varies() -> None:
    settings = CaptionSettings(shuffle_caption=True, keep_tokens=1)
    first = process_caption(CAPTION, settings, _rng(7, 0, 3, 0), epoch=0, step=0)
    again = process_caption(CAPTION, settings, _rng(7, 0, 3, 0), epoch=0, step=0)
    assert first == again
    results = {process_caption(CAPTION, settings, _rng(7, epoch, 3, 0), epoch, 0) for epoch in range(8)}
    assert len(results) > 1  # differs across epochs
    for text in results:
        tags = text.split(", ")
        assert tags[0] == "sks dog"  # kept in front
        assert sorted(tags) == sorted(CAPTION.split(", "))


def test_no_processing_keeps_caption_verbatim() -> None:
    assert process_caption(" a,b ,c", CaptionSettings(), _rng(0), 0, 0) == " a,b ,c"


def test_caption_dropout_rate_and_every_n_epochs() -> None:
    assert process_caption(CAPTION, CaptionSettings(caption_dropout_rate=1.0), _rng(1), 0, 0) == ""
    every_two = CaptionSettings(caption_dropout_every_n_epochs=2)
    # epochs are 0-based here; sd-scripts counts from 1, so the 2nd, 4th, ... epochs drop
    dropped = [process_caption(CAPTION, every_two, _rng(1), epoch, 0) == "" for epoch in range(4)]
    assert dropped == [False, True, False, True]
    half = CaptionSettings(caption_dropout_rate=0.5)
    outcomes = [process_caption(CAPTION, half, _rng(1, i), 0, 0) == "" for i in range(200)]
    assert 60 < sum(outcomes) < 140


def test_tag_dropout_keeps_fixed_tokens() -> None:
    settings = CaptionSettings(caption_tag_dropout_rate=0.5, keep_tokens=2)
    lengths = []
    for i in range(50):
        tags = process_caption(CAPTION, settings, _rng(3, i), 0, 0).split(", ")
        assert tags[:2] == ["sks dog", "red collar"]
        lengths.append(len(tags))
    assert min(lengths) < 6 and max(lengths) > 2
    assert process_caption(CAPTION, CaptionSettings(caption_tag_dropout_rate=1.0, keep_tokens=1), _rng(0), 0, 0) == "sks dog"


def test_token_warmup() -> None:
    settings = CaptionSettings(token_warmup_min=2, token_warmup_step=8)
    # tags used = floor(step * (6 - 2) / 8) + 2 while step < 8
    counts = [len(process_caption(CAPTION, settings, _rng(0), 0, step).split(", ")) for step in (0, 1, 2, 4, 7, 8, 100)]
    assert counts == [2, 2, 3, 4, 5, 6, 6]
    assert warmup_steps(0.5, 40) == 20 and warmup_steps(10, 40) == 10 and warmup_steps(0, 40) == 0
    fraction = CaptionSettings(token_warmup_min=1, token_warmup_step=0.5)
    assert process_caption(CAPTION, fraction, _rng(0), 0, 0, max_train_steps=10) == "sks dog"


def test_read_caption_files(tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    write_text(tmp_path / "photo.txt", "first line  \nsecond line")
    assert read_caption(image, ".txt") == "first line"
    assert read_caption(image, ".caption") is None
    # face-crop suffix: photo_10_20_30_40.png also uses photo.txt
    assert read_caption(tmp_path / "photo_10_20_30_40.png", ".txt") == "first line"
    write_text(tmp_path / "empty.txt", "")
    with pytest.raises(UserError, match="empty.txt"):
        read_caption(tmp_path / "empty.png", ".txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match="latin.txt"):
        read_caption(tmp_path / "latin.png", ".txt")


def test_tag_frequency() -> None:
    frequency: dict = {}
    update_tag_frequency(frequency, "10_sks dog", ["Dog, grass", "dog,  Park ", ""])
    update_tag_frequency(frequency, "10_sks dog", ["grass"])
    assert frequency == {"10_sks dog": {"dog": 2, "grass": 2, "park": 1}}


def test_textual_inversion_replacements() -> None:
    settings = CaptionSettings()
    assert process_caption("a photo of sks", settings, _rng(0), 0, 0, replacements={"sks": "sks1 sks2"}) == "a photo of sks1 sks2"
    templates = ["a photo of {}", "a rendering of {}", "a cropped photo of {}"]
    chosen = {process_caption("ignored", settings, _rng(9, i), 0, 0, replacements={"": templates}) for i in range(30)}
    assert chosen == set(templates)
    assert process_caption("x", CaptionSettings(caption_dropout_rate=1.0), _rng(0), 0, 0, replacements={"": "t"}) == ""
