"""`--dataset_config`: kohya's dataset TOML (or JSON) with `[general]`, `[[datasets]]`, `[[datasets.subsets]]`.

Every subset value falls back subset -> dataset -> general -> command line / --config_file -> default,
as in kohya's config_util. Caption keys may sit at any level and apply per subset; bucket, resolution
and batch keys belong to a dataset (or [general]); `image_dir` and `is_reg` to a subset only.
Unlike kohya, values are type-checked, unknown or misplaced keys are errors naming the file, the table
and the key (with a suggestion for a near miss), and keys whose feature is not built yet are refused
unless they are at their off value.

Each dataset becomes one TrainDataset (own buckets, batch size and regularisation balancing);
DatasetGroup serves their batches as one dataset, in an order shuffled across datasets per epoch.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

from library.dataset.buckets import parse_resolutions
from library.dataset.captions import CaptionOptions, normalize_extension
from library.dataset.folders import load_subset, warn_skipped_images
from library.errors import UserError

logger = logging.getLogger(__name__)

# key -> kind; the kinds are checked by _check_type
CAPTION_KEYS = {
    "shuffle_caption": "bool", "caption_separator": "str", "keep_tokens": "int", "keep_tokens_separator": "str",
    "secondary_separator": "str", "enable_wildcard": "bool", "caption_prefix": "str", "caption_suffix": "str",
    "caption_dropout_rate": "float", "caption_dropout_every_n_epochs": "int", "caption_tag_dropout_rate": "float",
}
# valid at every level, used per subset
ASCENDABLE_KEYS = {
    **CAPTION_KEYS, "num_repeats": "int", "caption_extension": "str", "class_tokens": "str",
    "color_aug": "bool", "flip_aug": "bool", "random_crop": "bool", "face_crop_aug_range": "range",
    "token_warmup_min": "int", "token_warmup_step": "float", "cache_info": "bool", "alpha_mask": "bool",
}
SUBSET_ONLY_KEYS = {"image_dir": "str", "is_reg": "bool"}
DATASET_KEYS = {
    "batch_size": "int", "resolution": "resolution", "enable_bucket": "bool", "min_bucket_reso": "int",
    "max_bucket_reso": "int", "bucket_reso_steps": "int", "bucket_no_upscale": "bool", "network_multiplier": "float",
}
LEVEL_KEYS = {
    "general": {**DATASET_KEYS, **ASCENDABLE_KEYS},
    "dataset": {**DATASET_KEYS, **ASCENDABLE_KEYS, "subsets": "subsets"},
    "subset": {**ASCENDABLE_KEYS, **SUBSET_ONLY_KEYS},
}
LEVEL_TABLES = {"general": "[general]", "dataset": "[[datasets]]", "subset": "[[datasets.subsets]]"}
# config key -> the command-line option it falls back to (kohya's names)
CLI_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
# keys not applied per dataset or subset yet: accepted only at the value the whole run uses (the
# command-line option's, else this off value)
OFF_VALUES = {
    "color_aug": False, "flip_aug": False, "random_crop": False, "face_crop_aug_range": None,
    "token_warmup_min": 1, "token_warmup_step": 0, "cache_info": False, "alpha_mask": False,
}
NOT_BUILT_KINDS = {"metadata_file": "fine-tuning subsets (metadata_file)",
                   "conditioning_data_dir": "ControlNet subsets (conditioning_data_dir)"}
TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
              "resolution": "a size, [width, height] or a string like \"384,512,640\"",
              "range": "two numbers, e.g. [2.0, 4.0]"}


# --- reading and checking ----------------------------------------------------------------------------

def read_dataset_config(path: str) -> dict:
    """The file as a dict: `.toml` or `.json`, as kohya accepts; a missing or broken file is one line."""
    from library.config import read_toml

    lower = path.lower()
    if lower.endswith(".toml"):
        if not os.path.isfile(path):
            raise UserError(f"--dataset_config {path}: file not found")
        return read_toml(path)
    if not lower.endswith(".json"):
        raise UserError(f"--dataset_config {path}: expected a .toml or .json file")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"--dataset_config {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object with 'general' and 'datasets'")
    return data


def _check_type(kind: str, value: Any) -> Any:
    """The value converted to its kind (resolution -> (w, h), range -> tuple), or None when it is wrong."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "int":
        return value if is_int else None
    if kind == "float":
        return float(value) if is_int or isinstance(value, float) else None
    if kind == "str":
        return value if isinstance(value, str) else None
    if kind == "resolution":
        if isinstance(value, str):  # the command line's forms: "512", "512,768", "384,512,640", "multires:..."
            try:
                sizes = parse_resolutions(value)
            except UserError:
                return None
            return value if len(sizes) > 1 else sizes[0]
        items = [value] if is_int else value if isinstance(value, list) and len(value) in (1, 2) else []
        if items and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
            return (items[0], items[-1])
        return None
    if kind == "range":
        ok = isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return tuple(float(v) for v in value) if ok else None
    raise ValueError(f"unknown kind {kind}")


