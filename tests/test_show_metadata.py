"""tools/show_metadata.py: prints a safetensors file's metadata as JSON - for our files and for
files written by other tools (unknown dtypes, non-string values, no metadata)."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.cli import run_main
from tools.show_metadata import main


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    """A safetensors file written byte by byte, as another program might."""
    raw = json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_prints_the_metadata_as_sorted_json(tmp_path, capsys):
    path = tmp_path / "lora.safetensors"
    metadata = {"ss_network_dim": "4", "ss_tag_frequency": json.dumps({"10_dog": {"dog": 3}}), "a_key": "ü"}
    save_file({"x": torch.ones(2)}, str(path), metadata)
    assert run_main(main, ["--model", str(path)]) == 0
    out = capsys.readouterr().out
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(out) == handle.metadata() == metadata
    assert out == json.dumps(metadata, indent=4, sort_keys=True) + "\n"


def test_foreign_header_unknown_dtype_and_values(tmp_path, capsys):
    path = tmp_path / "other_tool.safetensors"
    header = {
        "__metadata__": {"modelspec.title": "x", "steps": 1200, "nested": {"a": [1, 2]}},
        "w": {"dtype": "F4_E9M9", "shape": [4], "data_offsets": [0, 2]},
    }
    _raw_safetensors(path, header, b"\x00\x01")
    main(["--model", str(path)])
    assert json.loads(capsys.readouterr().out) == header["__metadata__"]


def test_file_without_metadata_prints_empty_object(tmp_path, tiny_model_files_v1, capsys):
    main(["--model", str(tiny_model_files_v1["safetensors"])])  # our checkpoints carry no metadata
    assert json.loads(capsys.readouterr().out) == {}


@pytest.mark.parametrize("content", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00[1, 2", b"\x03\x00\x00\x00\x00\x00\x00\x00[1]"])
def test_not_safetensors(tmp_path, capsys, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    assert run_main(main, ["--model", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not a safetensors file" in err and err.count("\n") == 1


def test_missing_and_pickle_files(tmp_path, capsys):
    assert run_main(main, ["--model", str(tmp_path / "nope.safetensors")]) == 1
    assert "file not found" in capsys.readouterr().err
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert run_main(main, ["--model", str(ckpt)]) == 1
    assert "only .safetensors files carry metadata" in capsys.readouterr().err
