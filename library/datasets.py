"""DreamBooth and fine-tuning datasets, the dataset group and its batch keys (docs/architecture.md).

`dataset_group[(epoch, batch_index)]` returns one batch dict: `captions`, `latents`, `images`,
`loss_weights`, `absolute_paths`. The epoch's batch order and every random choice of an
item come from the group seed, so worker processes share no state and a resumed run sees the
same batches. Epochs are 0-based.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from library import latent_cache
from library.buckets import BucketManager, cover_size
from library.captions import CaptionSettings, process_caption, read_caption, read_metadata_file, update_tag_frequency
from library.errors import UserError
from library.image_util import (
    color_aug,
    crop_target_face,
    face_info_from_stem,
    flip_horizontal,
    glob_images,
    load_image,
    random_crop_to,
    read_image_size,
    to_model_tensor,
    trim_and_resize,
)
from library.input_checks import DREAMBOOTH_LAYOUT, round_resolution

logger = logging.getLogger(__name__)

Reso = tuple[int, int]


@dataclass
class ImageInfo:
    image_key: str
    num_repeats: int
    caption: str
    is_reg: bool
    absolute_path: str
    subset_index: int = 0
    image_size: Reso | None = None  # actual (w, h); None when only an npz exists
    train_resolution: Reso | None = None  # fine-tuning bucket from metadata
    bucket_reso: Reso | None = None
    resized_size: Reso | None = None
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None
    latents_npz: str | None = None
    latents_npz_flipped: str | None = None
    npz_prepared: bool = False  # npz written by prepare_buckets_latents.py


# Subset settings as the dataset config names them (defaults = sd-scripts built-in defaults);
# library.config_util fills them in by its lookup order and re-exports them under these names.
@dataclass
class BaseSubsetParams(CaptionSettings):
    image_dir: str | None = None
    num_repeats: int = 1
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False


@dataclass
class DreamBoothSubsetParams(BaseSubsetParams):
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"


@dataclass
class FineTuningSubsetParams(BaseSubsetParams):
    metadata_file: str | None = None


# A dataset's subsets: the settings plus what scanning found.
@dataclass
class BaseSubset(BaseSubsetParams):
    img_count: int = 0


@dataclass
class DreamBoothSubset(BaseSubset, DreamBoothSubsetParams):
    pass


@dataclass
class FineTuningSubset(BaseSubset, FineTuningSubsetParams):
    pass


@dataclass
class BaseDataset:
    """Images of one `[[datasets]]` entry, assigned to buckets."""

    subsets: list[BaseSubset]
    batch_size: int = 1
    resolution: Reso | None = None
    enable_bucket: bool = False
    min_bucket_reso: int | None = 256
    max_bucket_reso: int | None = 1024
    bucket_reso_steps: int | None = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0
    debug_dataset: bool = False
    max_token_length: int | None = None
    image_data: dict[str, ImageInfo] = field(default_factory=dict)
    num_train_images: int = 0
    num_reg_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    bucket_info: dict[str, Any] | None = None
    bucket_manager: BucketManager | None = None
    is_dreambooth: bool = True

    def _check_settings(self, predefined_buckets: bool = False) -> None:
        if self.resolution is None:
            raise UserError("--resolution (or `resolution` in the dataset config) is required")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")
        if not predefined_buckets:  # the VAE floors sizes: round to what will really train, and say so
            self.resolution = round_resolution(self.resolution, self.bucket_reso_steps if self.enable_bucket else None)
        if self.enable_bucket and not predefined_buckets:
            if min(self.resolution) < (self.min_bucket_reso or 0):
                raise UserError(f"min_bucket_reso {self.min_bucket_reso} is larger than the resolution {self.resolution}")
            if max(self.resolution) > (self.max_bucket_reso or 1 << 30):
                raise UserError(f"max_bucket_reso {self.max_bucket_reso} is smaller than the resolution {self.resolution}")
        else:  # as sd-scripts: these are unused and reported as None without bucketing
            self.min_bucket_reso = self.max_bucket_reso = self.bucket_reso_steps = None
            self.bucket_no_upscale = False

    @property
    def width(self) -> int:
        return self.resolution[0]  # type: ignore[index]

    @property
    def height(self) -> int:
        return self.resolution[1]  # type: ignore[index]

    def subset_of(self, info: ImageInfo) -> BaseSubset:
        return self.subsets[info.subset_index]

    def make_buckets(self) -> None:
        """Assign every image a bucket and build the bucket lists (with repeats)."""
        predefined = [i.train_resolution for i in self.image_data.values() if i.train_resolution is not None]
        if predefined and len(predefined) == len(self.image_data):
            manager = BucketManager(False, None, None, None, None)
            manager.set_predefined_resos(predefined)
            for info in self.image_data.values():
                info.bucket_reso = info.train_resolution
                info.resized_size = cover_size(info.image_size, info.bucket_reso) if info.image_size else info.bucket_reso
        elif self.enable_bucket:
            manager = BucketManager(
                self.bucket_no_upscale, self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
            )
            if not self.bucket_no_upscale:
                manager.make_buckets()
            else:
                logger.info("bucket_no_upscale: min/max_bucket_reso are ignored; buckets follow the image sizes")
        else:
            manager = BucketManager(False, self.resolution, None, None, None)
            manager.set_predefined_resos([self.resolution])  # type: ignore[list-item]
        ar_errors, upscaled = [], []
        for key, info in list(self.image_data.items()):
            if info.bucket_reso is None:
                if info.image_size is None:
                    raise UserError(f"no image file for {info.image_key} and no train_resolution in its metadata")
                info.bucket_reso, info.resized_size, ar_error = manager.select_bucket(*info.image_size)
                ar_errors.append(abs(ar_error))
            if min(info.bucket_reso) < 8:
                logger.warning(f"skipping {info.absolute_path}: {info.image_size} is smaller than one bucket step")
                self._drop(key)
                continue
            if info.image_size and info.resized_size and info.resized_size[0] > info.image_size[0]:
                upscaled.append(f"{info.absolute_path} {info.image_size[0]}x{info.image_size[1]}")
        if upscaled:
            more = f" (and {len(upscaled) - 5} more)" if len(upscaled) > 5 else ""
            logger.warning(f"{len(upscaled)} image(s) smaller than their bucket are upscaled: {', '.join(upscaled[:5])}{more}")
        if not self.image_data:
            raise UserError("no usable images left after bucketing (all were too small)")
        for info in self.image_data.values():
            for _ in range(info.num_repeats):
                manager.add_image(info.bucket_reso, info.image_key)  # type: ignore[arg-type]
        manager.sort()
        self.bucket_manager = manager
        if self.enable_bucket:
            buckets = {i: {"resolution": list(r), "count": len(b)} for i, (r, b) in enumerate(zip(manager.resos, manager.buckets))}
            mean_error = float(np.mean(ar_errors)) if ar_errors else 0.0
            self.bucket_info = {"buckets": buckets, "mean_img_ar_error": mean_error}
            for i, bucket in buckets.items():
                logger.info(f"bucket {i}: resolution {tuple(bucket['resolution'])}, count: {bucket['count']}")
            logger.info(f"mean aspect-ratio error (without repeats): {mean_error}")

    def _drop(self, key: str) -> None:
        info = self.image_data.pop(key)
        subset = self.subset_of(info)
        subset.img_count -= 1
        if info.is_reg:
            self.num_reg_images -= subset.num_repeats
        else:
            self.num_train_images -= subset.num_repeats

    def num_batches(self) -> int:
        assert self.bucket_manager is not None, "make_buckets() first"
        return sum(math.ceil(len(b) / self.batch_size) for b in self.bucket_manager.buckets)

    def epoch_batches(self, rng: np.random.Generator) -> list[list[str]]:
        """This epoch's batches: each bucket's keys shuffled, then cut into batch_size chunks."""
        assert self.bucket_manager is not None
        batches = []
        for bucket in self.bucket_manager.buckets:
            keys = [bucket[i] for i in rng.permutation(len(bucket))]
            batches.extend(keys[i : i + self.batch_size] for i in range(0, len(keys), self.batch_size))
        return batches

    def prepare_image(self, info: ImageInfo, rng: np.random.Generator | None = None) -> np.ndarray:
        """The bucket-sized uint8 image of an item (random crop / face crop only with an rng)."""
        subset = self.subset_of(info)
        image = load_image(info.absolute_path)
        actual = (image.shape[1], image.shape[0])
        resized = info.resized_size if actual == info.image_size else cover_size(actual, info.bucket_reso)  # type: ignore[arg-type]
        if not self.enable_bucket and rng is not None:
            face = face_info_from_stem(Path(info.absolute_path).stem) if subset.face_crop_aug_range else None
            if face is not None:
                return crop_target_face(image, self.resolution, face, subset.face_crop_aug_range, subset.random_crop, rng)  # type: ignore[arg-type]
            if subset.random_crop and actual[0] >= self.width and actual[1] >= self.height:
                return random_crop_to(image, self.resolution, rng)  # type: ignore[arg-type]
        return trim_and_resize(image, info.bucket_reso, resized, subset.random_crop and rng is not None, rng)  # type: ignore[arg-type]

    def load_item(self, info: ImageInfo, rng: np.random.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(image tensor, latents) of one item; exactly one of them is None."""
        subset = self.subset_of(info)
        flipped = subset.flip_aug and rng.random() < 0.5
        if info.latents is not None:
            return None, info.latents_flipped if (flipped and info.latents_flipped is not None) else info.latents
        if info.latents_npz is not None:
            path = info.latents_npz_flipped if (flipped and info.latents_npz_flipped) else info.latents_npz
            return None, latent_cache.load_latents_npz(path)
        image = self.prepare_image(info, rng)
        if subset.color_aug:
            image = color_aug(image, rng)
        if flipped:
            image = flip_horizontal(image)
        return to_model_tensor(image), None

    def _register(self, info: ImageInfo) -> None:
        self.image_data[info.image_key] = info


