"""The procedural scene generator and the picture judge the tiny model's tests rely on."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from library.shape_scenes import (
    BASE_SHAPES,
    COLOURS,
    EXTRA_SHAPES,
    PALETTE,
    SHAPES,
    Scene,
    caption,
    colour_histogram,
    draw_scene,
    judge_image,
    make_scenes,
    scenes_to_array,
    write_scene_folder,
)


def test_drawing_is_deterministic_and_scenes_extend():
    first = make_scenes(12, seed=5)
    again = make_scenes(20, seed=5)
    assert again[:12] == first  # scene i depends on (seed, i) only
    assert make_scenes(12, seed=6) != first
    assert np.array_equal(scenes_to_array(first), scenes_to_array(again[:12]))
    assert {s.shape for s in make_scenes(200, seed=1)} == set(BASE_SHAPES)


def test_caption_names_what_is_drawn():
    scene = Scene("circle", "red", "blue", "top left", "medium")
    assert caption(scene) == "a red circle on a blue background, top left"
    assert caption(Scene("star", "green", "white", "center", "large"), shape_word="sks") == (
        "a large green sks on a white background, center"
    )
    with pytest.raises(ValueError, match="invisible"):
        Scene("circle", "red", "red", "top", "small")
    with pytest.raises(ValueError, match="unknown shape"):
        Scene("hexagon", "red", "blue", "top", "small")


def test_drawn_pixels_follow_the_scene():
    image = np.asarray(draw_scene(Scene("square", "red", "blue", "top left", "large"), size=64))
    assert image.shape == (64, 64, 3)
    assert tuple(image[10, 10]) == PALETTE["red"]  # inside the square near the top-left corner
    assert tuple(image[60, 60]) == PALETTE["blue"]
    histogram = colour_histogram(image)
    assert histogram["red"] == pytest.approx(0.36, abs=0.03)  # (0.6 side)^2
    assert histogram["blue"] == pytest.approx(0.64, abs=0.03)


def test_judge_reads_held_out_scenes_exactly():
    # seeds never used elsewhere; all shapes including the demo-only ones
    scenes = make_scenes(150, seed=987, shapes=SHAPES)
    for scene, pixels in zip(scenes, scenes_to_array(scenes)):
        judgement = judge_image(pixels, SHAPES)
        assert judgement.matches(scene), (scene, judgement)
        assert (judgement.background, judgement.position) == (scene.background, scene.position), scene


def test_judge_tolerates_blur_and_noise_like_generated_images():
    rng = np.random.default_rng(0)
    scenes = make_scenes(120, seed=4242)
    correct = 0
    for scene, pixels in zip(scenes, scenes_to_array(scenes)):
        blurred = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        noisy = np.clip(blurred + rng.normal(0, 15, blurred.shape), 0, 255).astype(np.uint8)
        correct += judge_image(noisy).matches(scene)
    assert correct / len(scenes) >= 0.95


def test_judge_says_nothing_for_a_plain_image():
    plain = np.full((64, 64, 3), PALETTE["green"], dtype=np.uint8)
    judgement = judge_image(plain)
    assert judgement.background == "green" and judgement.shape is None and judgement.colour is None
    assert judgement.histogram["green"] == 1.0


def test_write_scene_folder(tmp_path):
    scenes = make_scenes(3, seed=0, shapes=EXTRA_SHAPES)
    paths = write_scene_folder(tmp_path / "img", scenes, size=32, shape_word="sks")
    assert [p.name for p in paths] == ["scene_0000.png", "scene_0001.png", "scene_0002.png"]
    for path, scene in zip(paths, scenes):
        assert Image.open(path).size == (32, 32)
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == caption(scene, "sks") + "\n"
    assert set(COLOURS) == set(PALETTE)