def _unknown_key(key: str, level: str) -> str:
    """Why `key` is refused at `level`: misplaced, a near miss, not built, or unknown."""
    from library.config import suggest

    if key in NOT_BUILT_KINDS:
        return f"not supported yet: {NOT_BUILT_KINDS[key]}"
    homes = [LEVEL_TABLES[lv] for lv, keys in LEVEL_KEYS.items() if key in keys]
    if homes:
        return f"{key} belongs in {' or '.join(homes)}, not in {LEVEL_TABLES[level]}"
    hint = suggest(key, list(LEVEL_KEYS[level]))
    return f"unknown key {key!r}" + (f": did you mean {hint}?" if hint else f" in {LEVEL_TABLES[level]}")


def check_table(table: Any, level: str, where: str, path: str) -> dict:
    """A checked copy of one table: known keys for its level, values of the right type, converted."""
    if not isinstance(table, dict):
        raise UserError(f"{path}: {where}: expected a table")
    checked = {}
    for key, value in table.items():
        kind = LEVEL_KEYS[level].get(key)
        if kind is None:
            raise UserError(f"{path}: {where}: {_unknown_key(key, level)}")
        if kind == "subsets":
            checked[key] = value
            continue
        converted = _check_type(kind, value)
        if converted is None:
            raise UserError(f"{path}: {where}: {key} = {value!r}: expected {TYPE_WORDS[kind]}")
        checked[key] = converted
    return checked


def check_config(data: dict, path: str) -> tuple[dict, list[tuple[dict, list[dict]]]]:
    """([general], [(dataset, [subset, ...]), ...]) with every table checked (see check_table)."""
    from library.config import suggest

    for key in data:
        if key not in ("general", "datasets"):
            hint = suggest(key, ["general", "datasets"])
            raise UserError(f"{path}: unknown top-level key {key!r}"
                            + (f": did you mean {hint}?" if hint else ": expected [general] and [[datasets]]"))
    general = check_table(data.get("general", {}), "general", "[general]", path)
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"{path}: no [[datasets]] table: add at least one, with [[datasets.subsets]] image_dir = ...")
    checked = []
    for i, dataset in enumerate(datasets):
        table = check_table(dataset, "dataset", f"datasets[{i}]", path)
        subsets = table.pop("subsets", None)
        if not isinstance(subsets, list) or not subsets:
            raise UserError(f"{path}: datasets[{i}]: no [[datasets.subsets]]: add one with image_dir = ...")
        rows = [check_table(s, "subset", f"datasets[{i}].subsets[{j}]", path) for j, s in enumerate(subsets)]
        for j, row in enumerate(rows):
            if "image_dir" not in row:
                raise UserError(f"{path}: datasets[{i}].subsets[{j}]: image_dir is required (a folder of images)")
        checked.append((table, rows))
    return general, checked


# --- resolving: subset -> dataset -> general -> CLI / --config_file -> default ------------------------

def resolve(key: str, tables: list[dict], cfg) -> Any:
    """kohya's search: the first table that holds a value that is not None, else the option's value."""
    for table in tables:
        if table.get(key) is not None:
            return table[key]
    return getattr(cfg, CLI_NAMES.get(key, key), OFF_VALUES.get(key))


