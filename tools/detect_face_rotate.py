"""Find faces, rotate each image so the face is upright (eyes level), and crop around it.

    python tools/detect_face_rotate.py --src_dir photos --dst_dir faces --rotate --crop_size 512,512

Output: `<dst_dir>/<stem>[_NN]_<cx>_<cy>_<fw>_<fh>.png` with the face centre and size in the
written image, the names that training's --face_crop_aug_range reads. The detector is
scikit-image's bundled LBP frontal-face cascade (photos; no download).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from library import face_rotate as fr  # noqa: E402
from library.captioning import find_images, iter_image_batches  # noqa: E402
from library.cli import run_main  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.io_util import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src_dir", type=str, help="folder of the images")
    parser.add_argument("--dst_dir", type=str, help="folder for the output images")
    parser.add_argument("--rotate", action="store_true", help="rotate each image so the face is upright")
    parser.add_argument("--resize_fit", action="store_true", help="resize so the crop fills the image's shorter side")
    parser.add_argument("--resize_face_size", type=int, default=None, help="resize so the face is this many pixels before cropping")
    parser.add_argument("--crop_size", type=str, default=None, help="crop 'width,height' pixels centred on the face")
    parser.add_argument("--crop_ratio", type=str, default=None,
                        help="crop 'horizontal,vertical' multiples of the face size centred on the face (no resize)")
    parser.add_argument("--min_size", type=int, default=None, help="skip faces smaller than this (pixels, included)")
    parser.add_argument("--max_size", type=int, default=None, help="skip faces of this size or larger (pixels)")
    parser.add_argument("--multiple_faces", action="store_true", help="write one image per face (<stem>_01_..., _02_...)")
    parser.add_argument("--debug", action="store_true", help="draw the face box on the output")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = setup_parser().parse_args(argv)
    if not args.src_dir or not args.dst_dir:
        raise UserError("--src_dir and --dst_dir are required")
    settings = fr.CropSettings(
        crop_size=fr.parse_pair(args.crop_size, "--crop_size", int),
        crop_ratio=fr.parse_pair(args.crop_ratio, "--crop_ratio", float),
        resize_fit=args.resize_fit,
        resize_face_size=args.resize_face_size,
    )
    settings.check()
    paths = find_images(args.src_dir)
    dst = Path(args.dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    written = 0
    for (item,) in tqdm(iter_image_batches(paths, 1), total=len(paths), desc="faces"):
        faces = fr.detect_faces(item.data)
        faces = [f for f in faces if (args.min_size is None or f.size >= args.min_size)
                 and (args.max_size is None or f.size < args.max_size)]
        if not faces:
            logger.info("no face found in %s", item.path)
            continue
        if args.multiple_faces:
            faces = sorted(faces, key=lambda f: -f.size)
        else:
            faces = faces[:1]
        for index, face in enumerate(faces, start=1):
            image = fr.rotate_about(item.data, face.angle, face.cx, face.cy) if args.rotate else item.data
            image, box = fr.crop_around_face(image, face, settings, str(item.path))
            if args.debug:
                image = fr.draw_face_box(image, box)
            stem = fr.face_file_stem(item.path.stem, index if args.multiple_faces else None, box)
            with atomic_path(dst / f"{stem}.png") as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
            logger.info("%s: face at (%d, %d), size %d, angle %.0f -> %s.png", item.path.name, face.cx, face.cy,
                        face.size, face.angle, stem)
            written += 1
    logger.info("wrote %d face images to %s", written, dst)


if __name__ == "__main__":
    sys.exit(run_main(main))
