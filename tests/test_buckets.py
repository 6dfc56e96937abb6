"""Bucket maths against tables worked out by hand from the sd-scripts rules (SPEC 4.5)."""
from __future__ import annotations

import pytest

from library.buckets import BucketManager, make_bucket_resolutions, parse_resolution, select_bucket
from library.errors import UserError

# 512x512 area (8x8 steps of 64), widths 256..1024: h = min(1024, (64 // (w // 64)) * 64)
#   256->1024 320->768 384->640 448->576 512->512 576->448 640->384 704->320 768->320
#   832..1024->256, plus the transposes and the 512 square
BUCKETS_512 = sorted([
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
])


def test_bucket_list_512() -> None:
    resos = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert len(resos) == 17
    assert resos == BUCKETS_512


def test_bucket_list_small_steps() -> None:
    # 64x64 area in 32-px steps (2x2 = 4 units): widths 32..128 -> 128, 64, 32, 32
    assert make_bucket_resolutions((64, 64), 32, 128, 32) == [(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]


def test_bucket_list_drops_buckets_below_min_size() -> None:
    # 64x64 area in 32-px steps (4 units) with the default max 1024: widths from 160 px on would
    # get a height of (4 // 5) * 32 = 0 px; such buckets (any side < min 32) are not made
    assert make_bucket_resolutions((64, 64), 32, 1024, 32) == [(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]
    # with min 64, the 32-px sides go too and only the square is left
    assert make_bucket_resolutions((64, 64), 64, 1024, 32) == [(64, 64)]


@pytest.mark.parametrize(
    "image, bucket, resized",
    [
        ((512, 512), (512, 512), (512, 512)),
        ((1024, 1024), (512, 512), (512, 512)),
        ((640, 384), (640, 384), (640, 384)),  # exact match wins
        ((100, 100), (512, 512), (512, 512)),  # small images are upscaled
        # AR 2.0: 704x320 (2.2, error 0.2) beats 640x384 (1.67) and 768x320 (2.4); wider bucket -> match width
        ((1000, 500), (704, 320), (704, 352)),
        ((64, 32), (704, 320), (704, 352)),
        # AR 1/3: 256x832 (0.3077) is closest; image AR > bucket AR -> match height: 300*832/900 = 277.3
        ((300, 900), (256, 832), (277, 832)),
        # AR 0.75: 448x576 (0.778) vs 384x640 (0.6): 448x576; image AR < bucket AR -> match width 448
        ((600, 800), (448, 576), (448, 597)),
    ],
)
def test_select_bucket_upscale_table(image: tuple, bucket: tuple, resized: tuple) -> None:
    got_bucket, got_resized, ar_error = select_bucket(image, BUCKETS_512)
    assert got_bucket == bucket
    assert got_resized == resized
    assert ar_error == pytest.approx(bucket[0] / bucket[1] - image[0] / image[1])


@pytest.mark.parametrize(
    "image, bucket, resized",
    [
        ((300, 200), (256, 192), (300, 200)),  # not larger than 512*512: no resize, floor to steps
        ((512, 512), (512, 512), (512, 512)),
        # 1024x768 (AR 4/3) to 262144 px: 591.2x443.4; width-first 576x384 (AR 1.5) vs height-first 512x384 (AR 4/3)
        ((1024, 768), (512, 384), (512, 384)),
        # 2000x500 (AR 4): 1024x256 either way; a tie keeps the height-first variant
        ((2000, 500), (1024, 256), (1024, 256)),
        # 1000x700 (AR 1.4286): 612x428 -> width-first 576x384 (AR 1.5, err .071) beats 512x384 (err .095)
        ((1000, 700), (576, 384), (576, 403)),
        ((40, 40), (0, 0), (40, 40)),  # narrower than one step: bucket 0 (the dataset skips such images)
    ],
)
def test_select_bucket_no_upscale_table(image: tuple, bucket: tuple, resized: tuple) -> None:
    got_bucket, got_resized, _ = select_bucket(image, None, no_upscale=True, max_area=512 * 512, reso_steps=64)
    assert got_bucket == bucket
    assert got_resized == resized


def test_bucket_manager_assigns_and_sorts() -> None:
    manager = BucketManager(False, (512, 512), 256, 1024, 64)
    manager.make_buckets()
    for key, size in (("wide", (1000, 500)), ("square", (300, 300)), ("wide2", (2000, 1000))):
        reso, _, _ = manager.select_bucket(*size)
        manager.add_image(reso, key)
    manager.sort()
    assert manager.resos == [(512, 512), (704, 320)]
    assert manager.buckets == [["square"], ["wide", "wide2"]]


@pytest.mark.parametrize("value, expected", [("512", (512, 512)), ("512,768", (512, 768)), (640, (640, 640)),
                                             ([320, 256], (320, 256)), (None, None)])
def test_parse_resolution(value: object, expected: object) -> None:
    assert parse_resolution(value) == expected


def test_parse_resolution_error_names_flag() -> None:
    with pytest.raises(UserError, match="--resolution"):
        parse_resolution("512x512")
