"""The shipped tiny shapes model's pictures, judged (issue 11).

End to end through text encoding, prompt weighting, CFG, every sampler, the VAE decode and a
LoRA: "a red square" must come out red, a negative prompt or `(red:1.5)` must move the colour
the right way, and a LoRA trained on stars must make stars appear (and at multiplier 0 not).
Native size (64 px), few steps and few images keep the file near a minute on a quiet CPU.
"""
from __future__ import annotations

import pytest

import train_helpers
from library import shape_demos
from library.samplers import SAMPLER_NAMES
from library.shape_quality import (
    SHIPPED_MODEL, apply_lora, colour_share, generate, judge_scenes, load_models, new_shape_prompts, shape_fraction,
)  # fmt: skip
from library.shape_scenes import Scene, caption, judge_image

STEPS = 20
SCALE = 6.0
SEEDS = [11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="module")
def models():
    return load_models(SHIPPED_MODEL)


def _images(models, prompts, seeds, sampler="euler_a", negative=None):
    return generate(models, prompts, seeds, sampler, STEPS, SCALE, negative_prompts=negative)


def test_colour_words_give_that_colour(models):
    scenes = [
        Scene("square", colour, background, "center", "large")
        for colour, background in (("red", "white"), ("green", "black"), ("blue", "yellow"), ("yellow", "blue"))
        for _ in range(2)
    ]
    images = _images(models, [caption(s) for s in scenes], SEEDS[:2] * 4)
    judged = [judge_image(image).colour for image in images]
    assert sum(j == s.colour for j, s in zip(judged, scenes)) >= 7, list(zip(judged, [s.colour for s in scenes]))
    assert judge_scenes(images, scenes).shape >= 0.75


def test_negative_prompt_moves_colour_away(models):
    prompts = ["a large circle on a white background, center"] * len(SEEDS)  # no colour asked for
    plain = colour_share(_images(models, prompts, SEEDS, negative=["blue"] * len(SEEDS)), "red")
    without_red = colour_share(_images(models, prompts, SEEDS, negative=["red"] * len(SEEDS)), "red")
    assert without_red < 0.5 * plain, (plain, without_red)


def test_attention_weighting_moves_colour(models):
    def red(prompt: str) -> float:
        return colour_share(_images(models, [prompt] * len(SEEDS), SEEDS), "red")

    # two colours asked for: the weighted one wins more pixels
    more_red = red("a large (red:1.5) green circle on a white background, center")
    less_red = red("a large red (green:1.5) circle on a white background, center")
    assert more_red > less_red + 0.1, (more_red, less_red)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_draws_the_prompt(models, sampler):
    scenes = [Scene("square", "yellow", "blue", "center", "large"), Scene("circle", "red", "white", "center", "large")]
    images = _images(models, [caption(s) for s in scenes], SEEDS[:2], sampler)
    judged = [judge_image(image) for image in images]
    assert all(j.matches(s) for j, s in zip(judged, scenes)), [(j.colour, j.shape) for j in judged]


def test_lora_teaches_a_new_shape(models, tmp_path):
    """A LoRA trained 300 steps on the demo's stars ("sks") makes stars appear; at multiplier 0
    the same hooked models draw no star."""
    argv = train_helpers.base_argv(
        SHIPPED_MODEL, train_helpers.REPO_ROOT / "examples" / "shapes_demo" / "img", tmp_path, "--network_dim", "8",
        "--network_alpha", "8", "--network_args", "conv_dim=8", "conv_alpha=8", "--learning_rate", "2e-3",
        "--train_batch_size", "4", "--max_train_steps", "300", "--cache_latents",
    )  # fmt: skip
    train_helpers.run_train(argv)
    prompts, seeds = new_shape_prompts(8, 7, shape_demos.LORA_WORD)
    network = apply_lora(models, tmp_path / "lora.safetensors", 1.0)
    try:
        after = shape_fraction(_images(models, prompts, seeds), "star")
        network.set_multiplier(0.0)
        off = shape_fraction(_images(models, prompts, seeds), "star")
    finally:
        network.restore()
    assert after >= 0.6 and off <= 0.15, (after, off)
