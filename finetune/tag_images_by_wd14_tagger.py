"""Tag a folder of images with a WD14 tagger (ONNX Runtime; CUDA when available).

    python finetune/tag_images_by_wd14_tagger.py <train_data_dir> --model_dir <folder>

The model folder holds `model.onnx` and `selected_tags.csv` (the layout of the SmilingWolf
repos). Writes `<image stem><caption_extension>` (default `.txt`) beside each image.
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library import wd14_tagger as wd14  # noqa: E402
from library.captioning import (  # noqa: E402
    add_common_caption_arguments,
    caption_extension_of,
    caption_images,
    caption_path,
    find_images,
)
from library.cli import run_main  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_caption_arguments(parser, ".txt")
    parser.add_argument("--repo_id", type=str, default=wd14.DEFAULT_REPO_ID,
                        help=f"hub repo of the tagger, downloaded when not in --model_dir (default {wd14.DEFAULT_REPO_ID})")
    parser.add_argument("--model_dir", type=str, default=wd14.DEFAULT_MODEL_DIR,
                        help="folder of the models: <model_dir>/<repo_id with _ for />, or a folder holding model.onnx")
    parser.add_argument("--force_download", action="store_true", help="download the model again")
    parser.add_argument("--onnx", action="store_true", help="accepted for sd-scripts compatibility; ONNX is the only path")
    parser.add_argument("--thresh", type=float, default=0.35, help="probability a tag needs to be written")
    parser.add_argument("--general_threshold", type=float, default=None, help="threshold of general tags (default --thresh)")
    parser.add_argument("--character_threshold", type=float, default=None, help="threshold of character tags (default --thresh)")
    parser.add_argument("--remove_underscore", action="store_true", help="write tags longer than 3 characters with spaces for _")
    parser.add_argument("--undesired_tags", type=str, default="", help="tags never written, comma separated")
    parser.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    parser.add_argument("--append_tags", action="store_true", help="add the tags to an existing tag file instead of replacing it")
    parser.add_argument("--use_rating_tags", action="store_true", help="write the most likely rating tag first")
    parser.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="write the most likely rating tag last")
    parser.add_argument("--character_tags_first", action="store_true", help="character tags before general tags")
    parser.add_argument("--always_first_tags", type=str, default=None,
                        help="comma-separated tags moved to the front (in this order) when found")
    parser.add_argument("--caption_separator", type=str, default=", ", help="separator between tags in the file")
    parser.add_argument("--tag_replacement", type=str, default=None,
                        help="replace tags: 'source1,target1;source2,target2' (\\, and \\; escape)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)
    settings = wd14.settings_from_args(args)
    paths = find_images(args.train_data_dir, args.recursive)
    folder = wd14.ensure_model_files(args.model_dir, args.repo_id, args.force_download)
    model = wd14.WD14Model(folder)
    logger.info("tagging %d images with %s (input %dpx)", len(paths), folder, model.image_size)
    extension = caption_extension_of(args)
    frequency: Counter = Counter()

    def describe(batch):
        probs = model.predict(np.stack([item.data for item in batch]))
        results = []
        for item, row in zip(batch, probs):
            tags = wd14.select_tags(row, model.tags, settings)
            existing = caption_path(item.path, extension)
            if args.append_tags and existing.is_file():
                tags = wd14.merge_with_existing(existing.read_text(encoding="utf-8"), tags, args.caption_separator)
            frequency.update(tags)
            results.append(args.caption_separator.join(tags))
        return results

    preprocess = functools.partial(wd14.preprocess_image, size=model.image_size)
    caption_images(paths, describe, extension, args.batch_size, args.max_data_loader_n_workers, preprocess, args.debug)
    if args.frequency_tags:
        print(wd14.frequency_report(frequency))


if __name__ == "__main__":
    sys.exit(run_main(main))
