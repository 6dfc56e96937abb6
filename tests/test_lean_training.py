"""The LoRA run's memory and end-of-run optimisations (benchmarks/RESULTS.md, "LoRA run
optimisations"): the VAE is freed after latent caching, the model hash runs in the background,
and benchmarks/lora_profile.py works."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
from library import model_hash, model_util, train_core


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    return {"model": th.make_tiny_model(root), "img": th.make_image_folder(root, count=2, repeats=1), "root": root}


def _run(workspace, out, *extra):
    seen = {}

    def at_start(ctx):
        seen["vae_device"] = next(ctx.models.vae.parameters()).device.type
        seen["unet_device"] = next(ctx.models.unet.parameters()).device.type
        seen["scaling_factor"] = ctx.models.vae.config.scaling_factor

    def at_end(ctx):
        seen["network"] = th.network_state(ctx)

    argv = th.base_argv(workspace["model"], workspace["img"], out, "--max_train_steps", "3", "--train_batch_size", "1", *extra)
    result = th.run_train(argv, train_core.TrainHooks(on_train_start=at_start, on_train_end=at_end))
    return result, seen


def test_cached_latents_free_the_vae_and_train_identically(workspace, tmp_path):
    lean, lean_seen = _run(workspace, tmp_path / "lean", "--cache_latents")
    # sample prompts keep the VAE (it decodes the samples); no sample falls inside these 3 steps
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog --w 64 --h 64 --s 2\n", encoding="utf-8")
    kept, kept_seen = _run(
        workspace, tmp_path / "kept", "--cache_latents", "--sample_prompts", str(prompts), "--sample_every_n_steps", "1000"
    )
    assert lean_seen["vae_device"] == "meta" and lean_seen["unet_device"] == "cpu"
    assert kept_seen["vae_device"] == "cpu"
    assert lean_seen["scaling_factor"] == kept_seen["scaling_factor"] == pytest.approx(0.18215)
    # same latents, same order of randomness: the runs are bit-identical
    assert lean.step_losses == kept.step_losses
    assert lean_seen["network"].keys() == kept_seen["network"].keys()
    assert all(torch.equal(lean_seen["network"][k], kept_seen["network"][k]) for k in lean_seen["network"])


def test_without_cached_latents_the_vae_stays(workspace, tmp_path):
    _, seen = _run(workspace, tmp_path / "out")
    assert seen["vae_device"] == "cpu"


@pytest.mark.parametrize("as_folder", [False, True])
def test_use_vae_first_sees_the_loaded_vae_before_the_other_models(workspace, tmp_path, as_folder):
    source = workspace["model"]
    if as_folder:
        plain = model_util.load_target_model(source)
        source = model_util.save_diffusers_checkpoint(
            False, tmp_path / "folder", plain.text_encoder, plain.unet, plain.vae, use_safetensors=True
        )
    reference = model_util.load_target_model(source)
    seen = {}

    def use(vae):
        seen["vae"] = {k: v.clone() for k, v in vae.state_dict().items()}

    models = model_util.load_target_model(source, use_vae_first=use)
    expected = reference.vae.state_dict()
    assert seen["vae"].keys() == expected.keys()
    assert all(torch.equal(seen["vae"][k], expected[k]) for k in expected)
    assert all(p.is_meta for p in models.vae.parameters())
    assert models.vae.config.scaling_factor == reference.vae.config.scaling_factor
    for mine, theirs in ((models.unet, reference.unet), (models.text_encoder, reference.text_encoder)):
        ours = mine.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items())


def test_prefetched_sha256_matches_and_follows_file_changes(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 9000)
    plain = model_hash.calculate_sha256(path)
    model_hash.prefetch_sha256(path)
    assert model_hash.calculate_sha256(path) == plain
    path.write_bytes(b"changed" * 1000)  # another size: the prefetched result no longer applies
    import hashlib

    assert model_hash.calculate_sha256(path) == hashlib.sha256(b"changed" * 1000).hexdigest()
    model_hash.prefetch_sha256(tmp_path / "missing.bin")  # nothing to hash: no error


def test_no_metadata_reads_no_model_hash(workspace, tmp_path, monkeypatch):
    calls = []
    real = model_hash.calculate_sha256
    monkeypatch.setattr(model_hash, "calculate_sha256", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(model_hash, "prefetch_sha256", lambda p: calls.append(p))
    _run(workspace, tmp_path / "bare", "--no_metadata")
    assert calls == []
    _run(workspace, tmp_path / "full")
    assert calls  # the default run hashes the model for ss_new_sd_model_hash
    with safe_open(str(tmp_path / "full" / "lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_new_sd_model_hash"] == real(workspace["model"])
    assert metadata["ss_sd_model_hash"] == model_hash.model_hash(workspace["model"])


GUIDE = th.REPO_ROOT / "docs" / "lora_profile.md"


def _guide_example() -> list[str]:
    line = next(l for l in GUIDE.read_text(encoding="utf-8").splitlines() if l.startswith("python3 benchmarks/lora_profile.py --quick"))
    return line.split()[1:]


def test_every_lora_profile_flag_is_in_its_guide():
    from benchmarks import lora_profile

    text = GUIDE.read_text(encoding="utf-8")
    flags = [o for a in lora_profile.setup_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert len(flags) == 13
    for flag in flags:
        assert f"`{flag}`" in text, flag


def test_lora_profile_quick_reports_stages_parts_and_floor(tmp_path):
    """The guide's worked example, run as written (into a temporary --out_dir)."""
    out = tmp_path / "profile"
    argv = _guide_example()
    argv[argv.index("--out_dir") + 1] = str(out)
    done = subprocess.run(
        [sys.executable, *argv], cwd=th.REPO_ROOT, capture_output=True, text=True, encoding="utf-8", timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "profile.json").read_text(encoding="utf-8"))
    names = [stage["name"] for stage in report["stages"]]
    assert names[0].startswith("set-up") and names[-1].startswith("training loop")
    assert all(stage["peak_mib"] >= stage["rss_end_mib"] > 0 for stage in report["stages"])
    parts = report["summary"]["step_parts_median_s"]
    assert parts["step"] > 0 and parts["backward"] > 0 and parts["data + forward + loss"] > 0
    assert len(report["floor_both"]) == len(report["floor_unet"]) == 4
    assert report["summary"]["floor_te_unet_s"] > report["summary"]["floor_unet_s"] > 0
    assert 0.2 < report["summary"]["step_over_floor"] < 20
    assert "final save" in report["after_last_step"]
    table = report["op_table"]  # the LoRA step's operators beside the floor's
    assert table[0]["op"] == "(all self CPU time in the range)" and table[0]["LoRA step"] > 0 and table[0]["floor U-Net + TE"] > 0
    assert len(table) > 5 and any(row["op"].startswith("aten::") for row in table[1:])
    points = [point["point"] for point in report["rss_trace"]]
    for name in ("after _use_then_release", "after _unet_from_ldm", "after _text_encoder_from_ldm",
                 "after assign_weights(UNet)", "network built and applied", "step 4 done", "training done"):
        assert name in points, name
    assert points.index("after _use_then_release") < points.index("before _unet_from_ldm")  # the VAE goes first
    assert all(point["RssAnon"] > 0 and point["VmHWM"] >= point["VmRSS"] > 0 for point in report["rss_trace"])
    assert "LoRA step / floor" in done.stdout
    assert (out / "output" / "lora.safetensors").is_file()


