"""`--dataset_config`: kohya's dataset TOML (or JSON) with `[general]`, `[[datasets]]`, `[[datasets.subsets]]`.

Every subset value falls back subset -> dataset -> general -> command line / --config_file -> default,
as in kohya's config_util. Caption, augmentation (flip_aug, color_aug, random_crop, face_crop_aug_range),
token warmup and alpha_mask keys may sit at any level and apply per subset; bucket, resolution and batch
keys belong to a dataset (or [general]); `image_dir`, `is_reg`, `metadata_file` (a fine-tuning subset,
see finetune.py) and `conditioning_data_dir` (kohya's mask images, with --masked_loss) to a subset only.
Unlike kohya, values are type-checked, and unknown or misplaced keys are errors naming the file, the
table and the key (with a suggestion for a near miss).

Each dataset becomes one TrainDataset (own buckets, batch size and regularisation balancing);
group.DatasetGroup serves their batches as one dataset, in an order shuffled across datasets per epoch.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from dataclasses import dataclass, replace
from typing import Any

from library.dataset.buckets import parse_resolutions
from library.dataset.captions import CaptionOptions, normalize_extension
from library.dataset.folders import Subset, load_subset, warn_skipped_images
from library.dataset.group import DatasetGroup
from library.dataset.images import Augmentation
from library.dataset.masks import MaskSource, conditioning_masks
from library.errors import UserError

logger = logging.getLogger(__name__)

# key -> kind; the kinds are checked by _check_type
CAPTION_KEYS = {
    "shuffle_caption": "bool", "caption_separator": "str", "keep_tokens": "int", "keep_tokens_separator": "str",
    "secondary_separator": "str", "enable_wildcard": "bool", "caption_prefix": "str", "caption_suffix": "str",
    "caption_dropout_rate": "float", "caption_dropout_every_n_epochs": "int", "caption_tag_dropout_rate": "float",
    "token_warmup_min": "int", "token_warmup_step": "float",
}
AUGMENT_KEYS = {"color_aug": "bool", "flip_aug": "bool", "random_crop": "bool", "face_crop_aug_range": "range"}
# valid at every level, used per subset
ASCENDABLE_KEYS = {
    **CAPTION_KEYS, **AUGMENT_KEYS, "num_repeats": "int", "caption_extension": "str", "class_tokens": "str",
    "cache_info": "bool", "alpha_mask": "bool",
}
SUBSET_ONLY_KEYS = {"image_dir": "str", "is_reg": "bool", "metadata_file": "str", "conditioning_data_dir": "str"}
# keys of image-folder subsets that a metadata_file subset refuses (its captions come from the file)
FOLDER_ONLY_KEYS = ("is_reg", "class_tokens", "caption_extension", "cache_info")
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
# what a key falls back to when the command line has no such option
DEFAULTS = {"color_aug": False, "flip_aug": False, "random_crop": False, "face_crop_aug_range": None,
            "token_warmup_min": 1, "token_warmup_step": 0, "cache_info": False, "alpha_mask": False}
TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
              "resolution": "a size, [width, height] or a string like \"384,512,640\"",
              "range": "two numbers, e.g. [2.0, 4.0]"}


# --- reading and checking ----------------------------------------------------------------------------

def read_dataset_config(path: str) -> dict:
    """The file as a dict: `.toml` or `.json`, as kohya accepts; a missing or broken file is one line."""
    from library.config import read_json, read_toml  # library.config imports this package

    lower = path.lower()
    if lower.endswith(".toml"):
        if not os.path.isfile(path):
            raise UserError(f"--dataset_config {path}: file not found")
        return read_toml(path)
    if not lower.endswith(".json"):
        raise UserError(f"--dataset_config {path}: expected a .toml or .json file")
    return read_json(path, f"--dataset_config {path}", "an object with 'general' and 'datasets'")


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
    """Why `key` is refused at `level`: misplaced, a near miss, or unknown."""
    from library.config import suggest

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
            if "image_dir" not in row and "metadata_file" not in row:
                raise UserError(f"{path}: datasets[{i}].subsets[{j}]: image_dir is required (a folder of images; "
                                "or metadata_file for a fine-tuning subset)")
        if len({"metadata_file" in row for row in rows}) > 1:
            raise UserError(f"{path}: datasets[{i}]: metadata_file subsets and image-folder subsets cannot share a "
                            "dataset (as in kohya): put them in separate [[datasets]]")
        checked.append((table, rows))
    return general, checked


# --- resolving: subset -> dataset -> general -> CLI / --config_file -> default ------------------------

def resolve(key: str, tables: list[dict], cfg) -> Any:
    """kohya's search: the first table that holds a value that is not None, else the option's value."""
    for table in tables:
        if table.get(key) is not None:
            return table[key]
    return getattr(cfg, CLI_NAMES.get(key, key), DEFAULTS.get(key))


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
    """One subset as resolved: where its images (or metadata file) are, how its captions are processed,
    how its pixels are augmented and where its masks come from."""

    image_dir: str | None
    metadata_file: str | None
    num_repeats: int
    class_tokens: str
    caption_extension: str
    is_reg: bool
    caption_options: CaptionOptions
    augment: Augmentation
    masks: MaskSource
    conditioning_dir: str | None
    where: str  # "<file>: datasets[i].subsets[j]: ", the start of its error messages


def resolve_subset(row: dict, dataset: dict, general: dict, cfg, masks: MaskSource, where: str) -> SubsetSpec:
    """The subset's settings by kohya's fallback; `masks` is the run's mask source (--masked_loss and the
    unmasked probability), which alpha_mask and conditioning_data_dir refine per subset."""
    tables = [row, dataset, general]
    image_dir, metadata_file = row.get("image_dir"), row.get("metadata_file")
    if image_dir is not None and not os.path.isdir(image_dir):
        raise UserError(f"{where}image_dir {image_dir!r}: folder not found")
    for key in FOLDER_ONLY_KEYS if metadata_file is not None else ():
        if key in row:
            raise UserError(f"{where}{key} does not apply to a metadata_file subset (its captions come from the file)")
    conditioning = row.get("conditioning_data_dir")
    if conditioning is not None and not getattr(cfg, "masked_loss", False):
        raise UserError(f"{where}conditioning_data_dir holds loss masks: add --masked_loss to train with them")
    try:
        augment = Augmentation.from_cfg(scoped_cfg(cfg, tables, AUGMENT_KEYS))
        caption_options = CaptionOptions.from_cfg(scoped_cfg(cfg, tables, CAPTION_KEYS))
    except UserError as exc:
        raise UserError(f"{where}{exc}") from None
    masks = replace(masks, alpha=bool(resolve("alpha_mask", tables, cfg)))
    if conditioning is not None:  # the image-to-mask map is filled in once the images are known
        masks = replace(masks, conditioning={})
    masks.check_face_crop(augment.face_crop_range, where)
    _check_cacheable(augment, cfg, where)
    return SubsetSpec(image_dir, metadata_file, int(resolve("num_repeats", tables, cfg)),
                      resolve("class_tokens", tables, cfg) or "",
                      normalize_extension(resolve("caption_extension", tables, cfg) or ".caption"),
                      bool(row.get("is_reg", False)), caption_options, augment, masks, conditioning, where)


def _check_cacheable(augment: Augmentation, cfg, where: str) -> None:
    """kohya's rule, per subset: latents encoded once cannot follow pixels that change every epoch."""
    if not (getattr(cfg, "cache_latents", False) or getattr(cfg, "cache_latents_to_disk", False)):
        return
    for key, on in (("color_aug", augment.color), ("random_crop", augment.random_crop),
                    ("face_crop_aug_range", augment.face_crop_range is not None)):
        if on:
            raise UserError(f"{where}{key} changes the pixels every epoch, so it cannot be used with "
                            "--cache_latents or --cache_latents_to_disk: turn off one of them")