class DreamBoothDataset(BaseDataset):
    """`<repeats>_<class tokens>` folders with optional caption files; reg images balanced."""

    def __init__(self, subsets: Sequence[DreamBoothSubset], **params: Any) -> None:
        super().__init__(subsets=[], **params)
        self.is_dreambooth = True
        self._check_settings()
        reg_infos: list[ImageInfo] = []
        for subset in subsets:
            if subset.num_repeats < 1:
                logger.warning(f"ignoring {subset.image_dir}: num_repeats is {subset.num_repeats}")
                continue
            image_dir = Path(subset.image_dir or "")
            if not image_dir.is_dir():
                raise UserError(f"image_dir {image_dir} does not exist or is not a folder")
            infos = self._scan_folder(subset, len(self.subsets))
            if not infos:
                logger.warning(f"no images in {image_dir}; this subset is skipped")
                continue
            self.subsets.append(subset)
            subset.img_count = len(infos)
            update_tag_frequency(self.tag_frequency, image_dir.name, [i.caption for i in infos])
            if subset.is_reg:
                self.num_reg_images += subset.num_repeats * len(infos)
                reg_infos.extend(infos)
            else:
                self.num_train_images += subset.num_repeats * len(infos)
                for info in infos:
                    self._register(info)
        if not self.image_data:
            dirs = ", ".join(str(s.image_dir) for s in subsets) or "(no subsets)"
            hint = f": {DREAMBOOTH_LAYOUT}" if self.is_dreambooth else ""
            raise UserError(f"no training images found in {dirs}{hint}")
        self._balance_reg(reg_infos)

    def _scan_folder(self, subset: DreamBoothSubset, subset_index: int) -> list[ImageInfo]:
        infos = []
        missing_captions = 0
        paths = glob_images(subset.image_dir)  # type: ignore[arg-type]
        for path in tqdm(paths, desc=f"reading {Path(subset.image_dir).name}", leave=False, disable=len(paths) < 100):
            try:
                size = read_image_size(path)
            except UserError as err:
                logger.warning(f"skipping image: {err}")
                continue
            caption = read_caption(path, subset.caption_extension)
            if caption is None:
                missing_captions += 1
                caption = subset.class_tokens or ""
            info = ImageInfo(str(path), subset.num_repeats, caption, subset.is_reg, str(path), subset_index, size)
            infos.append(info)
        if missing_captions:
            fallback = f"class tokens {subset.class_tokens!r}" if subset.class_tokens else "an empty caption"
            logger.info(f"{subset.image_dir}: {missing_captions} image(s) without {subset.caption_extension} file use {fallback}")
        return infos

    def _balance_reg(self, reg_infos: list[ImageInfo]) -> None:
        """sd-scripts: add reg images until they match the train count, then +1 repeat per pass."""
        if not reg_infos:
            return
        count, first_pass = 0, True
        while count < self.num_train_images:
            for info in reg_infos:
                if first_pass:
                    self._register(info)
                    count += info.num_repeats
                else:
                    info.num_repeats += 1
                    count += 1
                if count >= self.num_train_images:
                    break
            first_pass = False


