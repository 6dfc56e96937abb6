"""Sample prompts, samplers, long/weighted generation embeddings and the image pipeline."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.lpw_stable_diffusion import get_weighted_text_embeddings
from library.samplers import SAMPLER_NAMES, get_noise_scheduler, get_sampler
from library.sampling import (
    SamplePrompt,
    generate_images,
    load_sample_prompts,
    parse_prompt_line,
    sample_file_name,
    sample_images,
    should_sample,
)
from library.text_encoding import encode_input_ids, tokenize_captions
from library.tiny_sd import build_tiny_models


def tiny(prompt: str = "a red cat", **options) -> SamplePrompt:
    values = {"width": 64, "height": 64, "steps": 4, "seed": 1, **options}
    return SamplePrompt(prompt=prompt, **values)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# ---------------------------------------------------------------------------------------
# prompt lines (SPEC 5.1)

LINE_CASES = [
    ("a cat", dict(prompt="a cat", negative_prompt=None, width=512, height=512, seed=None, steps=30, scale=7.5)),
    (
        "a cat --n blurry, ugly --w 768 --h 640 --d 42 --s 20 --l 5.5",
        dict(prompt="a cat", negative_prompt="blurry, ugly", width=768, height=640, seed=42, steps=20, scale=5.5),
    ),
    # case-insensitive, any order, surrounding whitespace stripped
    ("  a dog --L 9 --W 256 --D 7  ", dict(prompt="a dog", width=256, seed=7, scale=9.0)),
    # sizes floored to multiples of 8, at least 64
    ("x --w 100 --h 515", dict(width=96, height=512)),
    ("x --w 10 --h 63", dict(width=64, height=64)),
    # steps clamped to 1..1000
    ("x --s 0", dict(steps=1)),
    ("x --s 5000", dict(steps=1000)),
    # last one wins; unknown options ignored; bad values ignored
    ("x --w 128 --w 256 --q 3 --zz --l abc", dict(prompt="x", width=256, scale=7.5, extra={"unparsed_options": ["q 3", "zz", "l abc"]})),
    ("x --l 1.2.3 --s 3", dict(scale=7.5, steps=3)),
    # --ss (HEAD): per-prompt sampler
    ("x --ss euler_a --s 12", dict(sampler="euler_a", steps=12)),
    # prefix match as sd-scripts: "--w 512px" reads 512
    ("x --w 512px", dict(width=512)),
    # the negative prompt is the rest of its segment
    ("x --n (worst quality:1.4), lowres --d 3", dict(negative_prompt="(worst quality:1.4), lowres", seed=3)),
    # " --" splits, a bare "--" inside a word does not
    ("a--b --d 1", dict(prompt="a--b", seed=1)),
]


@pytest.mark.parametrize("line,expected", LINE_CASES)
def test_parse_prompt_line(line, expected):
    parsed = parse_prompt_line(line)
    assert parsed is not None
    for key, value in expected.items():
        assert getattr(parsed, key) == value, key


@pytest.mark.parametrize("line", ["", "   ", "# a comment --w 64", "#", "\t\n"])
def test_parse_prompt_line_skips(line):
    assert parse_prompt_line(line) is None


def test_load_text_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\n\na cat --d 1\n  # indented comment\nb dog --w 128\n\nc bird\n", encoding="utf-8")
    prompts = load_sample_prompts(path)
    assert [p.prompt for p in prompts] == ["a cat", "b dog", "c bird"]
    assert [p.index for p in prompts] == [0, 1, 2]
    assert prompts[0].seed == 1 and prompts[1].width == 128


def test_load_toml_and_json_prompt_files(tmp_path):
    toml_path = tmp_path / "prompts.toml"
    toml_path.write_text(
        '[prompt]\nnegative_prompt = "bad"\nsample_steps = 12\nwidth = 100\n\n'
        '[[prompt.subset]]\nprompt = "a cat"\nseed = 5\n\n'
        '[[prompt.subset]]\nprompt = "a dog"\nwidth = 256\nscale = 4\nsample_sampler = "euler"\n',
        encoding="utf-8",
    )
    cat, dog = load_sample_prompts(toml_path)
    assert (cat.prompt, cat.negative_prompt, cat.steps, cat.width, cat.seed) == ("a cat", "bad", 12, 96, 5)
    assert (dog.prompt, dog.width, dog.scale, dog.sampler, dog.index) == ("a dog", 256, 4.0, "euler", 1)
    json_path = tmp_path / "prompts.json"
    json_path.write_text(json.dumps([{"prompt": "a cat", "height": 64, "sample_steps": 2000}]), encoding="utf-8")
    (only,) = load_sample_prompts(json_path)
    assert (only.prompt, only.height, only.steps, only.width) == ("a cat", 64, 1000, 512)


def test_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(UserError, match="missing.txt"):
        load_sample_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "file_name,content,match",
    [
        ("bad.toml", "[prompt\n", "bad.toml"),
        ("nosubset.toml", "[prompt]\nwidth = 64\n", "nosubset.toml"),
        ("bad.json", '{"prompt": "x"}', "bad.json"),
        ("sampler.txt", "a cat --ss euler_b\n", "euler_b.*sampler.txt"),
        ("number.json", '[{"prompt": 5}]', "number.json"),
        ("value.json", '[{"prompt": "x", "width": "wide"}]', "value.json"),
    ],
)
def test_prompt_file_errors(tmp_path, file_name, content, match):
    bad_file = tmp_path / file_name
    bad_file.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match):
        load_sample_prompts(bad_file)


@pytest.mark.parametrize(
    "epoch,steps,every_epochs,every_steps,at_first,expected",
    [
        (None, 0, None, None, True, True),
        (None, 0, 1, None, False, False),
        (None, 10, None, None, False, False),
        (None, 10, None, 5, False, True),
        (None, 11, None, 5, False, False),
        (2, 10, None, 5, False, False),  # end of epoch call with step sampling
        (2, 10, 2, None, False, True),
        (3, 10, 2, None, False, False),
        (None, 10, 2, 5, False, False),  # every_n_epochs wins over every_n_steps
        (4, 10, 2, 5, False, True),
    ],
)
def test_should_sample(epoch, steps, every_epochs, every_steps, at_first, expected):
    assert should_sample(epoch, steps, every_epochs, every_steps, at_first) is expected


# ---------------------------------------------------------------------------------------
# samplers (SPEC 7.2, 1.8)


def test_sampler_configs():
    expected_betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    for name in SAMPLER_NAMES + ["ddpm"]:
        scheduler = get_sampler(name)
        assert scheduler.config.num_train_timesteps == 1000
        assert scheduler.config.beta_schedule == "scaled_linear"
        torch.testing.assert_close(scheduler.betas.float(), expected_betas)
        assert scheduler.config.prediction_type == "epsilon"
        assert get_sampler(name, v_parameterization=True).config.prediction_type == "v_prediction"
        if hasattr(scheduler.config, "clip_sample"):
            assert scheduler.config.clip_sample is True
    assert type(get_sampler("k_euler_a")).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(get_sampler("dpm_2_a")).__name__ == "KDPM2AncestralDiscreteScheduler"
    assert type(get_sampler("LMS")).__name__ == "LMSDiscreteScheduler"
    assert get_sampler("dpmsolver").config.algorithm_type == "dpmsolver"
    assert get_sampler("dpmsolver").config.final_sigmas_type == "sigma_min"
    assert get_sampler("dpmsolver++").config.algorithm_type == "dpmsolver++"
    assert get_sampler("ddim").config.clip_sample is True


def test_unknown_sampler():
    with pytest.raises(UserError) as error:
        get_sampler("k_dpmpp_2m_sde")
    assert "k_dpmpp_2m_sde" in str(error.value) and "euler_a" in str(error.value)


def test_noise_scheduler():
    scheduler = get_noise_scheduler()
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert scheduler.config.clip_sample is False
    assert scheduler.config.prediction_type == "epsilon"
    assert get_noise_scheduler(True).config.prediction_type == "v_prediction"
    torch.testing.assert_close(scheduler.alphas_cumprod[0], torch.tensor(1 - 0.00085))


@pytest.mark.parametrize("name", SAMPLER_NAMES + ["ddpm"])
def test_every_sampler_generates(tiny_models_v1, tokenizer_v1, name):
    unet, vae, text_encoder = tiny_models_v1
    (image,) = generate_images(unet, vae, text_encoder, tokenizer_v1, tiny(), sampler_name=name, show_progress=False)
    assert image.size == (64, 64) and image.mode == "RGB"
    values = pixels(image)
    assert values.std() > 1.0  # not a flat image
    assert image.info["sampler"] == name


# ---------------------------------------------------------------------------------------
# generation


def test_same_seed_same_image_different_seed_different(tiny_models_v1, tokenizer_v1):
    unet, vae, text_encoder = tiny_models_v1
    for sampler in ("ddim", "euler_a"):  # euler_a also draws noise every step
        first, second, other = generate_images(
            unet, vae, text_encoder, tokenizer_v1, [tiny(seed=3), tiny(seed=3), tiny(seed=4)],
            sampler_name=sampler, show_progress=False,
        )
        assert np.array_equal(pixels(first), pixels(second))
        assert np.abs(pixels(first) - pixels(other)).max() > 0


def test_prompt_and_guidance_change_the_image(tiny_models_v1, tokenizer_v1):
    unet, vae, text_encoder = tiny_models_v1
    base, other_prompt, negative, unguided = generate_images(
        unet, vae, text_encoder, tokenizer_v1,
        [tiny(), tiny("a blue house"), tiny(negative_prompt="ugly"), tiny(scale=1.0)],
        show_progress=False,
    )
    for image in (other_prompt, negative, unguided):
        assert np.abs(pixels(base) - pixels(image)).max() > 0


def test_requested_size(tiny_models_v1, tokenizer_v1):
    unet, vae, text_encoder = tiny_models_v1
    wide, odd = generate_images(
        unet, vae, text_encoder, tokenizer_v1, [tiny(width=128, height=64), tiny(width=100, height=70)],
        show_progress=False,
    )
    assert wide.size == (128, 64)
    assert odd.size == (96, 64)


def test_seedless_prompt_gets_random_seed(tiny_models_v1, tokenizer_v1):
    unet, vae, text_encoder = tiny_models_v1
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, second = generate_images(
        unet, vae, text_encoder, tokenizer_v1, [tiny(seed=None), tiny(seed=None)], show_progress=False
    )
    assert torch.equal(state, torch.get_rng_state())
    assert first.info["seed"] != second.info["seed"]
    (again,) = generate_images(
        unet, vae, text_encoder, tokenizer_v1, tiny(seed=int(first.info["seed"])), show_progress=False
    )
    assert np.array_equal(pixels(first), pixels(again))


def test_v2_v_prediction_and_clip_skip(tiny_models_v2, tokenizer_v2):
    unet, vae, text_encoder = tiny_models_v2
    eps, vpred, skipped = (
        generate_images(unet, vae, text_encoder, tokenizer_v2, tiny(), v_parameterization=v, clip_skip=c,
                        sampler_name="euler", show_progress=False)[0]
        for v, c in ((False, None), (True, None), (True, 2))
    )
    assert eps.size == vpred.size == (64, 64)
    assert np.abs(pixels(eps) - pixels(vpred)).max() > 0
    assert np.abs(pixels(vpred) - pixels(skipped)).max() > 0


def test_prompt_replacement(tiny_models_v1, tokenizer_v1):
    unet, vae, text_encoder = tiny_models_v1
    replaced, direct = generate_images(
        unet, vae, text_encoder, tokenizer_v1, [tiny("a sks cat")], prompt_replacement=("sks", "red"),
        show_progress=False,
    ) + generate_images(unet, vae, text_encoder, tokenizer_v1, [tiny("a red cat")], show_progress=False)
    assert replaced.info["prompt"] == "a red cat"
    assert np.array_equal(pixels(replaced), pixels(direct))


# ---------------------------------------------------------------------------------------
# long / weighted prompt embeddings (SPEC 5.3 "Samples")

LONG_PROMPT = " ".join(["red"] * 100)  # 100 tokens


def test_long_prompts_encode_to_77k(tiny_models_v1, tokenizer_v1):
    text_encoder = tiny_models_v1[2]
    with torch.no_grad():
        short, short_uncond = get_weighted_text_embeddings(tokenizer_v1, text_encoder, "a cat", "")
        long, long_uncond = get_weighted_text_embeddings(tokenizer_v1, text_encoder, LONG_PROMPT, "ugly")
        longest, _ = get_weighted_text_embeddings(tokenizer_v1, text_encoder, " ".join(["red"] * 400))
        capped, _ = get_weighted_text_embeddings(tokenizer_v1, text_encoder, LONG_PROMPT, max_embeddings_multiples=1)
        from_negative, _ = get_weighted_text_embeddings(tokenizer_v1, text_encoder, "a cat", LONG_PROMPT)
    assert short.shape == short_uncond.shape == (1, 77, 32)
    assert long.shape == long_uncond.shape == (1, 154, 32)
    assert longest.shape == (1, 231, 32)
    assert capped.shape == (1, 77, 32)
    assert from_negative.shape == (1, 154, 32)  # the prompt is padded to its negative's length


@pytest.mark.parametrize("v2", [False, True])
def test_long_prompt_chunks_keep_their_bos_eos(tiny_models_v1, tiny_models_v2, tokenizer_v1, tokenizer_v2, v2):
    text_encoder = (tiny_models_v2 if v2 else tiny_models_v1)[2]
    tokenizer = tokenizer_v2 if v2 else tokenizer_v1
    chunks = tokenize_captions(tokenizer, [LONG_PROMPT], 150)[0]  # same chunk ids as training
    with torch.no_grad():
        embeddings, _ = get_weighted_text_embeddings(tokenizer, text_encoder, LONG_PROMPT, clip_skip=2)
        expected = torch.cat([
            (lambda h: getattr(text_encoder, "text_model", text_encoder).final_layer_norm(h))(
                text_encoder(chunks[k : k + 1], output_hidden_states=True).hidden_states[-2]
            )[0]
            for k in range(2)
        ])
        training_layout, _ = get_weighted_text_embeddings(
            tokenizer, text_encoder, LONG_PROMPT, clip_skip=2, no_boseos_middle=True
        )
        training = encode_input_ids(text_encoder, chunks[None], tokenizer, 150, 2)
    torch.testing.assert_close(embeddings[0], expected)
    torch.testing.assert_close(training_layout, training)


def test_prompt_weights_in_generation_embeddings(tiny_models_v1, tokenizer_v1):
    text_encoder = tiny_models_v1[2]
    with torch.no_grad():
        plain, _ = get_weighted_text_embeddings(tokenizer_v1, text_encoder, "a red cat")
        weighted, _ = get_weighted_text_embeddings(tokenizer_v1, text_encoder, "a (red:2) cat")
        literal, _ = get_weighted_text_embeddings(tokenizer_v1, text_encoder, "a (red:2) cat", skip_parsing=True)
        unweighted, _ = get_weighted_text_embeddings(tokenizer_v1, text_encoder, "a (red:2) cat", skip_weighting=True)
    weights = torch.ones(1, 77)
    weights[0, 2] = 2.0
    expected = plain * weights[..., None]
    expected = expected * plain.mean() / expected.mean()
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(unweighted, plain)
    assert (literal - plain).abs().max() > 1e-3  # brackets tokenized as text


# ---------------------------------------------------------------------------------------
# sample_images (training samples)

NAME_PATTERN = re.compile(r"^(?:(?P<name>.+)_)?(?P<ts>\d{14})_(?P<progress>e\d{6}|\d{6})_(?P<idx>\d{2})(?:_(?P<seed>\d+))?\.png$")


def test_sample_file_name():
    assert re.fullmatch(r"run_\d{14}_e000003_01_42\.png", sample_file_name("run", 3, 120, 1, 42))
    assert re.fullmatch(r"\d{14}_000120_12\.png", sample_file_name(None, None, 120, 12, None))


def test_sample_images_writes_named_pngs_and_restores_state(tmp_path, tokenizer_v1):
    unet, vae, text_encoder = build_tiny_models(v2=False, seed=1)
    unet.train()
    text_encoder.train()
    text_encoder.embeddings.eval()  # a submodule in another mode must come back as it was
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(
        "# samples\na red cat --w 64 --h 64 --s 3 --d 11 --n blurry\n\na blue dog --w 128 --h 64 --s 2\n",
        encoding="utf-8",
    )
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    expected_torch = torch.rand(5)
    expected_numpy = np.random.rand(5)
    expected_python = [random.random() for _ in range(5)]
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)

    paths = sample_images(tmp_path / "out", "mylora", 2, 40, prompt_file, unet, vae, text_encoder, tokenizer_v1,
                          sampler_name="euler_a")

    assert torch.equal(torch.rand(5), expected_torch)
    assert np.array_equal(np.random.rand(5), expected_numpy)
    assert [random.random() for _ in range(5)] == expected_python
    assert unet.training and text_encoder.training and not text_encoder.embeddings.training
    assert not vae.training

    assert len(paths) == 2
    for path in paths:
        assert path.parent == tmp_path / "out" / "sample" and path.is_file()
    first = NAME_PATTERN.match(paths[0].name)
    second = NAME_PATTERN.match(paths[1].name)
    assert first and second
    assert (first["name"], first["progress"], first["idx"], first["seed"]) == ("mylora", "e000002", "00", "11")
    assert (second["name"], second["progress"], second["idx"], second["seed"]) == ("mylora", "e000002", "01", None)
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64)
        assert image.text["prompt"] == "a red cat"
        assert image.text["negative-prompt"] == "blurry"
        assert image.text["seed"] == "11"
        assert image.text["sampler"] == "euler_a"
        assert image.text["steps"] == "3"
        assert image.text["scale"] == "7.5"
    with Image.open(paths[1]) as image:
        assert image.size == (128, 64)
        assert int(image.text["seed"]) >= 0

    # step samples: no epoch in the name; the seeded image is reproduced exactly
    step_paths = sample_images(tmp_path / "out", None, None, 40, load_sample_prompts(prompt_file)[:1],
                               unet, vae, text_encoder, tokenizer_v1, sampler_name="euler_a")
    match = NAME_PATTERN.match(step_paths[0].name)
    assert match and match["name"] is None and match["progress"] == "000040" and match["seed"] == "11"
    with Image.open(paths[0]) as a, Image.open(step_paths[0]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sample_images_missing_prompt_file(tmp_path, tiny_models_v1, tokenizer_v1):
    unet, vae, text_encoder = tiny_models_v1
    with pytest.raises(UserError, match="nope.txt"):
        sample_images(tmp_path, None, 1, 0, tmp_path / "nope.txt", unet, vae, text_encoder, tokenizer_v1)


def test_mixed_dtypes(tokenizer_v1):
    unet, vae, text_encoder = build_tiny_models(v2=False, seed=0)
    # guidance 2: on random weights cond and uncond predictions nearly cancel, and scale 7.5
    # multiplies bf16 rounding of their difference until the picture depends on the library
    # versions; guidance still runs at 2
    guided = dict(scale=2.0)
    reference, other_seed = generate_images(
        unet, vae, text_encoder, tokenizer_v1, [tiny(**guided), tiny(seed=2, **guided)], show_progress=False
    )
    # mixed-precision training: fp32 models sampled under bf16 autocast
    (autocast,) = generate_images(unet, vae, text_encoder, tokenizer_v1, tiny(**guided), dtype=torch.bfloat16,
                                  show_progress=False)
    # full-bf16 UNet beside an fp32 text encoder and VAE: inputs follow each model's dtype
    unet.to(torch.bfloat16)
    (half_unet,) = generate_images(unet, vae, text_encoder, tokenizer_v1, tiny(**guided), show_progress=False)
    def correlation(a, b):
        return np.corrcoef(pixels(a).ravel(), pixels(b).ravel())[0, 1]

    # the random tiny models amplify rounding, so "same picture" means clearly correlated
    # with the fp32 image, far more than an image of another seed is
    unrelated = correlation(other_seed, reference)
    for image in (autocast, half_unet):
        assert image.size == (64, 64)
        assert correlation(image, reference) > max(0.9, unrelated + 0.3)
