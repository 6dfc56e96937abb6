"""detect_face_rotate: rotation estimate on a real photo turned by known angles, crops, names.

The photo is scikit-image's `astronaut` (Eileen Collins, NASA, public domain), which ships in
the scikit-image wheel with the detector's cascade; nothing is stored in this repository.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library import face_rotate as fr  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.image_util import face_info_from_stem  # noqa: E402
from tests.caption_fixtures import doc_commands  # noqa: E402
from tools import detect_face_rotate as tool  # noqa: E402

skimage_data = pytest.importorskip("skimage.data")
SIDE = 256
FACE = (111.5, 58.5)  # face centre in the 256px astronaut (about 223, 117 at 512px)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return cv2.resize(skimage_data.astronaut(), (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def turned(image: np.ndarray, angle: float) -> np.ndarray:
    matrix = cv2.getRotationMatrix2D((SIDE / 2, SIDE / 2), angle, 1.0)
    return cv2.warpAffine(image, matrix, (SIDE, SIDE), borderMode=cv2.BORDER_REFLECT)


def turned_point(point, angle):
    matrix = cv2.getRotationMatrix2D((SIDE / 2, SIDE / 2), angle, 1.0)
    return matrix @ np.array([point[0], point[1], 1.0])


@pytest.fixture(scope="module")
def upright_angle(photo) -> float:
    faces = fr.detect_faces(photo)
    assert faces, "the astronaut's face must be found"
    face = faces[0]
    assert math.hypot(face.cx - FACE[0], face.cy - FACE[1]) < 0.2 * face.size
    assert 35 < face.size < 65
    return face.angle  # her head is tilted a little in the photo itself


@pytest.mark.parametrize("angle", [20, -30])
def test_rotation_is_recovered(photo, upright_angle, angle):
    face = fr.detect_faces(turned(photo, angle))[0]
    centre = turned_point(FACE, angle)
    assert math.hypot(face.cx - centre[0], face.cy - centre[1]) < 0.35 * face.size
    # turning the photo by +a needs a correction of -a on top of the photo's own tilt
    assert abs((face.angle - upright_angle) + angle) <= 6


def test_docs_example(tmp_path, photo, upright_angle, monkeypatch):
    """docs/tools.md's command on the astronaut turned by 20 degrees (plus a faceless and a broken file)."""
    (argv,) = doc_commands(Path(__file__).resolve().parent.parent / "docs" / "tools.md", "tools/detect_face_rotate.py")
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(turned(photo, 20)).save(src / "tilted.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / "noise.png")
    (src / "broken.jpg").write_bytes(b"not an image")
    tool.main(argv[1:])
    dst = tmp_path / "faces"
    (out,) = list(dst.iterdir())
    cx, cy, fw, fh = face_info_from_stem(out.stem)
    assert out.name.startswith("tilted_") and out.suffix == ".png"
    image = np.asarray(Image.open(out))
    assert image.shape == (112, 96, 3)
    assert abs(cx - 48) <= 1 and abs(cy - 56) <= 1 and 35 < fw < 65
    # the written face is upright again: its angle is the photo's own tilt
    again = fr.detect_faces(image)
    assert again and abs(again[0].angle - upright_angle) <= 6


def test_multiple_faces_and_size_filters(tmp_path, photo):
    face = photo[10:106, 64:160]
    canvas = np.full((120, 200, 3), 90, dtype=np.uint8)
    canvas[12:108, 4:100] = face  # face of about 48 px centred near (52, 60)
    canvas[20:104, 110:194] = cv2.resize(face, (84, 84), interpolation=cv2.INTER_AREA)  # about 40 px near (151, 64)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(canvas).save(src / "two.png")
    tool.main(["--src_dir", str(src), "--dst_dir", str(tmp_path / "all"), "--multiple_faces"])
    names = sorted(p.stem for p in (tmp_path / "all").iterdir())
    assert [n[:7] for n in names] == ["two_01_", "two_02_"]
    boxes = [face_info_from_stem(n) for n in names]
    assert boxes[0][2] > boxes[1][2]  # larger face first
    assert boxes[0][0] < 100 and boxes[1][0] > 110  # no crop: positions in the whole image
    tool.main(["--src_dir", str(src), "--dst_dir", str(tmp_path / "small"), "--max_size", str(boxes[0][2] - 2)])
    (only,) = list((tmp_path / "small").iterdir())
    assert face_info_from_stem(only.stem)[0] > 110 and len(only.stem.split("_")) == 5  # no _NN without --multiple_faces


def test_crop_arithmetic():
    image = np.zeros((200, 300, 3), dtype=np.uint8)
    face = fr.Face(cx=40, cy=150, width=50, height=40, angle=0)
    out, box = fr.crop_around_face(image, face, fr.CropSettings(crop_ratio=(2.0, 1.5)))
    assert out.shape == (75, 100, 3) and box == (40, 37, 50, 40)  # clamped at the left edge
    out, box = fr.crop_around_face(image, face, fr.CropSettings(crop_size=(64, 64), resize_face_size=25))
    assert out.shape == (64, 64, 3) and box[2] == 25  # image halved first
    out, box = fr.crop_around_face(image, face, fr.CropSettings(crop_size=(100, 400), resize_fit=True))
    assert out.shape == (400, 100, 3) and box[3] == 80  # resized x2 so the height fits
    assert fr.face_file_stem("a_b", 3, (1, 22, 333, 4444)) == "a_b_03_0001_0022_0333_4444"


def test_flag_errors(tmp_path, capsys):
    def error_of(argv):
        assert run_main(tool.main, argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        return err

    base = ["--src_dir", str(tmp_path), "--dst_dir", str(tmp_path / "out")]
    assert "no images" in error_of(base)
    assert "cannot be used together" in error_of(base + ["--resize_fit", "--resize_face_size", "64", "--crop_size", "64,64"])
    assert "--crop_size" in error_of(base + ["--crop_size", "64"])
    with pytest.raises(UserError, match="--crop_ratio"):
        fr.CropSettings(crop_ratio=(1, 1), resize_face_size=3).check()