class FineTuningDataset(BaseDataset):
    """Images listed in metadata JSON files (merge_*_to_metadata.py / prepare_buckets_latents.py)."""

    def __init__(self, subsets: Sequence[FineTuningSubset], **params: Any) -> None:
        super().__init__(subsets=[], **params)
        self.is_dreambooth = False
        for subset in subsets:
            if subset.num_repeats < 1:
                logger.warning(f"ignoring {subset.metadata_file}: num_repeats is {subset.num_repeats}")
                continue
            metadata = read_metadata_file(subset.metadata_file)  # type: ignore[arg-type]
            if not metadata:
                logger.warning(f"{subset.metadata_file} lists no images; this subset is skipped")
                continue
            infos, tags_list = self._read_entries(subset, len(self.subsets), metadata)
            if not infos:
                continue
            self.subsets.append(subset)
            subset.img_count = len(infos)
            self.num_train_images += subset.num_repeats * len(infos)
            update_tag_frequency(self.tag_frequency, Path(subset.metadata_file).name, tags_list)  # type: ignore[arg-type]
            for info in infos:
                self._register(info)
        if not self.image_data:
            raise UserError(f"no training images found via {', '.join(str(s.metadata_file) for s in subsets)}")
        predefined = self._settle_npz_and_buckets()
        self._check_settings(predefined)

    def _read_entries(self, subset: FineTuningSubset, index: int, metadata: dict) -> tuple[list[ImageInfo], list[str]]:
        infos, tags_list = [], []
        source = subset.metadata_file
        for key, entry in tqdm(metadata.items(), desc=f"reading {Path(source).name}", leave=False, disable=len(metadata) < 100):
            if not isinstance(entry, dict):
                raise UserError(f"{source}: entry {key!r} must be an object with caption/tags")
            path = resolve_image_path(key, subset.image_dir)
            if path is None:
                logger.warning(f"skipping {key!r} from {source}: no image or .npz found (image_dir {subset.image_dir})")
                continue
            size = None
            if not path.endswith(".npz"):
                try:
                    size = read_image_size(path)
                except UserError as err:
                    logger.warning(f"skipping image: {err}")
                    continue
            caption, tags = entry.get("caption"), entry.get("tags")
            if tags:
                tags_list.append(str(tags))
            if caption is None:
                caption = tags
            elif tags:
                caption = f"{caption}, {tags}"
            info = ImageInfo(key, subset.num_repeats, str(caption or ""), False, path, index, size)
            if entry.get("train_resolution") is not None:
                info.train_resolution = _parse_train_resolution(entry["train_resolution"], key, source)
            if not subset.color_aug and not subset.random_crop:
                info.latents_npz, info.latents_npz_flipped = prepared_npz_paths(key, subset.image_dir)
            infos.append(info)
        return infos, tags_list

    def _settle_npz_and_buckets(self) -> bool:
        """Decide whether prepared npz latents are used; True when the metadata defines the buckets."""
        infos = list(self.image_data.values())
        use_npz = all(not (s.color_aug or s.random_crop) for s in self.subsets)
        has = [i.latents_npz is not None and (i.latents_npz_flipped is not None or not self.subset_of(i).flip_aug) for i in infos]
        if use_npz and not any(has):
            use_npz = False
        elif use_npz and not all(has):
            use_npz = False
            logger.warning("some .npz latents are missing (or their _flip.npz with flip_aug); all npz files are ignored")
        all_have_reso = all(i.train_resolution is not None for i in infos)
        if not all_have_reso:
            if use_npz:
                logger.warning("npz files exist but the metadata has no train_resolution; npz files are ignored")
            use_npz = False
            for info in infos:
                info.train_resolution = None
        else:
            if self.bucket_no_upscale:
                raise UserError("bucket_no_upscale cannot be used when the metadata has train_resolution (buckets are precomputed)")
            if not self.enable_bucket:
                logger.info("metadata has bucket info (train_resolution): bucketing enabled")
            self.enable_bucket = True
            if self.resolution is None:
                self.resolution = max((i.train_resolution for i in infos), key=lambda r: r[0] * r[1])  # type: ignore[arg-type]
        for info in infos:
            if use_npz:
                info.npz_prepared = True
            else:
                info.latents_npz = info.latents_npz_flipped = None
                if info.image_size is None:
                    raise UserError(f"{info.image_key}: only an .npz exists but npz latents cannot be used here")
        return all_have_reso


