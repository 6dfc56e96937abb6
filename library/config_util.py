"""Dataset config (`--dataset_config` TOML/JSON, sd-scripts M23 schema) and the blueprint built from it or from flags.

Lookup order for every value: subset -> dataset -> general -> argparse flags -> built-in default.
Which keys are legal depends on the script (DreamBooth / fine-tuning / caption dropout support),
as with sd-scripts' ConfigSanitizer. Errors name the key and the config file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import toml
import voluptuous
from voluptuous import Any as AnyOf
from voluptuous import ExactSequence, MultipleInvalid, Required, Schema

from library.buckets import parse_resolution
from library.datasets import (  # noqa: F401 - *SubsetParams are part of this module's API (as in sd-scripts)
    BaseSubsetParams,
    DatasetGroup,
    DreamBoothDataset,
    DreamBoothSubset,
    DreamBoothSubsetParams,
    FineTuningDataset,
    FineTuningSubset,
    FineTuningSubsetParams,
)
from library.errors import UserError
from library.input_checks import DREAMBOOTH_LAYOUT

logger = logging.getLogger(__name__)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset_config", type=Path, default=None, help="config file for detail settings (.toml or .json)")


class UserConfig(dict):
    """A loaded config that remembers the file it came from (for error messages)."""

    source: str | None = None


def load_user_config(path: str | os.PathLike) -> UserConfig:
    """Read a `.toml` or `.json` dataset config; UserError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset config {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        elif path.suffix.lower() == ".toml":
            data = toml.loads(text)
        else:
            raise UserError(f"dataset config {path} must end in .toml or .json")
    except (UnicodeDecodeError, json.JSONDecodeError, toml.TomlDecodeError) as err:
        raise UserError(f"cannot parse dataset config {path}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"dataset config {path} must hold a table/object at the top level")
    config = UserConfig(data)
    config.source = str(path)
    return config


# --- parameter sets (defaults = sd-scripts built-in defaults) ----------------------------------
# (subset parameter sets: library.datasets.BaseSubsetParams and subclasses, imported above)
@dataclass
class BaseDatasetParams:
    max_token_length: int | None = None
    resolution: tuple[int, int] | None = None
    debug_dataset: bool = False
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass
class DreamBoothDatasetParams(BaseDatasetParams):
    prior_loss_weight: float = 1.0


@dataclass
class FineTuningDatasetParams(BaseDatasetParams):
    pass


@dataclass
class SubsetBlueprint:
    params: DreamBoothSubsetParams | FineTuningSubsetParams


@dataclass
class DatasetBlueprint:
    is_dreambooth: bool
    params: DreamBoothDatasetParams | FineTuningDatasetParams
    subsets: list[SubsetBlueprint]


@dataclass
class DatasetGroupBlueprint:
    datasets: list[DatasetBlueprint]


@dataclass
class Blueprint:
    dataset_group: DatasetGroupBlueprint
    source: str | None = None  # config file, for messages
    extra: dict[str, Any] = field(default_factory=dict)  # runtime params (tokenizer, ...)


# --- schema --------------------------------------------------------------------------------------
def _pair(kind: type) -> Any:
    def validate(value: Any) -> tuple:
        Schema(ExactSequence([AnyOf(kind, int), AnyOf(kind, int)]))(value)
        return tuple(kind(v) for v in value)

    return validate


def _scalar_or_pair(value: Any) -> tuple[int, int]:
    Schema(AnyOf(int, ExactSequence([int, int])))(value)
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ConfigSanitizer:
    SUBSET_ASCENDABLE_SCHEMA = {
        "color_aug": bool,
        "face_crop_aug_range": _pair(float),
        "flip_aug": bool,
        "num_repeats": int,
        "random_crop": bool,
        "shuffle_caption": bool,
        "keep_tokens": int,
        "token_warmup_min": int,
        "token_warmup_step": AnyOf(float, int),
    }
    DO_SUBSET_ASCENDABLE_SCHEMA = {
        "caption_dropout_every_n_epochs": int,
        "caption_dropout_rate": AnyOf(float, int),
        "caption_tag_dropout_rate": AnyOf(float, int),
    }
    DB_SUBSET_ASCENDABLE_SCHEMA = {"caption_extension": str, "class_tokens": str}
    DB_SUBSET_DISTINCT_SCHEMA = {Required("image_dir"): str, "is_reg": bool}
    FT_SUBSET_DISTINCT_SCHEMA = {Required("metadata_file"): str, "image_dir": str}
    DATASET_ASCENDABLE_SCHEMA = {
        "batch_size": int,
        "bucket_no_upscale": bool,
        "bucket_reso_steps": int,
        "enable_bucket": bool,
        "max_bucket_reso": int,
        "min_bucket_reso": int,
        "resolution": _scalar_or_pair,
    }
    ARGPARSE_SPECIFIC_SCHEMA = {
        "debug_dataset": bool,
        "max_token_length": AnyOf(None, int),
        "prior_loss_weight": AnyOf(float, int),
    }
    ARGPARSE_NULLABLE_OPTNAMES = ["face_crop_aug_range", "resolution"]
    ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}

    def __init__(self, support_dreambooth: bool, support_finetuning: bool, support_dropout: bool) -> None:
        if not (support_dreambooth or support_finetuning):
            raise ValueError("ConfigSanitizer needs DreamBooth or fine-tuning support")
        self.support_dreambooth, self.support_finetuning = support_dreambooth, support_finetuning
        dropout = self.DO_SUBSET_ASCENDABLE_SCHEMA if support_dropout else {}
        self.db_subset_schema = {**self.SUBSET_ASCENDABLE_SCHEMA, **self.DB_SUBSET_DISTINCT_SCHEMA,
                                 **self.DB_SUBSET_ASCENDABLE_SCHEMA, **dropout}
        self.ft_subset_schema = {**self.SUBSET_ASCENDABLE_SCHEMA, **self.FT_SUBSET_DISTINCT_SCHEMA, **dropout}
        self.db_dataset_schema = {**self.DATASET_ASCENDABLE_SCHEMA, **self.SUBSET_ASCENDABLE_SCHEMA,
                                  **self.DB_SUBSET_ASCENDABLE_SCHEMA, **dropout, "subsets": [self.db_subset_schema]}
        self.ft_dataset_schema = {**self.DATASET_ASCENDABLE_SCHEMA, **self.SUBSET_ASCENDABLE_SCHEMA,
                                  **dropout, "subsets": [self.ft_subset_schema]}
        self.general_schema = {**self.DATASET_ASCENDABLE_SCHEMA, **self.SUBSET_ASCENDABLE_SCHEMA,
                               **(self.DB_SUBSET_ASCENDABLE_SCHEMA if support_dreambooth else {}), **dropout}
        self.user_config_validator = Schema({"general": self.general_schema, "datasets": [self._validate_dataset]})
        nullable = {name: AnyOf(None, self.general_schema[name]) for name in self.ARGPARSE_NULLABLE_OPTNAMES}
        renamed = {a: self.general_schema[c] for a, c in self.ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME.items()}
        self.argparse_schema = {**self.general_schema, **self.ARGPARSE_SPECIFIC_SCHEMA, **nullable, **renamed}

    def _validate_dataset(self, dataset_config: Any) -> dict:
        if not isinstance(dataset_config, dict):
            raise voluptuous.Invalid("each [[datasets]] entry must be a table")
        subsets = dataset_config.get("subsets", [])
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            raise voluptuous.Invalid("subsets must be a list of tables ([[datasets.subsets]])", path=["subsets"])
        with_metadata = ["metadata_file" in s for s in subsets]
        if subsets and all(with_metadata):
            if not self.support_finetuning:
                raise voluptuous.Invalid("metadata_file (fine-tuning subsets) is not supported by this script")
            return Schema(self.ft_dataset_schema)(dataset_config)
        if not any(with_metadata):
            if not self.support_dreambooth:
                raise voluptuous.Invalid("this script needs fine-tuning subsets with metadata_file")
            return Schema(self.db_dataset_schema)(dataset_config)
        raise voluptuous.Invalid("DreamBooth subsets (image_dir only) and fine-tuning subsets (metadata_file) "
                                 "cannot be mixed in one dataset; split them into separate [[datasets]]")

    def sanitize_user_config(self, user_config: dict, source: str | None = None) -> dict:
        source = source or getattr(user_config, "source", None) or "dataset config"
        try:
            return self.user_config_validator(dict(user_config))
        except MultipleInvalid as err:
            raise UserError(f"invalid dataset config {source}: {_describe_invalid(err)}") from None

    def sanitize_argparse_namespace(self, argparse_namespace: argparse.Namespace | None) -> dict:
        """The dataset-related flag values (config names), type-checked; missing flags are skipped."""
        values: dict[str, Any] = {}
        if argparse_namespace is None:
            return values
        for name, validator in self.argparse_schema.items():
            value = getattr(argparse_namespace, name, None)
            if name == "caption_extension" and getattr(argparse_namespace, "caption_extention", None) is not None:
                value = argparse_namespace.caption_extention  # legacy spelling wins, as in sd-scripts
            if value is None:
                continue
            if name == "resolution":
                value = parse_resolution(value, "--resolution")
            elif name == "face_crop_aug_range" and isinstance(value, str):
                try:
                    value = tuple(float(v) for v in value.split(","))
                except ValueError:
                    raise UserError(f"--face_crop_aug_range must be 'low,high', got {value!r}") from None
            try:
                values[self.ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME.get(name, name)] = Schema(validator)(value)
            except voluptuous.Invalid as err:
                raise UserError(f"--{name}: invalid value {value!r} ({err.msg})") from None
        return values


def _describe_invalid(err: MultipleInvalid) -> str:
    parts = []
    for error in err.errors:
        where = ""
        for item in error.path:
            where += f"[{item}]" if isinstance(item, int) else (f".{item}" if where else str(item))
        message = error.msg or "invalid value (expected [low, high] / [width, height] pairs where pairs are used)"
        if message == "extra keys not allowed":
            message = "unknown key (or not allowed for this script / at this level)"
        elif message.startswith("expected"):
            message = f"wrong type: {message}"
        parts.append(f"{where or '(top level)'}: {message}")
    return "; ".join(parts)


class BlueprintGenerator:
    def __init__(self, sanitizer: ConfigSanitizer) -> None:
        self.sanitizer = sanitizer

    def generate(self, user_config: dict, argparse_namespace: argparse.Namespace | None, **runtime_params: Any) -> Blueprint:
        source = getattr(user_config, "source", None)
        config = self.sanitizer.sanitize_user_config(user_config, source)
        argparse_config = self.sanitizer.sanitize_argparse_namespace(argparse_namespace)
        general = config.get("general", {})
        datasets = []
        for dataset_config in config.get("datasets", []):
            subsets = dataset_config.get("subsets", [])
            is_dreambooth = all("metadata_file" not in s for s in subsets)
            subset_klass = DreamBoothSubsetParams if is_dreambooth else FineTuningSubsetParams
            dataset_klass = DreamBoothDatasetParams if is_dreambooth else FineTuningDatasetParams
            subset_blueprints = [
                SubsetBlueprint(self.generate_params_by_fallbacks(
                    subset_klass, [s, dataset_config, general, argparse_config, runtime_params]))
                for s in subsets
            ]
            params = self.generate_params_by_fallbacks(dataset_klass, [dataset_config, general, argparse_config, runtime_params])
            datasets.append(DatasetBlueprint(is_dreambooth, params, subset_blueprints))
        return Blueprint(DatasetGroupBlueprint(datasets), source, dict(runtime_params))

    @staticmethod
    def generate_params_by_fallbacks(param_klass: type, fallbacks: Sequence[dict]) -> Any:
        defaults = asdict(param_klass())
        return param_klass(**{name: BlueprintGenerator.search_value(name, fallbacks, default)
                              for name, default in defaults.items()})

    @staticmethod
    def search_value(key: str, fallbacks: Sequence[dict], default_value: Any = None) -> Any:
        for candidate in fallbacks:
            value = candidate.get(key)
            if value is not None:
                return value
        return default_value


def generate_dataset_group_by_blueprint(
    blueprint: Blueprint | DatasetGroupBlueprint,
    seed: int | None = None,
    max_train_steps: int | None = None,
    gradient_accumulation_steps: int = 1,
) -> DatasetGroup:
    """Scan folders / metadata, assign buckets and return the DatasetGroup."""
    source = getattr(blueprint, "source", None)
    group_blueprint = blueprint.dataset_group if isinstance(blueprint, Blueprint) else blueprint
    where = f" (in {source})" if source else ""
    if not group_blueprint.datasets:
        raise UserError(f"no datasets defined{where}: add [[datasets]] with [[datasets.subsets]]")
    datasets = []
    for index, dataset_blueprint in enumerate(group_blueprint.datasets):
        if not dataset_blueprint.subsets:
            raise UserError(f"datasets[{index}] has no subsets{where}")
        params = asdict(dataset_blueprint.params)
        params["resolution"] = parse_resolution(params["resolution"])
        if dataset_blueprint.is_dreambooth:
            for sub in dataset_blueprint.subsets:
                if not Path(sub.params.image_dir or "").is_dir():
                    raise UserError(f"image_dir {sub.params.image_dir} not found{where}")
            subsets = [DreamBoothSubset(**asdict(s.params)) for s in dataset_blueprint.subsets]
            datasets.append(DreamBoothDataset(subsets, **params))
        else:
            for sub in dataset_blueprint.subsets:
                if not Path(sub.params.metadata_file or "").is_file():
                    raise UserError(f"metadata_file {sub.params.metadata_file} not found{where}")
                if sub.params.image_dir is not None and not Path(sub.params.image_dir).is_dir():
                    raise UserError(f"image_dir {sub.params.image_dir} not found{where}")
            params.pop("prior_loss_weight", None)
            subsets = [FineTuningSubset(**asdict(s.params)) for s in dataset_blueprint.subsets]
            datasets.append(FineTuningDataset(subsets, **params))
    for dataset in datasets:
        dataset.make_buckets()
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    group = DatasetGroup(datasets, seed, max_train_steps, gradient_accumulation_steps)
    logger.info(f"{len(datasets)} dataset(s): {group.num_train_images} train images with repeats, "
                f"{group.num_reg_images} reg images, {len(group)} batches per epoch")
    return group


def generate_dreambooth_subsets_config_by_subdirs(train_data_dir: str | None = None, reg_data_dir: str | None = None) -> list[dict]:
    """Subset configs from `<repeats>_<class tokens>` folders; folders without the prefix are skipped (logged)."""

    def subsets_of(base: str | None, is_reg: bool) -> list[dict]:
        if base is None:
            return []
        base_path = Path(base)
        flag = "--reg_data_dir" if is_reg else "--train_data_dir"
        if not base_path.is_dir():
            raise UserError(f"{flag} {base_path} not found")
        configs = []
        for sub in sorted(p for p in base_path.iterdir() if p.is_dir()):
            head, _, class_tokens = sub.name.partition("_")
            try:
                repeats = int(head)
            except ValueError:
                logger.warning(f"ignoring folder {sub}: its name does not start with '<repeats>_' (e.g. 10_sks dog)")
                continue
            if repeats < 1:
                logger.warning(f"ignoring folder {sub}: repeats {repeats} < 1")
                continue
            configs.append({"image_dir": str(sub), "num_repeats": repeats, "is_reg": is_reg, "class_tokens": class_tokens})
        if not configs:
            logger.warning(f"{flag} {base_path} has no '<repeats>_<class tokens>' folders")
        return configs

    return subsets_of(train_data_dir, False) + subsets_of(reg_data_dir, True)


def user_config_from_args(args: argparse.Namespace, support_dreambooth: bool = True, support_finetuning: bool = True) -> dict:
    """The config sd-scripts builds from --train_data_dir / --reg_data_dir / --in_json."""
    train_data_dir = getattr(args, "train_data_dir", None)
    in_json = getattr(args, "in_json", None) if support_finetuning else None
    if in_json is not None or not support_dreambooth:
        if in_json is None:
            raise UserError("--in_json is required (or use --dataset_config)")
        subset = {"metadata_file": str(in_json)}
        if train_data_dir is not None:
            subset["image_dir"] = str(train_data_dir)
        return {"datasets": [{"subsets": [subset]}]}
    if train_data_dir is None:
        raise UserError("--train_data_dir is required (or use --dataset_config)")
    subsets = generate_dreambooth_subsets_config_by_subdirs(train_data_dir, getattr(args, "reg_data_dir", None))
    if not any(not s["is_reg"] for s in subsets):
        raise UserError(f"--train_data_dir {train_data_dir} has no '<repeats>_<class tokens>' folders with images: {DREAMBOOTH_LAYOUT}")
    return {"datasets": [{"subsets": subsets}]}


def build_dataset_group(
    args: argparse.Namespace,
    support_dreambooth: bool = True,
    support_finetuning: bool = True,
    support_dropout: bool = True,
    seed: int | None = None,
    **runtime_params: Any,
) -> DatasetGroup:
    """One call for scripts: config file (`--dataset_config`) or flags -> DatasetGroup."""
    blueprint_generator = BlueprintGenerator(ConfigSanitizer(support_dreambooth, support_finetuning, support_dropout))
    config_path = getattr(args, "dataset_config", None)
    if config_path is not None:
        user_config: dict = load_user_config(config_path)
        ignored = [f"--{n}" for n in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, n, None) is not None]
        if ignored:
            logger.warning(f"{', '.join(ignored)} ignored because --dataset_config is given")
    else:
        user_config = user_config_from_args(args, support_dreambooth, support_finetuning)
    blueprint = blueprint_generator.generate(user_config, args, **runtime_params)
    if seed is None:
        seed = getattr(args, "seed", None)
    return generate_dataset_group_by_blueprint(
        blueprint, seed, getattr(args, "max_train_steps", None), getattr(args, "gradient_accumulation_steps", 1) or 1
    )


