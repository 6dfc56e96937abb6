"""The shipped tiny shapes model's pictures, judged (issue 11).

End to end through text encoding, prompt weighting, CFG, every sampler and the VAE decode:
a colour word must come out in that colour, a negative prompt and `(blue:1.5)` / `(red:1.5)`
must move the colour the right way, and every sampler name must draw the asked colours.
Native size (64 px), 20 steps and few images keep the file near a minute on a quiet CPU.

The thresholds are what the shipped model does (docs/tiny_model.md, "Quality figures"): its
colours are reliable for blue, white, black and green, less for red and yellow; its base shapes
are blobs about half the time, so no test asks for a base shape. The demo LoRA's new shape (a
cross, large and centred) is tested against the same LoRA at multiplier 0.
"""
from __future__ import annotations

import pytest

import library.gen_pipeline as gen_pipeline
from library.samplers import SAMPLER_NAMES, get_sampler
from library.shape_quality import SHIPPED_MODEL, colour_share, generate, load_models
from library.shape_scenes import Scene, caption, judge_image

STEPS = 20
SCALE = 6.0
SEEDS = [11, 12, 13, 14, 15, 16]
# sd-scripts switches on sample clipping (x0 cut to [-1, 1]) for every scheduler that has it;
# this model's latents have unit standard deviation, so clipping cuts a third of their values
CLIPPING_SAMPLERS = {"ddim", "heun"}


@pytest.fixture(scope="module")
def models():
    return load_models(SHIPPED_MODEL)


def _images(models, prompts, seeds, sampler="euler_a", negative=None):
    return generate(models, prompts, seeds, sampler, STEPS, SCALE, negative_prompts=negative)


def test_colour_words_give_that_colour(models):
    pairs = (("blue", "yellow"), ("white", "red"), ("black", "white"), ("green", "black"))
    scenes = [Scene("circle", colour, background, "center", "large") for colour, background in pairs for _ in range(3)]
    images = _images(models, [caption(s) for s in scenes], SEEDS[:3] * len(pairs))
    judged = [judge_image(image) for image in images]
    assert sum(j.colour == s.colour for j, s in zip(judged, scenes)) >= 10, [(j.colour, s.colour) for j, s in zip(judged, scenes)]
    assert sum(j.background == s.background for j, s in zip(judged, scenes)) >= 10


def test_negative_prompt_moves_colour_away(models):
    prompts = ["a large blue circle on a yellow background, center"] * len(SEEDS)
    plain = colour_share(_images(models, prompts, SEEDS), "blue")
    without_blue = colour_share(_images(models, prompts, SEEDS, negative=["blue"] * len(SEEDS)), "blue")
    assert without_blue < 0.8 * plain, (plain, without_blue)


@pytest.mark.parametrize("colour,background", [("blue", "yellow"), ("red", "white")])
def test_attention_weighting_moves_colour(models, colour, background):
    def share(weight: float) -> float:
        prompt = f"a large ({colour}:{weight}) circle on a {background} background, center"
        return colour_share(_images(models, [prompt] * len(SEEDS), SEEDS), colour)

    # the effect is small for this model (a few % of the pixels) but its direction is fixed
    assert share(1.5) > share(0.5)


def _without_clipping(name: str, v_parameterization: bool = False):
    scheduler = get_sampler(name, v_parameterization)
    scheduler.register_to_config(clip_sample=False)
    return scheduler


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_draws_the_prompt(models, sampler, monkeypatch):
    """Colour and background as asked for at least 3 of 4 prompts. DDIM and Heun run without
    sd-scripts' sample clipping, which on this model loses the colours (docs/tiny_model.md)."""
    if sampler in CLIPPING_SAMPLERS:
        assert get_sampler(sampler).config.clip_sample  # the toolkit's default, as sd-scripts
        monkeypatch.setattr(gen_pipeline, "get_sampler", _without_clipping)
    scenes = [
        Scene("square", "blue", "yellow", "center", "large"), Scene("circle", "green", "black", "center", "large"),
        Scene("circle", "white", "red", "center", "large"), Scene("circle", "blue", "yellow", "center", "large"),
    ]  # fmt: skip
    judged = [judge_image(image) for image in _images(models, [caption(s) for s in scenes], SEEDS[:4], sampler)]
    right = [j.colour == s.colour and j.background == s.background for j, s in zip(judged, scenes)]
    assert sum(right) >= 3, [(j.colour, j.background) for j in judged]


# the LoRA demo (examples/shapes_demo/lora.toml) for 5 of its 10 epochs: 150 steps, at one thread
# so that the trained weights, and so the count below, do not depend on the machine's cores
LORA_EPOCHS = 5
CROSS_PAIRS = (("yellow", "blue"), ("red", "white"), ("white", "green"), ("blue", "yellow"), ("green", "black"), ("black", "red"))


def test_demo_lora_draws_the_new_shape_and_multiplier_0_does_not(models, tmp_path, monkeypatch):
    import torch

    import train_helpers  # noqa: F401 - the repository root on sys.path
    import train_network
    from library import shape_demos
    from library.cli import run_main
    from library.shape_quality import apply_lora, shape_fraction

    monkeypatch.chdir(train_helpers.REPO_ROOT)  # the demo's paths are relative to the repository root
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--config_file", "examples/shapes_demo/lora.toml", "--output_dir", str(tmp_path),
                "--logging_dir", str(tmp_path / "logs"), "--max_train_epochs", str(LORA_EPOCHS)]  # fmt: skip
        assert run_main(train_network.main, argv) == 0
        scenes = [Scene(shape_demos.NEW_SHAPE, c, b, "center", "large") for c, b in CROSS_PAIRS for _ in range(4)]
        prompts = [caption(s, shape_demos.LORA_WORD) for s in scenes]
        seeds = list(range(100, 100 + len(prompts)))
        network = apply_lora(models, tmp_path / "sks_cross.safetensors", 1.0)
        try:
            with_lora = shape_fraction(_images(models, prompts, seeds), shape_demos.NEW_SHAPE)
            network.set_multiplier(0.0)
            without = shape_fraction(_images(models, prompts, seeds), shape_demos.NEW_SHAPE)
        finally:
            network.restore()
    finally:
        torch.set_num_threads(threads)
    # measured: 5 of 24 read as a cross with the LoRA, 0 of 24 at multiplier 0 (docs/tiny_model.md)
    assert with_lora >= 3 / 24 and without <= 1 / 24, (with_lora, without)