# --- building: one TrainDataset per [[datasets]] table -------------------------------------------------

def build_config_datasets(cfg) -> DatasetGroup:
    """The datasets of cfg.dataset_config, each with its own buckets, batch size and reg balancing."""
    from library.dataset.loader import BucketSettings, TrainDataset, settings_for

    path = cfg.dataset_config
    for option in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir"):
        if getattr(cfg, option, None):
            logger.warning("--%s is ignored: --dataset_config %s names the image folders", option, path)
    general, datasets = check_config(read_dataset_config(path), path)
    seed = getattr(cfg, "seed", None) or 0
    masks = MaskSource.from_cfg(cfg, check_face_crop=False)  # face crops are checked per subset
    built = []
    for i, (table, rows) in enumerate(datasets):
        where = f"{path}: datasets[{i}]: "
        scoped = scoped_cfg(cfg, [table, general], [k for k in DATASET_KEYS if k != "network_multiplier"])
        try:
            if scoped.resolution is not None:  # bad bucket options fail before the images are scanned
                BucketSettings.from_cfg(scoped)
            batch_size = int(scoped.train_batch_size)
            if batch_size < 1:
                raise UserError(f"batch_size {batch_size} must be at least 1")
        except UserError as exc:
            raise UserError(f"{where}{exc}") from None
        specs = [resolve_subset(row, table, general, cfg, masks, f"{path}: datasets[{i}].subsets[{j}]: ")
                 for j, row in enumerate(rows)]
        loaded = _load_subsets(specs, bool(getattr(cfg, "skip_bad_images", False)))
        settings = settings_for(scoped, [subset for subset, _ in loaded], where)
        records = _place_records(loaded, settings, where)
        dataset = TrainDataset([subset for subset, _ in loaded], records, settings, batch_size, seed,
                               CaptionOptions.from_cfg(scoped))
        dataset.augment = Augmentation.from_cfg(cfg)  # every record carries its subset's; this is the default
        # kohya reads this key and never applies it; here each batch of the dataset trains at it
        dataset.network_multiplier = float(next((t["network_multiplier"] for t in (table, general)
                                                 if t.get("network_multiplier") is not None), 1.0))
        built.append(dataset)
    _note_cache_info(datasets, general, cfg)
    return DatasetGroup(built, seed)