def _applied(key: str, cfg) -> Any:
    """The value the run applies for a key that cannot change per dataset yet: the option's, or off."""
    off = OFF_VALUES[key]
    value = getattr(cfg, key, off)
    return off if value in (None, "") else value


def _check_off(key: str, tables: list[tuple[dict, str]], path: str, cfg) -> None:
    """A key that is not applied per dataset or subset yet may only repeat what the whole run does."""
    found = next(((t[key], where) for t, where in tables if t.get(key) is not None), None)
    if found is None:
        return
    given, where = found
    applied = _applied(key, cfg)
    if given != applied:
        option = f"--{key} for the whole run" if key in vars(cfg) else "it out"
        raise UserError(f"{path}: {where}: not supported yet in a dataset config: {key} = {given!r} "
                        f"(this run uses {applied!r}; leave {option})")


def scoped_cfg(cfg, tables: list[dict], keys) -> argparse.Namespace:
    """A copy of `cfg` with `keys` resolved from `tables`, under their command-line names."""
    scoped = copy.copy(cfg)
    for key in keys:
        value = resolve(key, tables, cfg)
        if key == "resolution" and isinstance(value, tuple):
            value = f"{value[0]},{value[1]}"
        setattr(scoped, CLI_NAMES.get(key, key), value)
    return scoped


@dataclass
class SubsetSpec:
    """One subset as resolved: where its images are and how its captions are processed."""

    image_dir: str
    num_repeats: int
    class_tokens: str
    caption_extension: str
    is_reg: bool
    caption_options: CaptionOptions
    where: str


def resolve_subset(row: dict, dataset: dict, general: dict, cfg, where: str, path: str) -> SubsetSpec:
    tables = [row, dataset, general]
    named = list(zip(tables, [where, where.rsplit(".", 1)[0], "[general]"]))
    for key in OFF_VALUES:
        _check_off(key, named, path, cfg)
    image_dir = row["image_dir"]
    if not os.path.isdir(image_dir):
        raise UserError(f"{path}: {where}: image_dir {image_dir!r}: folder not found")
    caption_cfg = scoped_cfg(cfg, tables, CAPTION_KEYS)
    return SubsetSpec(image_dir, int(resolve("num_repeats", tables, cfg)), resolve("class_tokens", tables, cfg) or "",
                      normalize_extension(resolve("caption_extension", tables, cfg) or ".caption"),
                      bool(row.get("is_reg", False)), CaptionOptions.from_cfg(caption_cfg), where)


# --- building: one TrainDataset per [[datasets]] table -------------------------------------------------

def build_config_datasets(cfg) -> "DatasetGroup":
    """The datasets of cfg.dataset_config, each with its own buckets, batch size and reg balancing."""
    from library.dataset.images import Augmentation
    from library.dataset.loader import BucketSettings, TrainDataset

    path = cfg.dataset_config
    for option in ("train_data_dir", "reg_data_dir"):
        if getattr(cfg, option, None):
            logger.warning("--%s is ignored: --dataset_config %s names the image folders", option, path)
    general, datasets = check_config(read_dataset_config(path), path)
    seed = getattr(cfg, "seed", None) or 0
    built = []
    for i, (table, rows) in enumerate(datasets):
        where = f"datasets[{i}]"
        scoped = scoped_cfg(cfg, [table, general], [k for k in DATASET_KEYS if k != "network_multiplier"])
        try:
            settings = BucketSettings.from_cfg(scoped)
            batch_size = int(scoped.train_batch_size)
            if batch_size < 1:
                raise UserError(f"batch_size {batch_size} must be at least 1")
        except UserError as exc:
            raise UserError(f"{path}: {where}: {exc}") from None
        specs = [resolve_subset(row, table, general, cfg, f"{where}.subsets[{j}]", path) for j, row in enumerate(rows)]
        subsets, records = _load_subsets(specs, settings, path, where, bool(getattr(cfg, "skip_bad_images", False)))
        dataset = TrainDataset(subsets, records, settings, batch_size, seed, CaptionOptions.from_cfg(scoped))
        dataset.augment = Augmentation.from_cfg(cfg)  # per run, not per subset (see OFF_VALUES)
        # kohya reads this key and never applies it; here each batch of the dataset trains at it
        dataset.network_multiplier = float(next((t["network_multiplier"] for t in (table, general)
                                                 if t.get("network_multiplier") is not None), 1.0))
        built.append(dataset)
    return DatasetGroup(built, seed)


