"""gen_img_diffusers.py: parity with diffusers' pipelines, prompt lines, seeds, batches, PNG
chunks, highres fix, and the one-line errors of bad input."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img_diffusers
from gen_helpers import one_line_error
from library import gen_args, gen_img
from library.gen_jobs import JobDefaults, SeedSource, batches, jobs_for_line, parse_line
from library.gen_pipeline import (
    BatchSettings,
    GenModels,
    decode_latents,
    encode_prompts,
    generate_latents,
    image_to_tensor,
    mask_to_tensor,
)
from library.png_info import ImageRecord, a1111_parameters, image_file_name, parse_a1111_parameters
from library.samplers import SAMPLER_NAMES, get_sampler



def as_float(image) -> np.ndarray:
    return np.asarray(image).astype(np.float32) / 255.0


def gen_models(tiny_models_v1, tokenizer_v1, **kwargs) -> GenModels:
    unet, vae, text_encoder = tiny_models_v1
    return GenModels(unet, vae, text_encoder, tokenizer_v1, max_embeddings_multiples=1, **kwargs)


def ours(models, settings, prompt="a red cat", negative="", seed=1, **kwargs) -> np.ndarray:
    latents = generate_latents(models, settings, [prompt], [negative], [seed], show_progress=False, **kwargs)
    return as_float(decode_latents(models, latents)[0])


def diffusers_pipe(cls, tiny_models_v1, tokenizer_v1, sampler):
    unet, vae, text_encoder = tiny_models_v1
    pipe = cls(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer_v1, unet=unet, scheduler=get_sampler(sampler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    # the pipeline's constructor rewrites old-style scheduler configs (clip_sample, steps_offset);
    # hand it the very scheduler our side uses
    pipe.scheduler = get_sampler(sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_init_image(size=64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.uniform(0, 255, (size, size, 3)).astype(np.uint8))


def half_mask(size=64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))  # repaint the left half
    return mask


# the tolerance: diffusers returns floats, we return 8-bit images (rounding: 0.5/255)
PIXEL_TOLERANCE = 0.6 / 255


# ---------------------------------------------------------------------------------------
# parity with diffusers


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_txt2img_matches_stable_diffusion_pipeline(tiny_models_v1, tokenizer_v1, sampler):
    from diffusers import StableDiffusionPipeline

    pipe = diffusers_pipe(StableDiffusionPipeline, tiny_models_v1, tokenizer_v1, sampler)
    reference = pipe(
        "a red cat", negative_prompt="ugly", height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(1), output_type="np",
    ).images[0]
    image = ours(gen_models(tiny_models_v1, tokenizer_v1), BatchSettings(64, 64, 4, 7.5, sampler), negative="ugly")
    assert np.abs(image - reference).max() <= PIXEL_TOLERANCE


def test_img2img_matches_diffusers(tiny_models_v1, tokenizer_v1):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = diffusers_pipe(StableDiffusionImg2ImgPipeline, tiny_models_v1, tokenizer_v1, "ddim")
    init = make_init_image()
    reference = pipe(
        "a red cat", image=init, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(1), output_type="np",
    ).images[0]
    image = ours(
        gen_models(tiny_models_v1, tokenizer_v1), BatchSettings(64, 64, 5, 7.5, "ddim", strength=0.6),
        init_images=image_to_tensor(init, 64, 64),
    )
    assert np.abs(image - reference).max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpaint_matches_diffusers(tiny_models_v1, tokenizer_v1, strength):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = diffusers_pipe(StableDiffusionInpaintPipeline, tiny_models_v1, tokenizer_v1, "ddim")
    init, mask = make_init_image(), half_mask()
    reference = pipe(
        "a red cat", image=init, mask_image=mask, strength=strength, height=64, width=64, num_inference_steps=5,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(1), output_type="np",
    ).images[0]
    image = ours(
        gen_models(tiny_models_v1, tokenizer_v1), BatchSettings(64, 64, 5, 7.5, "ddim", strength=strength),
        init_images=image_to_tensor(init, 64, 64), masks=mask_to_tensor(mask, 64, 64),
    )
    assert np.abs(image - reference).max() <= PIXEL_TOLERANCE


def test_batch_images_equal_single_images(tiny_models_v1, tokenizer_v1):
    models = gen_models(tiny_models_v1, tokenizer_v1)
    settings = BatchSettings(64, 64, 3, 7.5, "euler_a")  # ancestral: per-step noise per image too
    latents = generate_latents(models, settings, ["a cat", "a dog"], ["", "ugly"], [3, 4], show_progress=False)
    batch = [as_float(i) for i in decode_latents(models, latents)]
    single = [ours(models, settings, "a cat", "", 3), ours(models, settings, "a dog", "ugly", 4)]
    for a, b in zip(batch, single):
        assert np.abs(a - b).max() <= 2 / 255
    assert np.abs(batch[0] - batch[1]).max() > 0.01


def test_negative_scale(tiny_models_v1, tokenizer_v1):
    """--negative_scale: uncond '' + scale·(cond − uncond) − nscale·(negative − uncond)."""
    models = gen_models(tiny_models_v1, tokenizer_v1)
    embeddings = encode_prompts(models, ["a cat"], ["ugly"], guided=True, negative_scale=True)
    reference_empty = encode_prompts(models, [""], [""], guided=True, negative_scale=False)[:1]
    torch.testing.assert_close(embeddings[0:1], reference_empty)
    plain = ours(models, BatchSettings(64, 64, 3, 7.5), "a cat", "ugly")
    with_negative_scale = ours(models, BatchSettings(64, 64, 3, 7.5, negative_scale=4.0), "a cat", "ugly")
    zero_negative_scale = ours(models, BatchSettings(64, 64, 3, 7.5, negative_scale=0.0), "a cat", "ugly")
    no_negative = ours(models, BatchSettings(64, 64, 3, 7.5), "a cat", "")
    assert np.abs(plain - with_negative_scale).max() > 0.01
    # a negative scale of 0 ignores the negative prompt: the same as an empty negative prompt
    assert np.abs(zero_negative_scale - no_negative).max() <= 2 / 255


def test_weighted_and_long_prompts(tiny_models_v1, tokenizer_v1):
    models = gen_models(tiny_models_v1, tokenizer_v1, )
    plain = encode_prompts(models, ["a red cat"], [""], guided=False, negative_scale=False)
    weighted = encode_prompts(models, ["a (red:1.5) cat"], [""], guided=False, negative_scale=False)
    assert plain.shape == weighted.shape == (1, 77, plain.shape[-1])
    # "red" is position 2 ([BOS] a red cat); its vector is scaled by 1.5, then all by the mean ratio
    ratio = plain.float().mean() / (plain * torch.tensor([1, 1, 1.5] + [1] * 74)[None, :, None]).float().mean()
    torch.testing.assert_close(weighted[0, 2], plain[0, 2] * 1.5 * ratio)
    torch.testing.assert_close(weighted[0, 3], plain[0, 3] * ratio)
    long_prompt = " ".join(["cat"] * 100)
    models.max_embeddings_multiples = 2
    assert encode_prompts(models, [long_prompt], [""], guided=False, negative_scale=False).shape[1] == 154
    models.max_embeddings_multiples = 1  # default of gen_img: 75 tokens, the rest is cut
    assert encode_prompts(models, [long_prompt], [""], guided=False, negative_scale=False).shape[1] == 77


# ---------------------------------------------------------------------------------------
# prompt lines, seeds, batches


def test_parse_line_options():
    line = parse_line("a cat --n ugly, blurry --w 96 --h 64 --d 1,2, 3 --s 12 --l 5 --nl 3.5 --t 0.4 --am 0.5,1 --c photo --ss euler_a")
    assert line.prompt == "a cat" and line.negative_prompt == "ugly, blurry"
    assert (line.width, line.height, line.steps, line.scale) == (96, 64, 12, 5.0)
    assert line.seeds == [1, 2, 3] and line.negative_scale == 3.5 and line.strength == 0.4
    assert line.network_muls == [0.5, 1.0] and line.clip_prompt == "photo" and line.sampler == "euler_a"
    off = parse_line("x --nl none")
    assert off.negative_scale is None and off.negative_scale_off
    assert parse_line("   ") is None


def defaults(**overrides) -> JobDefaults:
    values = dict(width=64, height=64, steps=3, scale=7.5, sampler="ddim", negative_scale=None, strength=None,
                  images_per_prompt=1)
    return JobDefaults(**{**values, **overrides})


def test_jobs_seeds_and_defaults():
    seeds = SeedSource(42, iter_same_seed=False)
    jobs = jobs_for_line(parse_line("a --d 7,8"), defaults(images_per_prompt=3), seeds, [], [], 0)
    assert [j.seed for j in jobs] == [7, 8, 7]  # a short seed list is repeated
    jobs = jobs_for_line(parse_line("b --w 100"), defaults(images_per_prompt=3), seeds, [], [], 3)
    assert jobs[0].seed == 42 and len({j.seed for j in jobs}) == 3  # --seed is the first image's seed
    assert jobs[0].width == 96 and jobs[0].strength == 0.8  # rounded to ×8; default strength
    again = [j.seed for j in jobs_for_line(parse_line("b"), defaults(images_per_prompt=3), SeedSource(42, False), [], [], 0)]
    assert again == [j.seed for j in jobs]  # --seed repeats the run
    same = SeedSource(None, iter_same_seed=True)
    same.start_iteration()
    first = [j.seed for line in ("a", "b") for j in jobs_for_line(parse_line(line), defaults(), same, [], [], 0)]
    same.start_iteration()
    second = [j.seed for j in jobs_for_line(parse_line("a"), defaults(), same, [], [], 0)]
    assert first[0] == first[1] and second[0] != first[0]


def test_batches_group_compatible_jobs():
    seeds = SeedSource(1, False)
    jobs = []
    for text in ("a", "b", "c --s 9", "d", "e", "f"):
        jobs.extend(jobs_for_line(parse_line(text), defaults(), seeds, [], [], len(jobs)))
    assert [[j.prompt for j in b] for b in batches(jobs, 2)] == [["a", "b"], ["c"], ["d", "e"], ["f"]]


# ---------------------------------------------------------------------------------------
# PNG metadata and names


def test_a1111_parameters_round_trip():
    record = ImageRecord(
        prompt="a (red:1.2) cat", negative_prompt="ugly, blurry", seed=42, sampler="euler_a", steps=30,
        scale=7.5, width=512, height=768, model_name="sd15", model_hash="0123abcd", strength=0.6,
    )
    text = a1111_parameters(record)
    assert text.splitlines()[0] == "a (red:1.2) cat"
    assert text.splitlines()[1] == "Negative prompt: ugly, blurry"
    assert "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model hash: 0123abcd" in text
    parsed = parse_a1111_parameters(text)
    assert parsed["prompt"] == record.prompt and parsed["negative_prompt"] == record.negative_prompt
    assert parsed["Seed"] == "42" and parsed["Denoising strength"] == "0.6" and parsed["Model"] == "sd15"


def test_file_names():
    assert image_file_name(3, 42, timestamp="20240101120000") == "im_20240101120000_003_42.png"
    assert image_file_name(0, 42, "1", timestamp="20240101120000") == "im_20240101120000_1000_42.png"
    assert image_file_name(0, 42, "", 12) == "im_000012.png"
    assert image_file_name(0, 42, "0", 12, "photo") == "photo_im_0000012.png"


# ---------------------------------------------------------------------------------------
# the script, in process


def run_gen(model: Path, outdir: Path, *extra: str) -> list[Path]:
    argv = ["--ckpt", str(model), "--outdir", str(outdir), "--W", "64", "--H", "64", "--steps", "3", *extra]
    return gen_img_diffusers.main(argv)


def test_script_writes_pngs_with_chunks(tmp_path, tiny_model_files_v1):
    written = run_gen(
        tiny_model_files_v1["safetensors"], tmp_path, "--prompt", "a cat --n ugly --d 5",
        "--images_per_prompt", "2", "--batch_size", "2", "--negative_scale", "3", "--sampler", "k_euler_a",
    )
    assert len(written) == 2 and all(p.parent == tmp_path and p.suffix == ".png" for p in written)
    with Image.open(written[0]) as image:
        assert image.size == (64, 64)
        chunks = dict(image.text)
    assert written[0].name.endswith("_000_5.png")
    assert chunks["prompt"] == "a cat" and chunks["negative-prompt"] == "ugly" and chunks["seed"] == "5"
    assert chunks["sampler"] == "k_euler_a" and chunks["steps"] == "3" and chunks["scale"] == "7.5"
    assert chunks["negative-scale"] == "3.0"
    params = parse_a1111_parameters(chunks["parameters"])
    assert params["Seed"] == "5" and params["Sampler"] == "Euler a" and params["Size"] == "64x64"
    assert len(params["Model hash"]) == 8


def test_same_seed_same_image_from_file_and_prompt(tmp_path, tiny_model_files_v1):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --d 11\n\na dog --d 12 --l 4\n", encoding="utf-8")
    from_file = run_gen(tiny_model_files_v1["safetensors"], tmp_path / "a", "--from_file", str(prompts),
                        "--sequential_file_name")
    assert [p.name for p in from_file] == ["im_000001.png", "im_000002.png"]
    single = run_gen(tiny_model_files_v1["safetensors"], tmp_path / "b", "--prompt", "a cat", "--seed", "11")
    assert np.array_equal(np.asarray(Image.open(from_file[0])), np.asarray(Image.open(single[0])))
    with Image.open(from_file[1]) as image:
        assert image.text["scale"] == "4.0"


def test_img2img_inpaint_and_highres_fix(tmp_path, tiny_model_files_v1):
    init = tmp_path / "init.png"
    make_init_image(64).save(init)
    mask = tmp_path / "mask.png"
    half_mask(64).save(mask)
    model = tiny_model_files_v1["safetensors"]
    (inpainted,) = run_gen(model, tmp_path / "inpaint", "--prompt", "a cat", "--seed", "3", "--image_path", str(init),
                           "--mask_path", str(mask), "--strength", "0.9", "--use_original_file_name")
    assert inpainted.name.startswith("init_im_")
    pixels = as_float(Image.open(inpainted))
    original = as_float(make_init_image(64))
    # the kept (right) half stays close to the original (VAE round trip only); the left half is new
    assert np.abs(pixels[:, 40:] - original[:, 40:]).mean() < np.abs(pixels[:, :24] - original[:, :24]).mean()
    for latents_flag in ([], ["--highres_fix_latents_upscaling"]):
        out = tmp_path / f"hr{len(latents_flag)}"
        written = run_gen(model, out, "--prompt", "a cat", "--seed", "3", "--highres_fix_scale", "0.5",
                          "--highres_fix_steps", "2", "--highres_fix_save_1st", "--highres_fix_strength", "0.5",
                          *latents_flag)
        first, final = written
        assert Image.open(first).size == (32, 32) and Image.open(final).size == (64, 64)
        assert "_0000_3" in first.name and "_1000_3" in final.name
    # highres fix with an init image: the 1st stage is img2img at the small size
    written = run_gen(model, tmp_path / "hr_img", "--prompt", "a cat", "--seed", "3", "--image_path", str(init),
                      "--highres_fix_scale", "0.5", "--highres_fix_steps", "2")
    assert len(written) == 1 and Image.open(written[0]).size == (64, 64)


def test_interactive_from_stdin_in_process(tmp_path, tiny_model_files_v1):
    args = gen_args.parse_args(["--ckpt", str(tiny_model_files_v1["safetensors"]), "--outdir", str(tmp_path),
                                "--W", "64", "--H", "64", "--steps", "2", "--interactive", "--seed", "1"])
    written = gen_img.run(args, stdin=io.StringIO("a cat\n\na dog --d 9\n"))
    assert len(written) == 2 and Image.open(written[1]).text["prompt"] == "a dog"


def test_interactive_script_reads_stdin(tmp_path, tiny_model_files_v1, monkeypatch):
    """The script's `main` hands sys.stdin to the run (in process: a subprocess costs a minute of imports)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat --d 4\n"))
    written = run_gen(tiny_model_files_v1["safetensors"], tmp_path, "--interactive", "--steps", "2")
    assert [p.name.endswith("_4.png") for p in written] == [True]


