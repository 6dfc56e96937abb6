"""Procedural scenes (one coloured shape on a coloured background) with captions, and a judge.

The tiny pretrained model (`tools/train_tiny_base_model.py`) learns from these scenes, the
LoRA / DreamBooth / TI demos teach it a shape it has never seen (`EXTRA_SHAPES`), and the
quality benchmark and picture tests read generated images back with `judge_image`: a colour
histogram over a fixed palette plus template matching of the foreground mask. Everything is
deterministic: a scene comes from `(seed, index)` alone, and drawing it uses no randomness.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from library.io_util import write_text_atomic

# Saturated, well separated colours: a nearest-palette classifier then tolerates the blur and
# colour drift of a small diffusion model's output.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# never drawn for the base model: the concepts the fine-tuning demos teach
EXTRA_SHAPES: tuple[str, ...] = ("star", "cross")
SHAPES: tuple[str, ...] = BASE_SHAPES + EXTRA_SHAPES
# anchor of the shape's centre in the free area of the image, (x, y) in [0, 1]
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.0, 0.0),
    "top": (0.5, 0.0),
    "top right": (1.0, 0.0),
    "left": (0.0, 0.5),
    "center": (0.5, 0.5),
    "right": (1.0, 0.5),
    "bottom left": (0.0, 1.0),
    "bottom": (0.5, 1.0),
    "bottom right": (1.0, 1.0),
}
# side of the shape's bounding box as a fraction of the image side
SIZES: dict[str, float] = {"small": 0.3, "medium": 0.45, "large": 0.6}
MARGIN = 0.06  # free border around a shape pushed to an edge, fraction of the image side
SUPERSAMPLE = 4  # drawn at 4x and reduced, for anti-aliased edges like a photographed scene
TEMPLATE_SIZE = 24


@dataclass(frozen=True)
class Scene:
    """One picture: what is drawn, where, and the small jitter that keeps pictures varied."""

    shape: str
    colour: str
    background: str
    position: str
    size: str
    offset: tuple[float, float] = (0.0, 0.0)  # jitter of the centre, fraction of the image side
    scale: float = 1.0  # jitter of the side

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOURS, "colour"),
            (self.background, COLOURS, "background"),
            (self.position, tuple(POSITIONS), "position"),
            (self.size, tuple(SIZES), "size"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background is invisible")


def caption(scene: Scene, shape_word: str | None = None) -> str:
    """'a large red circle on a blue background, top left' (medium size is not named).

    `shape_word` replaces the shape's name, e.g. a rare token such as "sks" for a new concept.
    """
    size_word = "" if scene.size == "medium" else f"{scene.size} "
    word = shape_word if shape_word is not None else scene.shape
    return f"a {size_word}{scene.colour} {word} on a {scene.background} background, {scene.position}"


def random_scene(
    rng: np.random.Generator,
    shapes: Sequence[str] = BASE_SHAPES,
    colours: Sequence[str] = COLOURS,
    jitter: bool = True,
) -> Scene:
    """A scene drawn uniformly from the given shapes and colours (background != colour)."""
    shape = shapes[int(rng.integers(len(shapes)))]
    colour = colours[int(rng.integers(len(colours)))]
    backgrounds = [c for c in colours if c != colour]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    position = tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
    if not jitter:
        return Scene(shape, colour, background, position, size)
    offset = (float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03)))
    return Scene(shape, colour, background, position, size, offset, float(rng.uniform(0.9, 1.1)))


def make_scenes(count: int, seed: int, shapes: Sequence[str] = BASE_SHAPES, jitter: bool = True) -> list[Scene]:
    """`count` scenes; scene i depends only on (seed, i), so a longer list extends a shorter one."""
    return [random_scene(np.random.default_rng([seed, i]), shapes, jitter=jitter) for i in range(count)]


def _shape_polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    if shape == "star":
        # centred on its bounding box, so a star's position reads like any other shape's
        points = _star_points(half)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        dx, dy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        return [(cx + x - dx, cy + y - dy) for x, y in points]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "cross":
        a = half / 3  # half the arm width
        return [
            (cx - a, cy - half), (cx + a, cy - half), (cx + a, cy - a), (cx + half, cy - a),
            (cx + half, cy + a), (cx + a, cy + a), (cx + a, cy + half), (cx - a, cy + half),
            (cx - a, cy + a), (cx - half, cy + a), (cx - half, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    return None


def _star_points(half: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = half if k % 2 == 0 else half * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        polygon = _shape_polygon(shape, cx, cy, half)
        if polygon is None:
            raise ValueError(f"unknown shape {shape!r}")
        draw.polygon(polygon, fill=fill)


def draw_scene(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a `size` x `size` RGB image (deterministic, anti-aliased)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    side = SIZES[scene.size] * scene.scale * big
    half = side / 2
    free = big - 2 * (MARGIN * big + half)  # range the centre can move in
    ax, ay = POSITIONS[scene.position]
    cx = MARGIN * big + half + ax * free + scene.offset[0] * big
    cy = MARGIN * big + half + ay * free + scene.offset[1] * big
    _draw_shape(ImageDraw.Draw(image), scene.shape, cx, cy, half, PALETTE[scene.colour])
    return image.resize((size, size), Image.Resampling.BOX)


def scenes_to_array(scenes: Iterable[Scene], size: int = 64) -> np.ndarray:
    """uint8 array [N, size, size, 3] of the drawn scenes."""
    return np.stack([np.asarray(draw_scene(s, size)) for s in scenes])


def write_scene_folder(
    folder: str | Path,
    scenes: Sequence[Scene],
    size: int = 64,
    shape_word: str | None = None,
    caption_extension: str = ".txt",
    prefix: str = "scene",
) -> list[Path]:
    """Write each scene as `<prefix>_0000.png` with its caption beside it (a DreamBooth-style
    folder with caption files). Returns the image paths."""
    from library.sampling import save_png  # sampling pulls in the diffusers stack; only needed here

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes):
        image_path = folder / f"{prefix}_{i:04d}.png"
        save_png(draw_scene(scene, size), image_path)
        write_text_atomic(image_path.with_suffix(caption_extension), caption(scene, shape_word) + "\n")
        paths.append(image_path)
    return paths


# ------------------------------------------------------------------------------------ judge
@dataclass
class Judgement:
    """What `judge_image` read from a picture. `shape` / `colour` are None when no foreground
    was found; `shape_scores` are the IoU of the foreground with each shape's template."""

    background: str
    colour: str | None
    shape: str | None
    position: str | None
    size_fraction: float
    histogram: dict[str, float]
    shape_scores: dict[str, float] = field(default_factory=dict)

    def matches(self, scene: Scene) -> bool:
        """Colour and shape as asked (the figure the quality benchmark reports)."""
        return self.colour == scene.colour and self.shape == scene.shape


