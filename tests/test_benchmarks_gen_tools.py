"""The generation, latent-caching and tools benchmark suites run end to end in --quick mode
(small model, few steps) and report real numbers: finite positive times, peak RSS, JSON rows."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("generation", "latents", "tools")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--threads", "1", "--suites", ",".join(SUITES),
         "--out_dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    document["stdout"] = result.stdout
    document["out_dir"] = out
    return document


def rows_of(document: dict, suite: str) -> dict[str, dict]:
    return {row["name"]: row for row in document["rows"] if row["suite"] == suite}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_json_and_table(quick_results):
    assert quick_results["command"].startswith("python3 benchmarks/run.py --quick")
    assert {row["suite"] for row in quick_results["rows"]} == set(SUITES)
    table = quick_results["stdout"]
    for row in quick_results["rows"]:
        assert f"| {row['suite']} | {row['name']} |" in table


def test_generation_rows(quick_results):
    rows = rows_of(quick_results, "generation")
    for phase in ("none", "lora", "pre_calc", "merge"):
        side = rows[f"side by side, {phase}"]["metrics"]
        assert positive(side["s_per_image"]) and positive(side["diffusers_s_per_image"])
        assert side["ratio_vs_diffusers"] == pytest.approx(side["s_per_image"] / side["diffusers_s_per_image"])
    # our generator and diffusers made the same picture (8-bit rounding apart)
    assert rows["side by side, none"]["metrics"]["max_pixel_diff"] <= 2 / 255
    script = rows["gen_img_diffusers.py, lora"]["metrics"]  # quick mode: the LoRA run only
    assert positive(script["wall_s"]) and script["peak_rss_mib"] > 100  # Python + torch alone take more
    assert script["rss_vs_sd_scripts"] == pytest.approx(script["peak_rss_mib"] / 8632)
    sliced = rows["decode 128², slices 4"]["metrics"]
    assert positive(sliced["decode_s"]) and positive(sliced["peak_rss_mib"]) and sliced["decode_extra_mib"] >= 0


def test_latent_rows(quick_results):
    rows = rows_of(quick_results, "latents")
    for batch in (1, 4):
        metrics = rows[f"cache 64², vae_batch_size {batch}"]["metrics"]
        assert positive(metrics["images_per_s"]) and positive(metrics["peak_rss_mib"])
        assert 0 < metrics["image_load_share"] < 1
    check = rows["re-check 40 npz"]["metrics"]
    assert check["encoded"] == 0 and check["stale_reencoded"] == 1
    assert positive(check["check_s"])
    assert len(list((quick_results["out_dir"] / "latents").rglob("*.npz"))) == 40


def test_tools_rows(quick_results):
    rows = rows_of(quick_results, "tools")
    for name in ("merge_lora.py into the model", "extract_lora_from_models.py"):
        metrics = rows[name]["metrics"]
        assert positive(metrics["wall_s"]) and metrics["peak_rss_mib"] > 100
        assert metrics["margin_mib"] == pytest.approx(metrics["model_mib"] + 1536 - metrics["peak_rss_mib"])
    assert not (quick_results["out_dir"] / "tools" / "merged.safetensors").exists()


def test_random_lora_loads_into_its_model(tmp_path):
    """The benchmark LoRA is a strict fit for the model it was made for, with non-zero up weights."""
    from safetensors.torch import load_file

    from benchmarks.common import write_random_lora, write_random_sd_model
    from library.model_util import load_target_model
    from networks import lora

    model = write_random_sd_model(tmp_path / "m.safetensors", quick=True)
    file = write_random_lora(model, tmp_path / "l.safetensors", dim=4, alpha=2.0, conv_dim=2)
    weights = load_file(str(file))
    ups = [t for k, t in weights.items() if k.endswith("lora_up.weight")]
    assert ups and all(t.abs().sum() > 0 for t in ups)
    assert any(t.ndim == 4 and t.shape[-1] == 1 and k.startswith("lora_unet_down_blocks_0_resnets")
               for k, t in weights.items() if k.endswith("lora_up.weight"))
    models = load_target_model(model)
    network, _ = lora.create_network_from_weights(1.0, str(file), models.vae, models.text_encoder, models.unet)
    info = network.load_state_dict(weights, strict=False)
    assert not info.missing_keys and not info.unexpected_keys
    alphas = {float(t) for k, t in weights.items() if k.endswith(".alpha")}
    assert alphas == {2.0, 1.0}  # linear layers, 3x3 convs (conv_alpha default)


def test_cache_check_reads_npz_headers(tmp_path):
    """The re-check (latent_cache._npz_shape, header only since the benchmark) still tells a good
    cache from a damaged one: compressed files and version-2 headers read, wrong keys, truncated
    archives and members shorter than their header refused."""
    import io
    import zipfile

    import numpy as np
    import torch

    from library.latent_cache import is_disk_cache_valid, save_latents_npz

    good = tmp_path / "good.npz"
    save_latents_npz(good, torch.zeros(4, 8, 6))
    assert is_disk_cache_valid(str(good), (48, 64), None)
    assert not is_disk_cache_valid(str(good), (64, 64), None)  # another bucket
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, np.ones((4, 8, 6), np.float32))
    assert is_disk_cache_valid(str(compressed), (48, 64), None)
    version2 = io.BytesIO()
    np.lib.format.write_array(version2, np.zeros((4, 8, 6), np.float32), version=(2, 0))
    with zipfile.ZipFile(tmp_path / "v2.npz", "w") as archive:
        archive.writestr("arr_0.npy", version2.getvalue())
    assert is_disk_cache_valid(str(tmp_path / "v2.npz"), (48, 64), None)
    other_key = tmp_path / "other.npz"
    np.savez(other_key, latents=np.zeros((4, 8, 6), np.float32))
    assert not is_disk_cache_valid(str(other_key), (48, 64), None)
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:-40])
    assert not is_disk_cache_valid(str(tmp_path / "truncated.npz"), (48, 64), None)
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.writestr("arr_0.npy", version2.getvalue()[:-8])
    assert not is_disk_cache_valid(str(tmp_path / "short.npz"), (48, 64), None)
