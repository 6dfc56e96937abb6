"""library.model_hash: sshs_* hashes of saved LoRA files and the A1111 file hashes."""
from __future__ import annotations

import hashlib
import io
import json
import struct

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from library import model_hash
from library.errors import UserError
from networks import lora

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def data_section_sha256(raw: bytes) -> str:
    """Independent reading of the safetensors layout: 8-byte LE header length, header, data."""
    (header_length,) = struct.unpack("<Q", raw[:8])
    json.loads(raw[8 : 8 + header_length])  # the header really is JSON
    return hashlib.sha256(raw[8 + header_length :]).hexdigest()


def test_saved_lora_file_hashes(tiny_models_v1, tmp_path):
    unet, vae, te = tiny_models_v1
    network = lora.create_network(1.0, 4, 1.0, vae, te, unet)
    path = tmp_path / "h.safetensors"
    user_metadata = {"ss_network_dim": "4", "ss_output_name": "h", "note": "not an ss_ key"}
    network.save_weights(path, None, user_metadata)
    raw = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["sshs_model_hash"] == data_section_sha256(raw)
    assert "sshs_model_hash" not in user_metadata  # caller's dict untouched
    # the file is < 1 MiB, so the legacy hash is that of empty input
    assert len(raw) < model_hash.LEGACY_HASH_OFFSET
    assert metadata["sshs_legacy_hash"] == EMPTY_SHA256[:8]


def test_legacy_hash_uses_only_ss_metadata_of_the_serialisation():
    # big enough that the 64 KiB window at 1 MiB holds header and data bytes
    tensors = {"b": torch.arange(400_000, dtype=torch.float32), "a": torch.ones(3, dtype=torch.float16)}
    metadata = {"ss_a": "1", "other": "x" * 100}
    model, legacy = model_hash.precalculate_safetensors_hashes(tensors, metadata)
    ss_only = safetensors.torch.save(tensors, {"ss_a": "1"})
    assert legacy == hashlib.sha256(ss_only[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert model == data_section_sha256(ss_only)
    # non-ss metadata does not matter; ss metadata changes only the legacy hash
    assert model_hash.precalculate_safetensors_hashes(tensors, {"ss_a": "1"}) == (model, legacy)
    model2, legacy2 = model_hash.precalculate_safetensors_hashes(tensors, {"ss_a": "2" * 50})
    assert model2 == model and legacy2 != legacy
    # stream helpers agree with the byte-level definition
    stream = io.BytesIO(ss_only)
    assert model_hash.addnet_hash_safetensors(stream) == model
    assert model_hash.addnet_hash_legacy(stream) == legacy


def test_file_hashes(tmp_path):
    data = bytes(range(256)) * 8192  # 2 MiB
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    assert model_hash.model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert model_hash.calculate_sha256(path) == hashlib.sha256(data).hexdigest()
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert model_hash.model_hash(small) == EMPTY_SHA256[:8]
    with pytest.raises(UserError, match="missing.ckpt"):
        model_hash.calculate_sha256(tmp_path / "missing.ckpt")
