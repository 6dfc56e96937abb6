"""Atomic outputs: files and folders replace the old ones only when complete."""
from __future__ import annotations

import os

import pytest

from library.io_util import atomic_dir, atomic_path, replace_dir, write_text_atomic


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("interrupted")
    assert target.read_text(encoding="utf-8") == "first"
    write_text_atomic(target, "second")
    assert target.read_text(encoding="utf-8") == "second"
    assert _names(tmp_path) == ["out.txt"]


def test_atomic_dir_replaces_folder_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    assert _names(target) == ["a.bin"]
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b.bin").write_bytes(b"2")
            raise RuntimeError("interrupted")
    assert _names(target) == ["a.bin"]
    with atomic_dir(target) as tmp:
        (tmp / "c.bin").write_bytes(b"3")
    assert _names(target) == ["c.bin"]
    assert _names(tmp_path) == ["model"]  # no temp or moved-aside folder left


def test_replace_dir_swaps_in_a_finished_folder(tmp_path):
    target = tmp_path / "state"
    target.mkdir()
    (target / "old.json").write_text("{}", encoding="utf-8")
    new = tmp_path / ".state.partial"
    new.mkdir()
    (new / "new.json").write_text("[]", encoding="utf-8")
    replace_dir(new, target)
    assert _names(target) == ["new.json"]
    assert _names(tmp_path) == ["state"]
    fresh = tmp_path / ".other.partial"
    fresh.mkdir()
    replace_dir(fresh, tmp_path / "other")  # no existing target
    assert _names(tmp_path) == ["other", "state"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_outputs_get_the_modes_of_plainly_created_files(tmp_path) -> None:
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain_dir"
    plain_file.write_text("x", encoding="utf-8")
    plain_dir.mkdir()
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("x", encoding="utf-8")
    with atomic_dir(tmp_path / "out_dir") as tmp:
        (tmp / "a").write_text("x", encoding="utf-8")
    assert (tmp_path / "out.txt").stat().st_mode == plain_file.stat().st_mode
    assert (tmp_path / "out_dir").stat().st_mode == plain_dir.stat().st_mode