def _load_subsets(specs: list[SubsetSpec], settings, path: str, where: str,
                  skip_bad_images: bool) -> tuple[list, list]:
    """Subsets read from their folders, and their records placed in buckets (reg balanced per dataset)."""
    from library.dataset.images import image_size
    from library.dataset.loader import ImageRecord, _split_reg

    subsets, records = [], []
    for spec in specs:
        if spec.num_repeats < 1:  # kohya skips such a subset too
            logger.warning("%s: %s: num_repeats %d is less than 1: subset skipped", path, spec.where, spec.num_repeats)
            continue
        subset = load_subset(spec.image_dir, spec.num_repeats, spec.class_tokens, spec.caption_extension, spec.is_reg,
                             skip_bad_images)
        if not subset.image_paths:
            if not spec.is_reg:
                raise UserError(f"{path}: {spec.where}: no images in {spec.image_dir}")
            logger.warning("%s: %s: no regularization images in %s", path, spec.where, spec.image_dir)
            continue
        subsets.append(subset)
        records += [ImageRecord(p, c, subset.num_repeats, subset.is_reg, image_size(p),
                                caption_options=spec.caption_options)
                    for p, c in zip(subset.image_paths, subset.captions)]
    warn_skipped_images(subsets)
    records = _split_reg(records)
    if not any(not r.is_reg for r in records):
        raise UserError(f"{path}: {where}: no training images (only regularization subsets, or none left)")
    predefined = settings.predefined()
    for record in records:
        settings.place(record, predefined)
    return subsets, records