def _note_cache_info(datasets: list, general: dict, cfg) -> None:
    """cache_info is accepted; there is nothing to cache (sizes come from image headers in one scan)."""
    if any(resolve("cache_info", [row, table, general], cfg) for table, rows in datasets for row in rows):
        logger.info("cache_info: sdtune reads image sizes and captions afresh on every start (the scan is "
                    "fast), so no metadata_cache.json is read or written, and none can go stale")


def _load_subsets(specs: list[SubsetSpec], skip_bad_images: bool) -> list[tuple[Subset, SubsetSpec]]:
    """Each subset read from its folder or metadata file, with its settings attached."""
    from library.dataset.finetune import load_metadata_subset

    loaded = []
    for spec in specs:
        if spec.num_repeats < 1:  # kohya skips such a subset too
            logger.warning("%snum_repeats %d is less than 1: subset skipped", spec.where, spec.num_repeats)
            continue
        if spec.metadata_file is not None:
            separator = spec.caption_options.separator
            subset = load_metadata_subset(spec.metadata_file, spec.image_dir, spec.num_repeats, separator,
                                          skip_bad_images, spec.where)
        else:
            subset = load_subset(spec.image_dir, spec.num_repeats, spec.class_tokens, spec.caption_extension,
                                 spec.is_reg, skip_bad_images)
        if not subset.image_paths:
            if not spec.is_reg:
                raise UserError(f"{spec.where}no images in {subset.label}")
            logger.warning("%sno regularization images in %s", spec.where, spec.image_dir)
            continue
        subset.augment, subset.masks = spec.augment, spec.masks
        if spec.conditioning_dir is not None:
            found = conditioning_masks(subset.image_paths, spec.conditioning_dir, spec.where)
            subset.masks = replace(spec.masks, conditioning=found)
        loaded.append((subset, spec))
    warn_skipped_images([subset for subset, _ in loaded])
    return loaded


def _place_records(loaded: list[tuple[Subset, SubsetSpec]], settings, where: str) -> list:
    """The subsets' records, reg balanced against the train images, placed in buckets."""
    from library.dataset.loader import _split_reg, subset_records

    records = _split_reg([r for subset, spec in loaded for r in subset_records(subset, spec.caption_options)])
    if not any(not r.is_reg for r in records):
        raise UserError(f"{where}no training images (only regularization subsets, or none left)")
    predefined = settings.predefined()
    for record in records:
        settings.place(record, predefined)
    return records