_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


def classify_pixels(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest palette colour of each RGB pixel ([..., 3] -> [...])."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    distances = ((flat[:, None, :] - _PALETTE_ARRAY[None, :, :]) ** 2).sum(-1)
    return distances.argmin(-1).reshape(pixels.shape[:-1])


def colour_histogram(image: Image.Image | np.ndarray) -> dict[str, float]:
    """Fraction of pixels nearest to each palette colour."""
    classes = classify_pixels(np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image))
    counts = np.bincount(classes.ravel(), minlength=len(COLOURS)) / classes.size
    return {name: float(counts[i]) for i, name in enumerate(COLOURS)}


def _crop_to_template(mask: np.ndarray) -> np.ndarray:
    """The bounding box of a boolean / [0, 1] mask scaled to TEMPLATE_SIZE square, in [0, 1]."""
    ys, xs = np.nonzero(mask > 0.5)
    crop = Image.fromarray((mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] * 255).astype(np.uint8))
    return np.asarray(crop.resize((TEMPLATE_SIZE, TEMPLATE_SIZE), Image.Resampling.BILINEAR), dtype=np.float32) / 255


def _template(shape: str) -> np.ndarray:
    """Mask of `shape` cropped and scaled the way judge_image treats a foreground region."""
    big = TEMPLATE_SIZE * SUPERSAMPLE
    image = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(image), shape, big / 2, big / 2, big * 0.45, 255)
    return _crop_to_template(np.asarray(image, dtype=np.float32) / 255)


_TEMPLATES: dict[str, np.ndarray] = {}


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _position_name(centre: tuple[float, float], side: float) -> str:
    """The POSITIONS name whose anchor is nearest, undoing draw_scene's placement for a shape
    of this side (a large shape's centre moves over a small range only)."""
    free = max(1 - 2 * (MARGIN + side / 2), 1e-3)
    anchor = [min(max((c - MARGIN - side / 2) / free, 0.0), 1.0) for c in centre]
    return min(POSITIONS, key=lambda name: sum((a - b) ** 2 for a, b in zip(anchor, POSITIONS[name])))


def judge_image(image: Image.Image | np.ndarray, shapes: Sequence[str] = BASE_SHAPES) -> Judgement:
    """Read background colour, shape colour, shape (one of `shapes`), position and size.

    The background is the palette colour of most border pixels; the foreground is the largest
    connected region of pixels of another palette colour; its colour is that region's most
    common palette colour, its shape the template with the best overlap once the region's
    bounding box is scaled to the template size.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    h, w = pixels.shape[:2]
    classes = classify_pixels(pixels)
    histogram = {name: float(v) for name, v in zip(COLOURS, np.bincount(classes.ravel(), minlength=len(COLOURS)) / classes.size)}
    border = np.concatenate([classes[0], classes[-1], classes[:, 0], classes[:, -1]])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    from scipy import ndimage  # the judge only: drawing scenes (training data) does without scipy

    labels, count = ndimage.label(classes != background)
    if count == 0:
        return Judgement(COLOURS[background], None, None, None, 0.0, histogram)
    region_sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    region = labels == (int(np.argmax(region_sizes)) + 1)
    # specks of a few pixels are noise, not a shape
    if region.sum() < max(4, 0.005 * h * w):
        return Judgement(COLOURS[background], None, None, None, 0.0, histogram)
    colour = int(np.bincount(classes[region], minlength=len(COLOURS)).argmax())
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    mask = _crop_to_template(region.astype(np.float32))
    scores = {}
    for shape in shapes:
        if shape not in _TEMPLATES:
            _TEMPLATES[shape] = _template(shape)
        scores[shape] = _soft_iou(mask, _TEMPLATES[shape])
    side = max(y1 - y0, x1 - x0) / max(h, w)
    position = _position_name(((x0 + x1) / 2 / w, (y0 + y1) / 2 / h), side)
    return Judgement(
        background=COLOURS[background],
        colour=COLOURS[colour],
        shape=max(scores, key=scores.get),
        position=position,
        size_fraction=float(side),
        histogram=histogram,
        shape_scores=scores,
    )