class DatasetGroup:
    """Several TrainDatasets served as one: item i of an epoch is one batch of one dataset.

    The order interleaves the datasets' batches, shuffled from (seed, epoch) as each dataset's own
    order is, so a resumed run or a DataLoader worker sees the same order.
    """

    def __init__(self, datasets: list, seed: int):
        self.datasets = datasets
        self.seed = seed
        self.epoch = 0
        self._latent_cache = None
        self._order = self._plan(0)
        self.clock = None  # set by build_dataset: the group's batch index gives the optimizer step

    def _plan(self, epoch: int) -> list[tuple[int, int]]:
        order = [(d, j) for d, dataset in enumerate(self.datasets) for j in range(len(dataset))]
        random.Random(f"{self.seed}:{epoch}:datasets").shuffle(order)
        return order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for dataset in self.datasets:
            dataset.set_epoch(epoch)
        self._order = self._plan(epoch)

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, tuple):  # (epoch, i) from EpochSampler, as TrainDataset takes it
            epoch, index = index
            if epoch != self.epoch:
                self.set_epoch(epoch)
        d, j = self._order[index]
        return self.datasets[d][(self.epoch, j, self.clock.step(self.epoch, index) if self.clock else 0)]

    @property
    def records(self) -> list:
        return [r for dataset in self.datasets for r in dataset.records]

    @property
    def variants(self) -> list:
        return [r for dataset in self.datasets for r in dataset.variants]

    @property
    def subsets(self) -> list:
        return [s for dataset in self.datasets for s in dataset.subsets]

    @property
    def batch_size(self) -> int:
        """The largest batch size: what "batches of up to N" means across datasets."""
        return max(dataset.batch_size for dataset in self.datasets)

    @property
    def augment(self):
        """The same for every dataset: augmentations come from the command line only (see OFF_VALUES)."""
        return self.datasets[0].augment

    @property
    def masks(self):
        """The same for every dataset too: mask options come from the command line only."""
        return self.datasets[0].masks

    @property
    def latent_cache(self):
        return self._latent_cache

    @latent_cache.setter
    def latent_cache(self, cache) -> None:
        self._latent_cache = cache
        for dataset in self.datasets:
            dataset.latent_cache = cache

    def cache_latents(self, encode: Callable, batch_size: int = 1, cache=None) -> None:
        """One cache for all datasets; it is keyed by image path (and bucket, with several resolutions), so
        an image may have one resized size per key only."""
        from library.caching import cache_key, cache_latents

        sizes: dict[str, tuple] = {}
        for record in self.variants:
            if sizes.setdefault(cache_key(record), (record.bucket, record.resized)) != (record.bucket, record.resized):
                raise UserError(f"not supported yet: {record.path} is in two datasets at different sizes "
                                "with --cache_latents; give those datasets the same resolution and buckets")
        cache_latents(self, encode, batch_size, cache)

    def verify_bucket_reso_steps(self, min_steps: int) -> None:
        for dataset in self.datasets:
            dataset.verify_bucket_reso_steps(min_steps)

    @property
    def info(self) -> dict:
        """The ss_* facts kohya writes with a dataset config: ss_datasets per dataset, merged dirs and tags."""
        parts = [dataset.info for dataset in self.datasets]
        tags: dict = {}
        for part in parts:
            for name, counts in part["tag_frequency"].items():
                tags.setdefault(name, counts)  # kohya counts a folder used by two datasets once
        return {
            "num_train_images": sum(p["num_train_images"] for p in parts),
            "num_reg_images": sum(p["num_reg_images"] for p in parts),
            "datasets": [_dataset_metadata(d, p) for d, p in zip(self.datasets, parts)],
            "tag_frequency": tags,
            "dataset_dirs": _merged_dirs(self.datasets),
            "reg_dataset_dirs": {k: v for p in parts for k, v in p["reg_dataset_dirs"].items()},
            "bucket_info": None,
            "num_batches_per_epoch": len(self),
        }


def _dataset_metadata(dataset, info: dict) -> dict:
    """One entry of kohya's ss_datasets (train_network.py, dataset-config branch)."""
    options = {r.path: r.caption_options for r in dataset.records}
    subsets = []
    for subset in dataset.subsets:
        opts = options.get(subset.image_paths[0]) or dataset.caption_options
        subsets.append({
            "img_count": subset.img_count, "num_repeats": subset.num_repeats,
            "color_aug": dataset.augment.color, "flip_aug": dataset.augment.flip,
            "random_crop": dataset.augment.random_crop,
            "shuffle_caption": opts.shuffle, "keep_tokens": opts.keep_tokens,
            "keep_tokens_separator": opts.keep_tokens_separator, "secondary_separator": opts.secondary_separator,
            "enable_wildcard": opts.enable_wildcard, "caption_prefix": opts.prefix, "caption_suffix": opts.suffix,
            "image_dir": subset.name, "class_tokens": subset.class_tokens or None, "is_reg": subset.is_reg,
        })
    return {
        "is_dreambooth": True, "batch_size_per_device": dataset.batch_size,
        "num_train_images": info["num_train_images"], "num_reg_images": info["num_reg_images"],
        "resolution": tuple(info["resolution"]), "enable_bucket": bool(info["enable_bucket"]),
        "min_bucket_reso": info["min_bucket_reso"], "max_bucket_reso": info["max_bucket_reso"],
        "tag_frequency": info["tag_frequency"], "bucket_info": info["bucket_info"], "subsets": subsets,
    }


def _merged_dirs(datasets: list) -> dict:
    """kohya's ss_dataset_dirs with a dataset config: train subsets only, a repeated name gets " (2)", ..."""
    dirs: dict[str, dict] = {}
    for dataset in datasets:
        for subset in dataset.subsets:
            if subset.is_reg:
                continue
            name, n = subset.name, 2
            while name in dirs:
                name, n = f"{subset.name} ({n})", n + 1
            dirs[name] = {"n_repeats": subset.num_repeats, "img_count": subset.img_count}
    return dirs
