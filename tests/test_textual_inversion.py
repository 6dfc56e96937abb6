"""train_textual_inversion.py end to end on the tiny SD v1 model: only the new rows train, the
loss falls, the files load in diffusers, flags and errors behave as in sd-scripts."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ti_helpers as tih
import train_helpers as th  # noqa: I001 - puts the repository root on sys.path first
import train_textual_inversion as tti
from library import embedding_files, sampling, train_core, train_util
from library.cli import run_main
from library.errors import UserError
from library.textual_inversion import OBJECT_TEMPLATES, STYLE_TEMPLATES


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti")
    return {"model": th.make_tiny_model(root), "img": tih.make_ti_images(root), "root": root}


def run(argv, hooks=None):
    return tti.train(train_util.parse_args_with_config(tti.setup_parser(), list(argv)), hooks)


def test_templates_are_the_paper_sets():
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    assert all(t.count("{}") == 1 for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)


def test_only_new_rows_change_and_loss_falls(workspace, tmp_path):
    seen = {}

    def start(ctx):
        seen["before"] = tih.snapshot(ctx)
        seen["loss_before"] = tih.fixed_loss(ctx)  # the batch's own captions: "a photo of mychar mychar1, ..."
        seen["plain_before"] = tih.fixed_loss(ctx, "a photo of a dog")

    def end(ctx):
        seen["after"] = tih.snapshot(ctx)
        seen["loss_after"] = tih.fixed_loss(ctx)
        seen["plain_after"] = tih.fixed_loss(ctx, "a photo of a dog")
        seen["ids"] = ctx.models.tokenizer.convert_tokens_to_ids(["mychar", "mychar1", "mychar2", "mychar3"])

    # batches of 4 (both images twice) and mid-range timesteps keep the gradient noise low enough
    # for 30 small steps to lower the loss every time
    img = tih.make_ti_images(tmp_path, count=2, repeats=4)
    argv = tih.ti_argv(
        workspace["model"], img, tmp_path / "out", "--num_vectors_per_token", "4", "--train_batch_size", "4",
        "--min_timestep", "100", "--max_timestep", "900",
        "--max_train_steps", "30", "--learning_rate", "0.02", "--save_model_as", "safetensors",
        "--metadata_author", "me",
    )
    result = run(argv, train_core.TrainHooks(on_train_start=start, on_train_end=end))
    assert len(result.step_losses) == 30 and all(np.isfinite(result.step_losses))
    # the random tiny U-Net barely listens to text, so at fixed noise and timesteps the loss falls
    # by only 1-3 % (the latents' noise depends on the image paths, so runs differ a little),
    # while a caption without the token keeps its exact loss
    assert seen["loss_after"] < 0.998 * seen["loss_before"], (seen["loss_before"], seen["loss_after"])
    assert seen["plain_after"] == seen["plain_before"]

    before, after = seen["before"], seen["after"]
    for key, value in before["unet"].items():  # the U-Net is bit-identical
        assert torch.equal(value, after["unet"][key]), key
    (embedding_key,) = [k for k in before["text_encoder"] if k.endswith("token_embedding.weight")]
    for key, value in before["text_encoder"].items():
        if key != embedding_key:
            assert torch.equal(value, after["text_encoder"][key]), key
    rows_before, rows_after = before["text_encoder"][embedding_key], after["text_encoder"][embedding_key]
    ids = seen["ids"]
    others = torch.ones(rows_before.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(rows_before[others], rows_after[others])  # AdamW weight decay did not leak
    assert (rows_before[ids] - rows_after[ids]).abs().min() > 0  # every new vector trained

    saved = load_file(str(tmp_path / "out" / "emb.safetensors"))
    assert list(saved) == ["emb_params"] and torch.equal(saved["emb_params"], rows_after[ids])
    with safe_open(str(tmp_path / "out" / "emb.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_token_string"] == "mychar" and metadata["ss_num_vectors_per_token"] == "4"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert metadata["modelspec.title"] == "emb" and metadata["modelspec.author"] == "me"
    assert metadata["modelspec.resolution"] == "64x64" and metadata["modelspec.prediction_type"] == "epsilon"


def test_init_word_initialises_every_vector(workspace, tmp_path):
    seen = {}

    def start(ctx):
        weight = ctx.models.text_encoder.get_input_embeddings().weight.detach()
        tok = ctx.models.tokenizer
        seen["new"] = weight[tok.convert_tokens_to_ids(["mychar", "mychar1", "mychar2"])].clone()
        seen["init"] = weight[tok("red dog", add_special_tokens=False).input_ids].clone()

    argv = tih.ti_argv(workspace["model"], workspace["img"], tmp_path / "out", "--num_vectors_per_token", "3",
                       "--init_word", "red dog", "--max_train_steps", "1")
    run(argv, train_core.TrainHooks(on_train_start=start))
    init = seen["init"]
    assert torch.equal(seen["new"], torch.stack([init[0], init[1], init[0]]))  # vector i from init token i mod 2


@pytest.mark.parametrize("suffix,precision", [("pt", "float"), ("safetensors", "fp16"), ("ckpt", "float")])
def test_saved_embedding_loads_in_diffusers_and_back(workspace, tmp_path, suffix, precision):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from library.model_util import load_target_model

    out = tmp_path / "out"
    argv = tih.ti_argv(workspace["model"], workspace["img"], out, "--num_vectors_per_token", "2",
                       "--save_model_as", suffix, "--save_precision", precision, "--max_train_steps", "1")
    result = run(argv)
    path = out / f"emb.{suffix}"
    assert result.final_model_path == path
    emb = embedding_files.read_embedding(path)
    assert emb.vectors.shape == (2, 32)
    assert emb.vectors.dtype == (torch.float16 if precision == "fp16" else torch.float32)
    if suffix != "safetensors":
        assert (emb.layout, emb.name, emb.step) == ("a1111", "mychar", 1)

    models = load_target_model(workspace["model"])
    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_textual_inversion(str(path), token="mychar")
    ids = pipe.tokenizer.convert_tokens_to_ids(["mychar", "mychar_1"])
    loaded = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    assert torch.equal(loaded, emb.vectors.float())


def test_weights_continue_from_a_file_and_wrong_files_fail(workspace, tmp_path):
    start_file = embedding_files.save_embedding(tmp_path / "start.pt", torch.full((2, 32), 0.25))
    seen = {}

    def start(ctx):
        tok = ctx.models.tokenizer
        seen["rows"] = ctx.models.text_encoder.get_input_embeddings().weight[tok.convert_tokens_to_ids(["mychar", "mychar1"])].detach().clone()

    base = ["--num_vectors_per_token", "2", "--max_train_steps", "1"]
    run(tih.ti_argv(workspace["model"], workspace["img"], tmp_path / "a", *base, "--weights", str(start_file)),
        train_core.TrainHooks(on_train_start=start))
    assert torch.equal(seen["rows"], torch.full((2, 32), 0.25))

    wrong_dim = embedding_files.save_embedding(tmp_path / "sd2.safetensors", torch.zeros(2, 1024))
    with pytest.raises(UserError, match=r"--weights .*sd2\.safetensors: embedding dimension 1024 does not match the text encoder's 32"):
        run(tih.ti_argv(workspace["model"], workspace["img"], tmp_path / "b", *base, "--weights", str(wrong_dim)))
    wrong_count = embedding_files.save_embedding(tmp_path / "three.safetensors", torch.zeros(3, 32))
    with pytest.raises(UserError, match="has 3 vectors but --num_vectors_per_token is 2"):
        run(tih.ti_argv(workspace["model"], workspace["img"], tmp_path / "c", *base, "--weights", str(wrong_count)))
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--token_string", "dog"], "already knows the token 'dog'"),
        (["--token_string", "Cat"], "already knows the token 'Cat'"),
        (["--init_word", "a red dog"], "--init_word 'a red dog' has 3 tokens, more than --num_vectors_per_token 1"),
        (["--use_object_template", "--use_style_template"], "cannot be used together"),
        (["--weights", "missing.pt"], "--weights: file not found"),
    ],
)
def test_bad_input_fails_before_loading_the_model(tmp_path, extra, message, capsys):
    img = tih.make_ti_images(tmp_path)
    missing_model = tmp_path / "not_there.safetensors"  # the check must come first: no model is needed
    code = run_main(tti.main, tih.ti_argv(missing_model, img, tmp_path / "out", *extra))
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_debug_dataset_shows_replaced_captions(tmp_path, caplog):
    img = tih.make_ti_images(tmp_path)
    missing_model = tmp_path / "not_there.safetensors"
    with caplog.at_level(logging.INFO, logger="library.datasets"):
        result = run(tih.ti_argv(missing_model, img, tmp_path / "out", "--num_vectors_per_token", "3", "--debug_dataset"))
    assert result.global_step == 0
    captions = [r.getMessage() for r in caplog.records if "caption:" in r.getMessage()]
    assert captions and all("a photo of mychar mychar1 mychar2, sks dog" in c for c in captions), captions

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="library.datasets"):
        run(tih.ti_argv(missing_model, img, tmp_path / "out", "--use_style_template", "--debug_dataset"))
    captions = [r.getMessage().split("caption: ")[1] for r in caplog.records if "caption:" in r.getMessage()]
    expected = {repr(t.format("mychar")) for t in STYLE_TEMPLATES}
    assert captions and set(captions) <= expected


def test_toml_config_run_with_samples(workspace, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("mychar on grass --w 64 --h 64 --d 5 --s 3 --l 2\n", encoding="utf-8")
    config = tmp_path / "ti.toml"
    config.write_text(
        "\n".join([
            f'pretrained_model_name_or_path = "{workspace["model"].as_posix()}"',
            f'train_data_dir = "{workspace["img"].as_posix()}"',
            'caption_extension = ".txt"', 'resolution = "64"', f'output_dir = "{(tmp_path / "out").as_posix()}"',
            'output_name = "emb"', 'token_string = "mychar"', "num_vectors_per_token = 2", 'init_word = "dog"',
            'save_model_as = "safetensors"', "learning_rate = 0.05", 'optimizer_type = "AdamW"', "train_batch_size = 2",
            "max_train_steps = 2", "seed = 1", "max_data_loader_n_workers = 0", "cache_latents = true",
            f'sample_prompts = "{prompts.as_posix()}"', "sample_every_n_steps = 2",
        ]) + "\n",
        encoding="utf-8",
    )
    result = run(["--config_file", str(config)])
    assert result.global_step == 2 and (tmp_path / "out" / "emb.safetensors").is_file()
    (sample,) = (tmp_path / "out" / "sample").glob("emb_*_000002_00_5.png")

    # the sample used the trained vectors: the same prompt on a fresh model with the saved file gives it again
    from PIL import Image

    from library.model_util import load_target_model

    models = load_target_model(workspace["model"])
    embedding_files.load_embedding_into(models.tokenizer, models.text_encoder, tmp_path / "out" / "emb.safetensors", "mychar")
    request = sampling.parse_prompt_line("mychar mychar1 on grass --w 64 --h 64 --d 5 --s 3 --l 2")
    (image,) = sampling.generate_images(models.unet, models.vae, models.text_encoder, models.tokenizer, request)
    assert np.array_equal(np.asarray(Image.open(sample)), np.asarray(image))


def test_resume_is_bit_identical(workspace, tmp_path):
    extra = ["--save_state", "--save_every_n_steps", "2", "--max_train_steps", "4", "--save_model_as", "safetensors",
             "--num_vectors_per_token", "2"]
    img = tih.make_ti_images(tmp_path, count=4)
    full = run(tih.ti_argv(workspace["model"], img, tmp_path / "full", *extra))
    stopped = run(tih.ti_argv(workspace["model"], img, tmp_path / "run", *extra), train_core.TrainHooks(stop_after_step=2))
    assert stopped.stopped_early
    state = tmp_path / "run" / "emb-step00000002-state"
    assert json.loads((state / "train_state.json").read_text(encoding="utf-8"))["global_step"] == 2
    resumed = run(tih.ti_argv(workspace["model"], img, tmp_path / "run", *extra, "--resume", str(state)))
    assert resumed.step_losses == full.step_losses[2:]
    a = load_file(str(tmp_path / "full" / "emb.safetensors"))
    b = load_file(str(tmp_path / "run" / "emb.safetensors"))
    assert torch.equal(a["emb_params"], b["emb_params"])


def test_guide_lists_every_flag():
    import train_textual_inversion_XTI as txti

    guide = (th.REPO_ROOT / "docs" / "train_textual_inversion.md").read_text(encoding="utf-8")
    for parser in (tti.setup_parser(), txti.setup_parser()):
        flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"]
        missing = [f for f in flags if f"`{f}`" not in guide]
        assert not missing, missing


@pytest.mark.parametrize("script,config,output", [
    ("ti", "ti_demo.toml", "myball.safetensors"), ("xti", "xti_demo.toml", "myball_xti.safetensors"),
])
def test_demo_configs_run(workspace, tmp_path, monkeypatch, script, config, output):
    """The worked examples of docs/train_textual_inversion.md (one epoch instead of four)."""
    import train_textual_inversion_XTI as txti

    monkeypatch.chdir(th.REPO_ROOT)  # the demo paths are relative to the repository root
    module = tti if script == "ti" else txti
    out = tmp_path / "out"
    argv = ["--config_file", f"examples/ti_demo/{config}", "--pretrained_model_name_or_path", str(workspace["model"]),
            "--output_dir", str(out), "--max_train_epochs", "1", "--sample_every_n_epochs", "1", "--save_every_n_epochs", "1"]
    assert run_main(module.main, argv) == 0
    assert (out / output).is_file() and len(list((out / "sample").glob("*.png"))) == 2
    if script == "ti":
        assert embedding_files.read_embedding(out / output).vectors.shape == (2, 32)
    else:
        blocks, _ = embedding_files.read_xti_file(out / output)
        assert len(blocks) == 10 and all(t.shape == (1, 32) for t in blocks.values())


def test_full_bf16_keeps_other_rows_and_saves_bf16(workspace, tmp_path):
    """--full_bf16 casts the embedding matrix after setup: the restored rows follow that dtype."""
    seen = {}

    def start(ctx):
        weight = ctx.models.text_encoder.get_input_embeddings().weight
        seen["dtype"] = weight.dtype
        seen["before"] = weight.detach().clone()
        seen["ids"] = ctx.models.tokenizer.convert_tokens_to_ids(["mychar"])

    def end(ctx):
        seen["after"] = ctx.models.text_encoder.get_input_embeddings().weight.detach().clone()

    argv = tih.ti_argv(workspace["model"], workspace["img"], tmp_path / "out", "--mixed_precision", "bf16", "--full_bf16",
                       "--save_precision", "bf16", "--save_model_as", "safetensors", "--max_train_steps", "2")
    run(argv, train_core.TrainHooks(on_train_start=start, on_train_end=end))
    assert seen["dtype"] == torch.bfloat16
    others = torch.ones(seen["before"].shape[0], dtype=torch.bool)
    others[seen["ids"]] = False
    assert torch.equal(seen["before"][others], seen["after"][others])
    assert not torch.equal(seen["before"][seen["ids"]], seen["after"][seen["ids"]])
    saved = load_file(str(tmp_path / "out" / "emb.safetensors"))["emb_params"]
    assert saved.dtype == torch.bfloat16 and torch.equal(saved, seen["after"][seen["ids"]])

