"""tools/resize_images_to_resolution.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dataset_fixtures import write_image, write_text
from library.cli import run_main
from tools import resize_images_to_resolution


def test_resize_to_area_divisible_and_copy_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_image(src / "big.png", 200, 100, seed=1)
    write_image(src / "small.jpg", 30, 20, seed=2)
    write_text(src / "big.txt", "a caption")
    write_text(src / "notes.md", "other file")
    (src / "big.npz").write_bytes(b"stale latent cache")
    resize_images_to_resolution.main([
        str(src), str(dst), "--max_resolution", "64x64,32x32", "--divisible_by", "8", "--save_as_png", "--copy_associated_files",
    ])
    sizes = {p.name: Image.open(p).size for p in dst.glob("*.png")}
    # 200x100 to 4096 px: factor sqrt(4096/20000) = 0.4525 -> 90x45, floored to x8 by a centre crop -> 88x40
    # to 1024 px: factor 0.2263 -> 45x22 -> 40x16;  30x20 (600 px) fits 64x64: only cropped to 24x16
    assert sizes == {"big+64x64.png": (88, 40), "big+32x32.png": (40, 16), "small+64x64.png": (24, 16), "small+32x32.png": (24, 16)}
    assert (dst / "big+64x64.txt").read_text(encoding="utf-8") == "a caption"
    assert (dst / "big+32x32.txt").is_file()
    assert (dst / "notes.md").read_text(encoding="utf-8") == "other file"  # non-image files are copied
    assert (dst / "big.txt").is_file()
    assert not list(dst.glob("*.npz"))  # latent caches of the original size are not carried over


def test_default_jpg_output_and_interpolation_choice(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_image(src / "a.png", 100, 100)
    resize_images_to_resolution.main([str(src), str(dst), "--max_resolution", "50x50", "--interpolation", "lanczos4"])
    with Image.open(dst / "a+50x50.jpg") as image:
        assert image.format == "JPEG" and image.size == (50, 50)
    with pytest.raises(SystemExit):
        resize_images_to_resolution.main([str(src), str(dst), "--interpolation", "bogus"])


def test_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main(resize_images_to_resolution.main, [str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "missing" in capsys.readouterr().err
    src = tmp_path / "src"
    write_image(src / "a.png", 10, 10)
    assert run_main(resize_images_to_resolution.main, [str(src), str(tmp_path / "o"), "--max_resolution", "64"]) == 1
    assert "64" in capsys.readouterr().err
    (src / "broken.png").write_bytes(b"xx")
    assert run_main(resize_images_to_resolution.main, [str(src), str(tmp_path / "o2"), "--max_resolution", "8x8"]) == 0
    assert [p.name for p in (tmp_path / "o2").iterdir()] == ["a+8x8.jpg"]