def resolve_image_path(image_key: str, image_dir: str | None) -> str | None:
    """sd-scripts lookup: the key as a path, else `<image_dir>/<key>.<img ext>`, else its .npz."""
    if Path(image_key).is_file():
        return image_key
    if image_dir is not None:
        found = glob_images(image_dir, image_key)
        if found:
            return str(found[0])
        npz = Path(image_dir) / f"{image_key}.npz"
        if npz.is_file():
            return str(npz)
    npz = Path(image_key).with_suffix(".npz")
    return str(npz) if npz.is_file() else None


def prepared_npz_paths(image_key: str, image_dir: str | None) -> tuple[str | None, str | None]:
    """(npz, flipped npz) written by prepare_buckets_latents.py for a key, or None where absent."""
    base = str(Path(image_key).with_suffix("")) if Path(image_key).suffix else image_key
    candidates = [(base + ".npz", base + "_flip.npz")]
    if image_dir is not None:
        candidates.append((str(Path(image_dir) / f"{image_key}.npz"), str(Path(image_dir) / f"{image_key}_flip.npz")))
    for npz, flip in candidates:
        if Path(npz).is_file():
            return npz, flip if Path(flip).is_file() else None
    return None, None


def _parse_train_resolution(value: Any, key: str, source: Any) -> Reso:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    raise UserError(f"{source}: train_resolution of {key!r} must be [width, height], got {value!r}")


