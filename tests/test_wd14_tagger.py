"""WD14 tagger on a tiny ONNX graph with the WD14 input/output layout, built here with onnx's
helper API: NHWC float input, mean colour → linear → sigmoid, one output per CSV row."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune import tag_images_by_wd14_tagger as tagger  # noqa: E402
from library import wd14_tagger as wd14  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from tests.caption_fixtures import SIZE, TAGS, write_wd14_model as write_model  # noqa: E402

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd14")
    write_model(root / "SmilingWolf_wd-v1-4-convnext-tagger-v2")
    return root


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (30, 20), (0, 0, 255)).save(folder / "blue.png")  # padded with white to 30x30
    return folder


def run(images: Path, model_dir: Path, *extra: str) -> dict[str, str]:
    tagger.main([str(images), "--model_dir", str(model_dir), *extra])
    result = {}
    for path in sorted(images.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n") and text.count("\n") == 1
        result[path.stem] = text[:-1]
    return result


def test_default_thresholds_and_order(images, model_dir):
    assert run(images, model_dir, "--batch_size", "2") == {
        "red": "long_hair, ^_^, hatsune_miku, cat_girl",
        "blue": "long_hair, blue_sky, ^_^, hatsune_miku, cat_girl",
    }


def test_thresholds_undesired_underscore(images, model_dir):
    tags = run(images, model_dir, "--general_threshold", "0.25", "--character_threshold", "0.6", "--remove_underscore")
    assert tags["red"] == "long hair, ^_^, red shirt, cat girl"
    tags = run(images, model_dir, "--thresh", "0.55", "--undesired_tags", "long_hair, cat_girl")
    assert tags == {"red": "^_^", "blue": "blue_sky, ^_^"}


def test_rating_character_first_and_first_tags(images, model_dir):
    tags = run(images, model_dir, "--use_rating_tags", "--character_tags_first")
    assert tags["red"] == "explicit, hatsune_miku, cat_girl, long_hair, ^_^"
    assert tags["blue"].startswith("general, hatsune_miku")
    tags = run(images, model_dir, "--use_rating_tags_as_last_tag", "--always_first_tags", "cat_girl,^_^,missing")
    assert tags["red"] == "cat_girl, ^_^, long_hair, hatsune_miku, explicit"


def test_separator_replacement_and_append(images, model_dir, capsys):
    (images / "red.txt").write_text("1girl;long_hair\n", encoding="utf-8")
    tags = run(images, model_dir, "--caption_separator", ";", "--append_tags",
               "--tag_replacement", "long_hair,long hair\\, shiny;hatsune_miku,miku", "--frequency_tags")
    assert tags["red"] == "1girl;long_hair;long hair, shiny;^_^;miku;cat_girl"
    assert tags["blue"] == "long hair, shiny;blue_sky;^_^;miku;cat_girl"
    out = capsys.readouterr().out
    assert "cat_girl: 2" in out and "1girl: 1" in out


def test_worker_preprocessing_and_caption_extension(images, model_dir):
    tagger.main([str(images), "--model_dir", str(model_dir), "--max_data_loader_n_workers", "1",
                 "--caption_extension", ".tags", "--onnx"])
    assert (images / "red.tags").read_text(encoding="utf-8") == "long_hair, ^_^, hatsune_miku, cat_girl\n"


def test_model_dir_holding_the_model_itself(images, model_dir):
    direct = model_dir / "SmilingWolf_wd-v1-4-convnext-tagger-v2"
    assert wd14.model_location(direct, "any/repo") == direct
    model = wd14.WD14Model(direct)
    assert model.image_size == SIZE and model.tags.indices(9) == [0, 1] and model.tags.indices(4) == [5, 7]


def test_preprocess_pads_white_and_swaps_to_bgr():
    image = np.zeros((2, 4, 3), dtype=np.uint8)
    image[..., 0] = 200  # red
    out = wd14.preprocess_image(image, 4)
    assert out.shape == (4, 4, 3) and out.dtype == np.float32
    assert out[0].tolist() == [[255.0] * 3] * 4 and out[3].tolist() == [[255.0] * 3] * 4
    assert out[1, 0].tolist() == [0.0, 0.0, 200.0]  # BGR: red is the last channel


def test_tag_replacement_parsing():
    assert wd14.parse_tag_replacement("a,b;c\\,d,e\\;f") == [("a", "b"), ("c,d", "e;f")]
    with pytest.raises(UserError, match="--tag_replacement"):
        wd14.parse_tag_replacement("a,b,c")


def test_bad_inputs_are_one_line(tmp_path, images, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def error_of(argv) -> str:
        assert run_main(tagger.main, argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        return err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in error_of([str(empty), "--model_dir", str(tmp_path)])
    err = error_of([str(images), "--model_dir", str(tmp_path / "nothing"), "--repo_id", "someone/tagger"])
    assert "someone/tagger" in err and "--model_dir <folder>" in err
    # output size != number of tags in the CSV
    bad = write_model(tmp_path / "bad", csv_rows=[(i, t[0], t[1]) for i, t in enumerate(TAGS[:-1])])
    err = error_of([str(images), "--model_dir", str(bad)])
    assert "outputs 8 probabilities" in err and "lists 7 tags" in err and str(bad / "selected_tags.csv") in err
    (bad / "selected_tags.csv").write_text("id,tag\n0,x\n", encoding="utf-8")
    assert "header" in error_of([str(images), "--model_dir", str(bad)])
    assert not list(images.glob("*.txt"))


def test_corrupt_image_skipped(images, model_dir, caplog):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with caplog.at_level("WARNING"):
        tags = run(images, model_dir)
    assert sorted(tags) == ["blue", "red"]
    assert any("broken.png" in r.getMessage() for r in caplog.records)
