"""The data of the shapes demos (examples/shapes_demo/): a new shape for the tiny model to learn.

The LoRA, DreamBooth and textual-inversion demos teach the shipped tiny shapes model
(docs/tiny_model.md) a cross, a shape its training pictures never had (the textual-inversion
demo: a new word for its square). Their pictures are drawn
by `library.shape_scenes` and committed; `write_demo_data` draws them again, bit for bit, so
the folders can be checked and rebuilt:

    python3 -c "from library.shape_demos import write_demo_data; write_demo_data('examples/shapes_demo')"
"""
from __future__ import annotations

from pathlib import Path

from library.shape_scenes import BASE_SHAPES, make_scenes, write_scene_folder

# a cross, not a star: a star's points are finer than what the model's VAE keeps at 64 px
# (8 × 8 latents): encoded and decoded, 2 of 24 stars but 18 of 24 crosses were still read
# as such (docs/tiny_model.md)
NEW_SHAPE = "cross"
LORA_WORD = "sks"  # the LoRA / DreamBooth demos' word for the new shape (a rare CLIP token)
# textual inversion trains one embedding for a frozen U-Net, so it can only name what that U-Net
# already draws: its demo gives the model's own square a new word, starting from "circle"
TI_SHAPE = "square"
TI_TOKEN = "myshape"  # the TI demo's token string (not in the CLIP vocabulary)
TI_INIT_WORD = "circle"
NUM_IMAGES = 12
NUM_REG_IMAGES = 24
REPEATS = 10
IMAGE_SEED = 1000  # the demo pictures' scenes; no other seed of the project draws from it
REG_SEED = 1001
# sub-folders, DreamBooth style: <repeats>_<class>
LORA_FOLDER = f"img/{REPEATS}_{LORA_WORD}"
TI_FOLDER = f"ti_img/{REPEATS}_{TI_TOKEN}"
REG_FOLDER = "reg/1_shape"


def write_demo_data(root: str | Path) -> dict[str, list[Path]]:
    """Write the three picture folders under `root`; returns the image paths of each."""
    root = Path(root)
    new_shapes = make_scenes(NUM_IMAGES, IMAGE_SEED, (NEW_SHAPE,))
    return {
        LORA_FOLDER: write_scene_folder(root / LORA_FOLDER, new_shapes, shape_word=LORA_WORD, prefix=NEW_SHAPE),
        TI_FOLDER: write_scene_folder(
            root / TI_FOLDER, make_scenes(NUM_IMAGES, IMAGE_SEED, (TI_SHAPE,)), shape_word=TI_TOKEN, prefix=TI_SHAPE
        ),
        REG_FOLDER: write_scene_folder(root / REG_FOLDER, make_scenes(NUM_REG_IMAGES, REG_SEED, BASE_SHAPES), prefix="reg"),
    }
