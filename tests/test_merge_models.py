"""tools/merge_models.py: the weighted sum of models in any input format, checked weight by
weight after loading the result here and in diffusers; --unet_only; bad inputs; and a memory
bound showing the inputs are streamed (peak RSS well below holding all models)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.cli import run_main
from library.model_util import LdmFile, load_target_model
from library.tiny_sd import build_tiny_models, write_tiny_model
from tools.merge_models import main



@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """Tiny models of seeds 1 and 2 as .ckpt / Diffusers folder, v1 and v2."""
    root = tmp_path_factory.mktemp("merge_inputs")
    return {
        (v2, seed): write_tiny_model(root / f"v{2 if v2 else 1}_s{seed}", v2=v2, formats=("ckpt", "diffusers"), seed=seed)
        for v2 in (False, True)
        for seed in (1, 2)
    }


def _expected(parts_by_seed: dict[int, float], v2: bool) -> list[dict[str, torch.Tensor]]:
    """Per model part (unet, vae, text encoder): the weighted sum of the tiny models' state dicts."""
    models = {seed: build_tiny_models(v2=v2, seed=seed) for seed in parts_by_seed}
    sums = []
    for index in range(3):
        states = {seed: m[index].state_dict() for seed, m in models.items()}
        first = next(iter(states.values()))
        sums.append({
            key: sum(states[seed][key].float() * ratio for seed, ratio in parts_by_seed.items())
            if first[key].is_floating_point() else first[key]
            for key in first
        })
    return sums


def _assert_parts(loaded, expected, atol=2e-6):
    for model, want in zip((loaded.unet, loaded.vae, loaded.text_encoder), expected):
        got = model.state_dict()
        for key, value in want.items():
            if key in got:
                assert torch.allclose(got[key].float(), value, atol=atol, rtol=0), key


def test_three_formats_weighted_sum_loads_here_and_in_diffusers(tmp_path, tiny_model_files_v1, other_models):
    from diffusers import StableDiffusionPipeline

    out = main([
        "--models", str(tiny_model_files_v1["safetensors"]), str(other_models[(False, 1)]["ckpt"]),
        str(other_models[(False, 2)]["diffusers"]),
        "--ratios", "0.5", "0.3", "0.2", "--output", str(tmp_path / "merged"),
    ])
    assert out == tmp_path / "merged.safetensors"
    loaded = load_target_model(out)
    assert not loaded.v2
    _assert_parts(loaded, _expected({0: 0.5, 1: 0.3, 2: 0.2}, v2=False))
    # the source's extra keys (position ids) are carried; nothing is dropped
    with LdmFile(tiny_model_files_v1["safetensors"]) as source, LdmFile(out) as merged:
        assert set(merged.keys()) == set(source.keys())
    pipe = StableDiffusionPipeline.from_single_file(
        str(out), config=str(tiny_model_files_v1["diffusers"]), local_files_only=True, safety_checker=None
    )
    for name in ("unet", "vae", "text_encoder"):
        theirs, ours = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(theirs[k], ours[k]) for k in ours if k in theirs), name


def test_unet_only_keeps_first_text_encoder_and_vae(tmp_path, tiny_model_files_v1, other_models, tiny_models_v1):
    out = main([
        "--models", str(tiny_model_files_v1["ckpt"]), str(other_models[(False, 1)]["ckpt"]),
        "--unet_only", "--output", str(tmp_path / "unet_only.ckpt"),
    ])
    loaded = load_target_model(out)
    unet_sum = _expected({0: 0.5, 1: 0.5}, v2=False)[0]
    _assert_parts(loaded, [unet_sum, {}, {}])
    for ours, first in ((loaded.vae, tiny_models_v1[1]), (loaded.text_encoder, tiny_models_v1[2])):
        a, b = ours.state_dict(), first.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b if k in a)
    assert torch.load(out, weights_only=True)["global_step"] == 0