def test_adamw_foreach_default_trains_bit_identically_to_the_loop(workspace, tmp_path):
    from library import optimizers

    default, default_seen = _run(workspace, tmp_path / "foreach", "--cache_latents")
    loop, loop_seen = _run(workspace, tmp_path / "loop", "--cache_latents", "--optimizer_args", "foreach=False")
    assert default.step_losses == loop.step_losses
    assert all(torch.equal(default_seen["network"][k], loop_seen["network"][k]) for k in loop_seen["network"])
    args = th.parse(th.base_argv(workspace["model"], workspace["img"], tmp_path / "x"))
    name, shown, optimizer = optimizers.get_optimizer(args, [torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.defaults["foreach"] is True and shown == ""  # ss_optimizer stays "torch.optim.adamw.AdamW"


def _unet_only_run(workspace, out, steps, *extra):
    """A --network_train_unet_only run counting the text-encoder forwards from the first step on."""
    seen = {"forwards_in_loop": 0}

    def at_start(ctx):
        def count(*_):
            seen["forwards_in_loop"] += 1

        seen["te_device"] = next(ctx.models.text_encoder.parameters()).device.type
        seen["hook"] = ctx.models.text_encoder.register_forward_hook(count)
        seen["cached"] = len(ctx.accelerator.unwrap_model(ctx.step_module)._encode_text)

    def at_end(ctx):
        seen["hook"].remove()
        seen["network"] = th.network_state(ctx)

    argv = th.base_argv(workspace["model"], workspace["img"], out, "--max_train_steps", str(steps), "--train_batch_size", "1",
                        "--cache_latents", "--network_train_unet_only", *extra)
    result = th.run_train(argv, train_core.TrainHooks(on_train_start=at_start, on_train_end=at_end))
    return result, seen


def test_unet_only_frees_the_text_encoder_once_every_caption_is_cached(workspace, tmp_path, monkeypatch):
    from library.caption_states import TextEmbeddingCache

    freed, freed_seen = _unet_only_run(workspace, tmp_path / "freed", 3)
    # sample prompts keep the encoder (samples encode their prompts); no sample falls inside 3 steps
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog --w 64 --h 64 --s 2\n", encoding="utf-8")
    kept, kept_seen = _unet_only_run(workspace, tmp_path / "kept", 3, "--sample_prompts", str(prompts),
                                     "--sample_every_n_steps", "1000")
    assert freed_seen["te_device"] == "meta" and kept_seen["te_device"] == "cpu"
    assert freed_seen["cached"] == kept_seen["cached"] == 2 and freed_seen["forwards_in_loop"] == 0
    assert freed.step_losses == kept.step_losses
    assert all(torch.equal(freed_seen["network"][k], kept_seen["network"][k]) for k in kept_seen["network"])
    # a cache at its size limit may meet new captions later: the encoder stays
    monkeypatch.setattr(TextEmbeddingCache, "max_entries", property(lambda self: 2))
    _, capped_seen = _unet_only_run(workspace, tmp_path / "capped", 3)
    assert capped_seen["te_device"] == "cpu"


def test_sealed_text_cache_names_a_missing_caption():
    from library.caption_states import TextEmbeddingCache

    cache = TextEmbeddingCache(lambda captions: torch.zeros(len(captions), 4, 8), torch.device("cpu"))
    assert cache.fill(["a dog"]) == 1
    cache.seal()
    assert cache(["a dog"]).shape == (1, 4, 8)
    with pytest.raises(RuntimeError, match="'a cat'"):
        cache(["a cat"])


def test_unet_only_text_encoder_outputs_are_cached_before_the_loop(workspace, tmp_path, monkeypatch):
    # 2 images with 2 captions, 3 steps: the captions are encoded before the first step
    ahead, ahead_seen = _unet_only_run(workspace, tmp_path / "ahead", 3)
    assert ahead_seen["cached"] == 2 and ahead_seen["forwards_in_loop"] == 0
    # only the captions of the batches the run shows: 1 step shows 1 image
    _, one_seen = _unet_only_run(workspace, tmp_path / "one", 1)
    assert one_seen["cached"] == 1 and one_seen["forwards_in_loop"] == 0
    # the lazy cache (each new caption encoded in the step that first shows it) trains the same bits
    monkeypatch.setattr(train_core._Runner, "_fill_text_cache", lambda self: None)
    lazy, lazy_seen = _unet_only_run(workspace, tmp_path / "lazy", 3)
    assert lazy_seen["cached"] == 0 and lazy_seen["forwards_in_loop"] == 2
    assert ahead.step_losses == lazy.step_losses
    assert ahead_seen["network"].keys() == lazy_seen["network"].keys()
    assert all(torch.equal(ahead_seen["network"][k], lazy_seen["network"][k]) for k in lazy_seen["network"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_token_embedding_is_mapped_from_the_file_not_copied(workspace):
    import hashlib

    from library import sd_config

    path = workspace["model"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert th.mapping_of(model_util.load_target_model(path).text_encoder.get_input_embeddings().weight) != str(path.resolve())  # opt-in
    models = model_util.load_target_model(path, map_token_embedding=True)  # the file is closed when this returns
    embedding = models.text_encoder.get_input_embeddings().weight
    assert th.mapping_of(embedding) == str(path.resolve())
    assert th.mapping_of(models.unet.conv_in.weight) != str(path.resolve())  # the rest is read into memory
    others = [t for n, t in models.text_encoder.named_parameters() if "token_embedding" not in n]
    assert others and all(th.mapping_of(t) != str(path.resolve()) for t in others)
    with model_util.LdmFile(path) as ldm:
        key = f"{sd_config.TE_V1_PREFIX}text_model.embeddings.token_embedding.weight"
        assert torch.equal(embedding, ldm.get(key))
    with torch.no_grad():
        embedding[0] += 1.0  # copy-on-write: a private page changes, never the file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_lora_run_maps_the_token_embedding_and_trains_identically(workspace, tmp_path, monkeypatch):
    import train_network

    def run(out):
        seen = {}

        def at_start(ctx):
            seen["mapped"] = th.mapping_of(ctx.models.text_encoder.get_input_embeddings().weight)

        def at_end(ctx):
            seen["network"] = th.network_state(ctx)

        argv = th.base_argv(workspace["model"], workspace["img"], out, "--max_train_steps", "3", "--cache_latents")
        return th.run_train(argv, train_core.TrainHooks(on_train_start=at_start, on_train_end=at_end)), seen

    mapped, mapped_seen = run(tmp_path / "mapped")
    monkeypatch.setattr(train_network.NetworkTrainingMethod, "maps_token_embedding", False)
    read, read_seen = run(tmp_path / "read")
    assert mapped_seen["mapped"] == str(workspace["model"].resolve()) != read_seen["mapped"]
    assert mapped.step_losses == read.step_losses  # LoRA on the text encoder too: rows are only looked up
    assert all(torch.equal(mapped_seen["network"][k], read_seen["network"][k]) for k in read_seen["network"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_frozen_weights_are_mapped_from_the_file_not_copied(workspace):
    import hashlib

    from library import sd_config

    path = workspace["model"]
    file = str(path.resolve())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    read = model_util.load_target_model(path, map_token_embedding=True)
    assert all(th.mapping_of(t) != file for t in read.unet.parameters())  # opt-in
    models = model_util.load_target_model(path, map_frozen_weights="all")  # the file is closed when this returns
    embedding = models.text_encoder.get_input_embeddings().weight
    unet_params = dict(models.unet.named_parameters())
    te_params = dict(models.text_encoder.named_parameters())
    # every U-Net / text-encoder tensor stored whole is a view of the file; the tiny model's
    # attention q/k/v are not fused in the file, so that is all of them
    assert all(th.mapping_of(t) == file for t in [*unet_params.values(), *te_params.values()])
    assert all(th.mapping_of(t) != file for t in models.vae.parameters())  # the VAE is read
    read_params = dict([*read.unet.named_parameters(), *read.text_encoder.named_parameters()])
    for name, tensor in [*unet_params.items(), *te_params.items()]:  # the same values as the read models
        assert torch.equal(tensor, read_params[name]), name
    with model_util.LdmFile(path) as ldm:
        key = f"{sd_config.TE_V1_PREFIX}text_model.embeddings.token_embedding.weight"
        assert torch.equal(embedding, ldm.get(key))
    with torch.no_grad():
        embedding[0] += 1.0  # copy-on-write: a private page changes, never the file
        models.unet.conv_in.weight.mul_(2.0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    # a tensor that must be cast is read, not mapped: the mapping would keep the source pages resident
    half = model_util.load_target_model(path, dtype=torch.float16, map_frozen_weights="all")
    assert all(th.mapping_of(t) != file for t in [*half.unet.parameters(), *half.text_encoder.parameters()])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_mmap_frozen_weights_trains_the_same_lora_to_rounding(workspace, tmp_path):
    def run(out, *extra):
        seen = {}

        def at_start(ctx):
            # a vector-product layer: read by default (weight_mapping), mapped by the flag
            seen["mapped"] = th.mapping_of(ctx.models.unet.time_embedding.linear_1.weight)

        def at_end(ctx):
            seen["network"] = th.network_state(ctx)

        # one SGD step: the learnt weights are proportional to the gradient (AdamW scales a
        # near-zero, noise-level gradient up to ~lr, and more steps amplify the rounding unevenly
        # with the data: up to 12 % relative after three steps, over tmp paths)
        argv = th.base_argv(workspace["model"], workspace["img"], out, "--max_train_steps", "1", "--cache_latents",
                            "--optimizer_type", "SGDNesterov", "--learning_rate", "0.1", *extra)
        return th.run_train(argv, train_core.TrainHooks(on_train_start=at_start, on_train_end=at_end)), seen

    mapped, mapped_seen = run(tmp_path / "mapped", "--mmap_frozen_weights")
    read, read_seen = run(tmp_path / "read")
    file = str(workspace["model"].resolve())
    assert mapped_seen["mapped"] == file != read_seen["mapped"]
    # the same training up to float rounding (vector kernels read the mapped weights unaligned)
    assert mapped.step_losses == pytest.approx(read.step_losses, rel=1e-4)
    learnt = sorted(k for k in read_seen["network"] if "lora_up" in k)
    mapped_up = torch.cat([mapped_seen["network"][k].flatten() for k in learnt])
    read_up = torch.cat([read_seen["network"][k].flatten() for k in learnt])
    assert torch.linalg.norm(read_up) > 0  # the up weights did learn
    # measured 1e-6 to 5e-4 relative over tmp paths (the image keys seed the latents); the exact
    # default mapping is compared bit for bit in test_weight_mapping.py
    assert torch.linalg.norm(mapped_up - read_up) <= 1e-2 * torch.linalg.norm(read_up)
    assert (tmp_path / "mapped" / "lora.safetensors").is_file()
