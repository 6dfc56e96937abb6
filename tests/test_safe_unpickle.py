"""The restricted unpickler: real checkpoint contents load, pickled code never runs."""
from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from library.errors import UserError
from library.safe_unpickle import is_placeholder, load_pickle_checkpoint

LIGHTNING_MODULES = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")


@pytest.fixture
def lightning_checkpoint_class(monkeypatch):
    """A stand-in `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`, importable only
    while the checkpoint is written (pickle stores the class by its import path)."""
    modules = {name: types.ModuleType(name) for name in LIGHTNING_MODULES}

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = LIGHTNING_MODULES[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    modules[LIGHTNING_MODULES[-1]].ModelCheckpoint = ModelCheckpoint
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield ModelCheckpoint
    for name in modules:
        monkeypatch.delitem(sys.modules, name, raising=False)


def _fake_real_checkpoint(lightning_class):
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {lightning_class: {"monitor": None, "best_model_score": torch.tensor(0.5), "best_model_path": ""}},
        "state_dict": OrderedDict(
            [
                ("model.diffusion_model.out.2.bias", torch.arange(4, dtype=torch.float32)),
                ("betas", torch.linspace(0.1, 0.2, 10, dtype=torch.float64)),
                ("model_ema.num_updates", torch.tensor(7, dtype=torch.int32)),
            ]
        ),
        "numpy_scalar": np.float64(1.5),
        "numpy_array": np.arange(3, dtype=np.int64),
    }


def _drop_lightning_modules():
    for name in LIGHTNING_MODULES:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("zip_format", [True, False])
def test_real_checkpoint_with_lightning_callback_loads(zip_format, tmp_path, lightning_checkpoint_class):
    path = tmp_path / "real.ckpt"
    torch.save(_fake_real_checkpoint(lightning_checkpoint_class), path, _use_new_zipfile_serialization=zip_format)
    _drop_lightning_modules()  # loading must not need pytorch-lightning
    loaded = load_pickle_checkpoint(path)
    assert loaded["epoch"] == 6 and loaded["global_step"] == 470000
    assert list(loaded["state_dict"]) == ["model.diffusion_model.out.2.bias", "betas", "model_ema.num_updates"]
    assert torch.equal(loaded["state_dict"]["model.diffusion_model.out.2.bias"], torch.arange(4.0))
    assert loaded["state_dict"]["betas"].dtype == torch.float64
    (callback_key,) = loaded["callbacks"]
    assert is_placeholder(callback_key) and callback_key.__name__ == "ModelCheckpoint"
    assert loaded["callbacks"][callback_key]["best_model_score"].item() == 0.5
    assert loaded["numpy_scalar"] == 1.5 and loaded["numpy_array"].tolist() == [0, 1, 2]


class _CreatesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo x > {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.eval, (f"open({self.marker!r}, 'w')",))


class _Subprocess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.call, ([sys.executable, "-c", f"open({self.marker!r}, 'w')"],))


@pytest.mark.parametrize("payload", [_CreatesFile, _RunsShell, _Eval, _Subprocess])
@pytest.mark.parametrize("container", ["zip", "legacy", "raw_pickle"])
def test_malicious_pickle_never_runs(payload, container, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"w": torch.zeros(2)}, "payload": payload(marker)}
    if container == "raw_pickle":
        with open(path, "wb") as stream:
            pickle.dump(obj, stream, protocol=2)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(UserError) as info:
        load_pickle_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert not marker.exists()
    if container != "raw_pickle":
        names = {_CreatesFile: "open", _RunsShell: "system", _Eval: "eval", _Subprocess: ".call"}  # protocol 2 may spell it commands.call
        assert names[payload] in message


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pickle_checkpoint(tmp_path / "none.ckpt")
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(UserError, match="damaged.ckpt"):
        load_pickle_checkpoint(damaged)
    assert torch.equal(load_pickle_checkpoint(good, mmap=False)["state_dict"]["w"], torch.ones(1000))


def test_sd_checkpoint_with_lightning_callback_loads_and_saves(tmp_path, lightning_checkpoint_class, tiny_model_files_v1):
    from library.model_util import LdmFile, load_target_model, save_stable_diffusion_checkpoint

    with LdmFile(tiny_model_files_v1["safetensors"]) as ldm:
        weights = {k: ldm.get(k).clone() for k in ldm.keys()}
    checkpoint = _fake_real_checkpoint(lightning_checkpoint_class)
    checkpoint["state_dict"] = {**weights, "betas": torch.linspace(0.1, 0.2, 1000)}
    checkpoint["optimizer_states"] = [{"state": {}}]
    path = tmp_path / "sd-v1-x.ckpt"
    torch.save(checkpoint, path)
    _drop_lightning_modules()
    models = load_target_model(path)
    assert models.ldm_metadata == {"epoch": 6, "global_step": 470000}
    out = save_stable_diffusion_checkpoint(
        False, tmp_path / "out.ckpt", models.text_encoder, models.unet, models.vae, source_path=path, epoch=1, global_step=5
    )
    saved = load_pickle_checkpoint(out)
    assert set(saved) == {"state_dict", "epoch", "global_step"}
    assert saved["epoch"] == 7 and saved["global_step"] == 470005
    assert set(saved["state_dict"]) == set(checkpoint["state_dict"])
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in checkpoint["state_dict"].items())


def test_parameter_dict_becomes_inert_module_state(tmp_path):
    """nn.ParameterDict (old textual-inversion files) loads as its state only; no module code."""
    from library.safe_unpickle import ModuleState

    path = tmp_path / "pd.pt"
    torch.save({"p": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(2, 3))})}, path)
    value = load_pickle_checkpoint(path)["p"]
    assert isinstance(value, ModuleState) and not isinstance(value, torch.nn.Module)
    assert torch.equal(value._parameters["*"], torch.ones(2, 3))
