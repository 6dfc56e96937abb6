"""Assign fine-tuning images to buckets (`train_resolution` in the metadata) and cache their latents as `.npz`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library.buckets import BucketManager, parse_resolution  # noqa: E402
from library.captions import read_metadata_file  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.image_util import glob_images, glob_images_recursive, load_image  # noqa: E402
from library.io_util import write_text_atomic  # noqa: E402
from library.latent_cache import prepare_buckets_latents  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("train_data_dir", type=str, help="directory for train images")
    parser.add_argument("in_json", type=str, help="metadata file to input")
    parser.add_argument("out_json", type=str, help="metadata file to output")
    parser.add_argument("model_name_or_path", type=str, help="model (or VAE) to encode latents with")
    parser.add_argument("--v2", action="store_true", help="not used (v2 is detected from the weights)")
    parser.add_argument("--batch_size", type=int, default=1, help="batch size in inference")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None, help="worker processes that read images")
    parser.add_argument("--max_resolution", type=str, default="512,512", help="max resolution in fine tuning (width,height)")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="minimum resolution for buckets")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="maximum resolution for buckets")
    parser.add_argument("--bucket_reso_steps", type=int, default=64, help="steps of resolution for buckets")
    parser.add_argument("--bucket_no_upscale", action="store_true", help="make buckets per image without upscaling")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="use mixed precision")
    parser.add_argument("--full_path", action="store_true", help="use the full path as the image key")
    parser.add_argument("--flip_aug", action="store_true", help="also cache latents of flipped images")
    parser.add_argument("--skip_existing", action="store_true", help="skip images whose npz exists with the right shape")
    parser.add_argument("--recursive", action="store_true", help="also search sub-folders (use with --full_path)")
    return parser


class _ImageReader(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; unreadable files come back as None (logged)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray | None, str | None]:
        try:
            return str(self.paths[index]), load_image(self.paths[index]), None
        except UserError as err:
            return str(self.paths[index]), None, str(err)


def _first(batch: list) -> object:
    return batch[0]


def _image_loader(n_workers: int | None) -> Callable[[Sequence[Path]], Iterator[tuple[Path, np.ndarray | None]]]:
    def load(paths: Sequence[Path]) -> Iterator[tuple[Path, np.ndarray | None]]:
        loader = torch.utils.data.DataLoader(_ImageReader(paths), batch_size=1, num_workers=max(0, n_workers or 0), collate_fn=_first)
        for path, image, error in loader:
            if error is not None:
                logger.warning(f"skipping image: {error}")
            yield Path(path), image

    return load


def main(argv: Sequence[str] | None = None) -> None:
    args = setup_parser().parse_args(argv)
    from library import model_util

    train_data_dir = Path(args.train_data_dir)
    if not train_data_dir.is_dir():
        raise UserError(f"train_data_dir {train_data_dir} not found")
    if args.recursive and not args.full_path:
        raise UserError("--recursive needs --full_path")
    if args.bucket_reso_steps % 8 > 0:
        logger.warning("training resolutions are multiples of 8; --bucket_reso_steps should be too")
    max_reso = parse_resolution(args.max_resolution, "--max_resolution")
    if "," not in args.max_resolution:
        raise UserError(f"--max_resolution must be 'width,height', got {args.max_resolution!r}")
    image_paths = glob_images_recursive(train_data_dir) if args.recursive else glob_images(train_data_dir)
    logger.info(f"found {len(image_paths)} images")
    if not Path(args.in_json).is_file():
        raise UserError(f"metadata file {args.in_json} not found (run merge_captions_to_metadata.py first)")
    metadata = read_metadata_file(args.in_json)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = model_util.load_vae(args.model_name_or_path, dtype).to(device).eval()
    manager = BucketManager(args.bucket_no_upscale, max_reso, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps)
    if not args.bucket_no_upscale:
        manager.make_buckets()
    else:
        logger.info("bucket_no_upscale: min/max_bucket_reso are ignored; buckets follow the image sizes")
    counts = prepare_buckets_latents(
        image_paths, metadata, vae, manager, train_data_dir, max(1, args.batch_size), args.full_path, args.flip_aug,
        args.skip_existing, args.recursive, load_images=_image_loader(args.max_data_loader_n_workers),
    )
    for reso in sorted(counts):
        logger.info(f"bucket {reso}: {counts[reso]} images")
    write_text_atomic(args.out_json, json.dumps(metadata, indent=2))
    logger.info(f"wrote {args.out_json}")


if __name__ == "__main__":
    sys.exit(run_main(main))