def dataset_group_metadata(group: DatasetGroup, uses_dataset_config: bool, total_batch_size: int | None = None) -> dict[str, str]:
    """Dataset ss_* metadata (SPEC 2.5): the flag-style keys, or ss_datasets with a config file."""
    meta: dict[str, Any] = {"ss_num_train_images": group.num_train_images, "ss_num_reg_images": group.num_reg_images}
    if not uses_dataset_config:
        dataset = group.datasets[0]
        first = dataset.subsets[0]
        dirs: dict[str, dict] = {}
        reg_dirs: dict[str, dict] = {}
        for subset in dataset.subsets:
            target = reg_dirs if getattr(subset, "is_reg", False) else dirs
            target[os.path.basename(subset.image_dir or "")] = {"n_repeats": subset.num_repeats, "img_count": subset.img_count}
        meta.update({
            "ss_batch_size_per_device": dataset.batch_size,
            "ss_resolution": tuple(dataset.resolution),
            "ss_color_aug": bool(first.color_aug),
            "ss_flip_aug": bool(first.flip_aug),
            "ss_random_crop": bool(first.random_crop),
            "ss_shuffle_caption": bool(first.shuffle_caption),
            "ss_enable_bucket": bool(dataset.enable_bucket),
            "ss_bucket_no_upscale": bool(dataset.bucket_no_upscale),
            "ss_min_bucket_reso": dataset.min_bucket_reso,
            "ss_max_bucket_reso": dataset.max_bucket_reso,
            "ss_keep_tokens": first.keep_tokens,
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_reg_dataset_dirs": json.dumps(reg_dirs),
            "ss_tag_frequency": json.dumps(dataset.tag_frequency),
            "ss_bucket_info": json.dumps(dataset.bucket_info),
        })
        if total_batch_size is not None:
            meta["ss_total_batch_size"] = total_batch_size
        return {k: str(v) for k, v in meta.items()}
    datasets_meta, tag_frequency, dirs = [], {}, {}
    for dataset in group.datasets:
        subsets_meta = []
        for subset in dataset.subsets:
            entry: dict[str, Any] = {
                "img_count": subset.img_count, "num_repeats": subset.num_repeats, "color_aug": bool(subset.color_aug),
                "flip_aug": bool(subset.flip_aug), "random_crop": bool(subset.random_crop),
                "shuffle_caption": bool(subset.shuffle_caption), "keep_tokens": subset.keep_tokens,
            }
            name = None
            if subset.image_dir:
                name = entry["image_dir"] = os.path.basename(subset.image_dir)
            if dataset.is_dreambooth:
                entry["class_tokens"] = subset.class_tokens  # type: ignore[attr-defined]
                entry["is_reg"] = subset.is_reg  # type: ignore[attr-defined]
                if subset.is_reg:  # type: ignore[attr-defined]
                    name = None
            else:
                name = entry["metadata_file"] = os.path.basename(subset.metadata_file)  # type: ignore[attr-defined]
            subsets_meta.append(entry)
            if name is not None:
                unique, n = name, 2
                while unique in dirs:
                    unique, n = f"{name} ({n})", n + 1
                dirs[unique] = {"n_repeats": subset.num_repeats, "img_count": subset.img_count}
        datasets_meta.append({
            "is_dreambooth": dataset.is_dreambooth, "batch_size_per_device": dataset.batch_size,
            "num_train_images": dataset.num_train_images, "num_reg_images": dataset.num_reg_images,
            "resolution": list(dataset.resolution), "enable_bucket": bool(dataset.enable_bucket),
            "min_bucket_reso": dataset.min_bucket_reso, "max_bucket_reso": dataset.max_bucket_reso,
            "tag_frequency": dataset.tag_frequency, "bucket_info": dataset.bucket_info, "subsets": subsets_meta,
        })
        for dir_name, counts in dataset.tag_frequency.items():
            tag_frequency.setdefault(dir_name, counts)  # a folder used by several datasets counts once
    meta.update({"ss_datasets": json.dumps(datasets_meta), "ss_tag_frequency": json.dumps(tag_frequency),
                 "ss_dataset_dirs": json.dumps(dirs)})
    if total_batch_size is not None:
        meta["ss_total_batch_size"] = total_batch_size
    return {k: str(v) for k, v in meta.items()}