# ---------------------------------------------------------------------------------------
# bad input: one line, exit 1


error_of = one_line_error


def test_bad_inputs(tmp_path, capsys, tiny_model_files_v1):
    model = str(tiny_model_files_v1["safetensors"])
    base = ["--outdir", str(tmp_path), "--prompt", "a cat", "--steps", "2", "--W", "64", "--H", "64"]
    assert "--ckpt" in error_of(capsys, base)
    assert "--mask_path" in error_of(capsys, ["--ckpt", model, *base, "--mask_path", "m.png"])
    assert "unknown sampler 'foo' (--sampler)" in error_of(capsys, ["--ckpt", model, *base, "--sampler", "foo"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert "broken.png" in error_of(capsys, ["--ckpt", model, *base, "--image_path", str(broken)])
    assert "missing.png" in error_of(capsys, ["--ckpt", model, *base, "--image_path", str(tmp_path / "missing.png")])
    assert "no prompt" in error_of(capsys, ["--ckpt", model, "--outdir", str(tmp_path)])
    assert "nothing.safetensors" in error_of(capsys, ["--ckpt", str(tmp_path / "nothing.safetensors"), *base])


def test_size_not_divisible_by_8_is_rounded(tmp_path, tiny_model_files_v1, caplog):
    written = run_gen(tiny_model_files_v1["safetensors"], tmp_path, "--prompt", "a cat", "--W", "70", "--H", "60")
    assert Image.open(written[0]).size == (64, 56)
    assert "--W 70 is not divisible by 8; using 64" in caplog.text


def test_v2_model_with_v_parameterization_and_clip_skip(tmp_path, tiny_model_files_v2):
    model = tiny_model_files_v2["safetensors"]
    eps = run_gen(model, tmp_path / "eps", "--prompt", "a cat --d 2")
    vpred = run_gen(model, tmp_path / "v", "--prompt", "a cat --d 2", "--v2", "--v_parameterization", "--clip_skip", "2")
    assert np.abs(as_float(Image.open(eps[0])) - as_float(Image.open(vpred[0]))).max() > 0
    assert "Clip skip: 2" in Image.open(vpred[0]).text["parameters"]


def test_every_sampler_name_runs(tmp_path, tiny_model_files_v1):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a cat --ss {name} --d 1 --s 4\n" for name in SAMPLER_NAMES), encoding="utf-8")
    written = run_gen(tiny_model_files_v1["safetensors"], tmp_path / "out", "--from_file", str(prompts))
    assert [Image.open(p).text["sampler"] for p in written] == SAMPLER_NAMES
    for path in written:
        assert np.asarray(Image.open(path)).std() > 1.0