class DatasetGroup(torch.utils.data.Dataset):
    """All datasets of a run; indexed by `(epoch, batch_index)`."""

    def __init__(self, datasets: Sequence[BaseDataset], seed: int, max_train_steps: int | None = None,
                 gradient_accumulation_steps: int = 1) -> None:
        self.datasets = list(datasets)
        self.seed = int(seed)
        self.max_train_steps = max_train_steps
        self.steps_divisor = max(1, int(gradient_accumulation_steps))
        self._order_cache: dict[int, list[tuple[int, list[str]]]] = {}
        self.replacements: dict[str, str | list[str]] = {}

    def add_replacement(self, str_from: str, str_to: str | list[str]) -> None:
        """Textual inversion: replace `str_from` in every caption; "" replaces the whole caption
        (a list means one of these templates at random)."""
        self.replacements[str_from] = str_to

    def __len__(self) -> int:
        return sum(d.num_batches() for d in self.datasets)

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        self.max_train_steps = int(max_train_steps)

    def set_step_mapping(self, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> None:
        """How many batch indices make one optimizer step (token warm-up counts optimizer steps)."""
        self.steps_divisor = max(1, int(num_processes) * int(gradient_accumulation_steps))

    def bucket_resolutions(self) -> set[tuple[int, int]]:
        """(width, height) of every bucket that holds an image (known once buckets are made)."""
        return {tuple(info.bucket_reso) for d in self.datasets for info in d.image_data.values() if info.bucket_reso}

    def captions_are_fixed(self) -> bool:
        """True when every epoch shows each image with the same caption, so the training core may
        cache text-encoder outputs per caption: no subset shuffles, drops captions (rate or every
        n epochs) or tags, or warms up tokens, and no replacement picks a random template."""
        if any(isinstance(v, list) for v in self.replacements.values()):
            return False
        return all(
            not (s.shuffle_caption or s.caption_dropout_rate or s.caption_dropout_every_n_epochs
                 or s.caption_tag_dropout_rate or s.token_warmup_step)
            for d in self.datasets for s in d.subsets
        )

    def is_latent_cacheable(self) -> bool:
        return all(not (s.color_aug or s.random_crop) for d in self.datasets for s in d.subsets)

    def epoch_order(self, epoch: int) -> list[tuple[int, list[str]]]:
        """(dataset index, image keys) of every batch of an epoch, in this epoch's seeded order."""
        if epoch not in self._order_cache:
            batches = []
            for index, dataset in enumerate(self.datasets):
                rng = np.random.default_rng([self.seed, epoch, 1 + index])
                batches.extend((index, keys) for keys in dataset.epoch_batches(rng))
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(batches))
            if len(self._order_cache) > 4:
                self._order_cache.clear()
            self._order_cache[epoch] = [batches[i] for i in order]
        return self._order_cache[epoch]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"DatasetGroup is indexed by (epoch, batch_index), got {key!r}")
        epoch, batch_index = int(key[0]), int(key[1])
        order = self.epoch_order(epoch)
        if not 0 <= batch_index < len(order):
            raise IndexError(f"batch index {batch_index} out of range 0..{len(order) - 1}")
        dataset_index, image_keys = order[batch_index]
        dataset = self.datasets[dataset_index]
        step = (epoch * len(order) + batch_index) // self.steps_divisor
        captions, images, latents, weights, paths = [], [], [], [], []
        for position, image_key in enumerate(image_keys):
            info = dataset.image_data[image_key]
            subset = dataset.subset_of(info)
            caption_seq, image_seq = np.random.SeedSequence([self.seed, epoch, batch_index, position]).spawn(2)
            caption_rng, image_rng = np.random.default_rng(caption_seq), np.random.default_rng(image_seq)
            captions.append(process_caption(info.caption, subset, caption_rng, epoch, step, self.max_train_steps,
                                            self.replacements))
            image, latent = dataset.load_item(info, image_rng)
            images.append(image)
            latents.append(latent)
            weights.append(dataset.prior_loss_weight if info.is_reg else 1.0)
            paths.append(info.absolute_path)
        if any(x is None for x in latents) and any(x is not None for x in latents):
            raise UserError("a batch mixes cached and uncached images; cache latents for every image or none")
        return {
            "captions": captions,
            "latents": None if latents[0] is None else torch.stack(latents),
            "images": None if images[0] is None else torch.stack(images),
            "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "absolute_paths": paths,
        }

    def cache_latents(self, vae: torch.nn.Module, vae_batch_size: int = 1, cache_to_disk: bool = False,
                      is_main_process: bool = True) -> int:
        """Cache latents of every image (RAM, or `.npz` beside the image); returns VAE-encoded image count."""
        for dataset in self.datasets:
            for subset in dataset.subsets:
                for flag in ("color_aug", "random_crop"):
                    if getattr(subset, flag):
                        where = getattr(subset, "image_dir", None) or getattr(subset, "metadata_file", None)
                        raise UserError(f"--{flag} cannot be used with --cache_latents / --cache_latents_to_disk (subset {where})")
        encoded = 0
        for dataset in self.datasets:
            infos = list(dataset.image_data.values())
            flips = [dataset.subset_of(i).flip_aug for i in infos]
            encoded += latent_cache.cache_latents(
                infos, flips, dataset.prepare_image, vae, vae_batch_size, cache_to_disk, is_main_process, self.seed
            )
        return encoded

    def metadata_for_training(self, uses_dataset_config: bool, total_batch_size: int | None = None) -> dict[str, str]:
        """Dataset ss_* metadata entries (SPEC 2.5) as strings, for the network's safetensors file."""
        from library.config_util import dataset_group_metadata  # late: config_util imports this module

        return dataset_group_metadata(self, uses_dataset_config, total_batch_size)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Yields this process's `(epoch, batch_index)` keys of one epoch; ranks interleave.

    With several processes every rank yields the same count (short ranks repeat early
    batches) so that collective ops never wait on a finished rank. `start` is the epoch's
    batch index a resumed run continues from (a multiple of world_size): each rank drops its
    first `start // world_size` keys, so a resumed run sees exactly the batches an
    uninterrupted one would. `set_epoch` lets one sampler (and persistent workers) serve
    every epoch.
    """

    def __init__(self, num_batches: int, epoch: int = 0, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} / world_size {world_size}")
        self.num_batches = int(num_batches)
        self.rank, self.world_size = int(rank), int(world_size)
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), max(0, int(start))

    def _indices(self) -> list[int]:
        rounds = math.ceil(self.num_batches / self.world_size)
        indices = [(r * self.world_size + self.rank) % self.num_batches for r in range(rounds)] if self.num_batches else []
        return indices[self.start // self.world_size:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self._indices()])

    def __len__(self) -> int:
        return len(self._indices())


class _KeyedBatches(torch.utils.data.Dataset):
    """`key -> (key, batch)`: the loop reads each batch's key (its epoch and seed) with it."""

    def __init__(self, dataset_group: DatasetGroup) -> None:
        self.dataset_group = dataset_group

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[int, int], dict[str, Any]]:
        return key, self.dataset_group[key]