def test_v2_single_file_and_diffusers_folder(tmp_path, tiny_model_files_v2, other_models):
    out = main([
        "--models", str(other_models[(True, 1)]["diffusers"]), str(tiny_model_files_v2["safetensors"]),
        "--ratios", "0.25", "0.75", "--output", str(tmp_path / "v2.safetensors"), "--saving_precision", "fp16",
    ])
    state = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert "cond_stage_model.model.text_projection" in state  # OpenCLIP extras for other loaders
    loaded = load_target_model(out)
    assert loaded.v2
    _assert_parts(loaded, _expected({1: 0.25, 0: 0.75}, v2=True), atol=2e-3)  # fp16 rounding


def test_bad_inputs(tmp_path, tiny_model_files_v1, tiny_model_files_v2, capsys):
    a, b = str(tiny_model_files_v1["safetensors"]), str(tiny_model_files_v1["ckpt"])
    cases = [
        (["--models", a, b, "--ratios", "0.5", "--output", str(tmp_path / "o")], "--ratios has 1 values but --models has 2"),
        (["--models", a, str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "o")], "model not found"),
        (["--models", a, b, "--output", a], "is also one of --models"),
        (["--models", a, str(tiny_model_files_v2["safetensors"]), "--output", str(tmp_path / "o")], "is an SD 2.x model"),
        (["--models", a, "--output", str(tmp_path / "o")], "at least two models"),
    ]
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(lora))
    cases.append((["--models", a, str(lora), "--output", str(tmp_path / "o")], "not a Stable Diffusion checkpoint"))
    for argv, message in cases:
        assert run_main(main, argv) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]  # no partial output


def test_failed_merge_keeps_existing_output(tmp_path, tiny_model_files_v1, monkeypatch):
    import library.checkpoint_merge as merge

    output = tmp_path / "merged.safetensors"
    output.write_bytes(b"old merge")
    monkeypatch.setattr(merge, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        main(["--models", str(tiny_model_files_v1["safetensors"]), str(tiny_model_files_v1["ckpt"]), "--output", str(output)])
    assert output.read_bytes() == b"old merge" and sorted(tmp_path.iterdir()) == [output]


def test_peak_live_tensors_stream_the_inputs(tmp_path, tiny_model_files_v1, monkeypatch):
    """Three models: at any time the merge holds the merged tensors plus the current key's
    tensors, never an input model. Counted over the tensors the readers hand out (alive until
    garbage), which is what the code keeps - process RSS on a shared machine is too noisy."""
    import weakref

    from library import checkpoint_tensors

    base = load_file(str(tiny_model_files_v1["safetensors"]))
    chunk, count = 256 * 1024, 16  # 1 MiB float tensors
    files = []
    for seed in range(3):
        state = dict(base)
        for i in range(count):
            state[f"model.diffusion_model.extra_{i}.weight"] = torch.full((chunk,), float(seed + i))
        files.append(tmp_path / f"big_{seed}.safetensors")
        save_file(state, str(files[-1]))
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() * v.element_size() for v in state.values())
    del state
    live = {"now": 0, "peak": 0}
    real_get = checkpoint_tensors.SingleFileTensors.get

    def counting_get(self, key):
        tensor = real_get(self, key)
        size = tensor.numel() * tensor.element_size()
        live["now"] += size
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(tensor, lambda: live.__setitem__("now", live["now"] - size))
        return tensor

    monkeypatch.setattr(checkpoint_tensors.SingleFileTensors, "get", counting_get)
    main(["--models", *map(str, files), "--output", str(tmp_path / "merged.safetensors")])
    # the merged model (accumulated in the first model's tensors) plus two tensors of the current key
    assert 0.9 * model_bytes < live["peak"] <= model_bytes + 2 * largest, (live["peak"], model_bytes)
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert torch.allclose(merged["model.diffusion_model.extra_3.weight"], torch.full((chunk,), 4.0), atol=1e-6)