def _keep_as_is(item: Any) -> Any:  # module level: picklable for worker processes
    return item


def make_dataloader(dataset_group: DatasetGroup, epoch: int = 0, start_batch: int = 0, n_workers: int = 0,
                    persistent: bool = False, rank: int = 0, world_size: int = 1,
                    pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader of `((epoch, batch_index), batch)` for one epoch; the next epoch comes from the same
    loader after `loader.sampler.set_epoch(epoch, start)` (the sampler runs in the main process, so
    persistent workers serve every epoch with the right keys). `n_workers` is capped at the CPU
    count (--max_data_loader_n_workers); `persistent` keeps workers across epochs
    (--persistent_data_loader_workers)."""
    sampler = EpochBatchSampler(len(dataset_group), epoch, start_batch, rank, world_size)
    n_workers = max(0, min(int(n_workers), os.cpu_count() or 1))
    return torch.utils.data.DataLoader(
        _KeyedBatches(dataset_group),
        sampler=sampler,
        batch_size=None,
        collate_fn=_keep_as_is,
        num_workers=n_workers,
        persistent_workers=bool(persistent) and n_workers > 0,
        pin_memory=pin_memory,
        # batches are seeded by their keys; an own generator keeps each epoch's iterator from
        # drawing worker seeds out of the global RNG
        generator=torch.Generator().manual_seed(dataset_group.seed),
    )


def debug_dataset(dataset_group: DatasetGroup, epoch: int = 0, max_batches: int | None = None) -> list[dict[str, Any]]:
    """Log what the model will see (path, bucket, size, caption) for the first batches of an epoch."""
    rows = []
    count = len(dataset_group) if max_batches is None else min(max_batches, len(dataset_group))
    for batch_index in range(count):
        batch = dataset_group[(epoch, batch_index)]
        tensor = batch["latents"] if batch["latents"] is not None else batch["images"]
        scale = 8 if batch["latents"] is not None else 1
        size = (tensor.shape[3] * scale, tensor.shape[2] * scale)
        for path, caption, weight in zip(batch["absolute_paths"], batch["captions"], batch["loss_weights"].tolist()):
            row = {"epoch": epoch, "batch": batch_index, "path": path, "size": size, "caption": caption, "loss_weight": weight}
            logger.info(f"epoch {epoch} batch {batch_index}: {path} size {size[0]}x{size[1]} weight {weight} caption: {caption!r}")
            rows.append(row)
    return rows
