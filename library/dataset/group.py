"""Several datasets served as one (a --dataset_config with more than one [[datasets]] table), and the
ss_* metadata kohya writes for them."""

from __future__ import annotations

import os
import random
from typing import Callable

from library.errors import UserError


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
        self._text_cache = None
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
    def latent_cache(self):
        return self._latent_cache

    @latent_cache.setter
    def latent_cache(self, cache) -> None:
        self._latent_cache = cache
        for dataset in self.datasets:
            dataset.latent_cache = cache

    @property
    def text_cache(self):
        return self._text_cache

    @text_cache.setter
    def text_cache(self, cache) -> None:
        self._text_cache = cache
        for dataset in self.datasets:
            dataset.text_cache = cache

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
    """One entry of kohya's ss_datasets (train_network.py, dataset-config branch): a fine-tuning subset
    names its metadata file instead of a class token and a regularisation flag."""
    options = {r.path: r.caption_options for r in dataset.records}
    subsets = []
    for subset in dataset.subsets:
        opts = options.get(subset.image_paths[0]) or dataset.caption_options
        augment = subset.augment or dataset.augment
        entry = {
            "img_count": subset.img_count, "num_repeats": subset.num_repeats,
            "color_aug": augment.color, "flip_aug": augment.flip, "random_crop": augment.random_crop,
            "shuffle_caption": opts.shuffle, "keep_tokens": opts.keep_tokens,
            "keep_tokens_separator": opts.keep_tokens_separator, "secondary_separator": opts.secondary_separator,
            "enable_wildcard": opts.enable_wildcard, "caption_prefix": opts.prefix, "caption_suffix": opts.suffix,
        }
        if subset.image_dir:
            entry["image_dir"] = os.path.basename(os.path.normpath(subset.image_dir))
        if subset.metadata_file:
            entry["metadata_file"] = subset.name
        else:
            entry.update(class_tokens=subset.class_tokens or None, is_reg=subset.is_reg)
        subsets.append(entry)
    return {
        "is_dreambooth": not any(s.metadata_file for s in dataset.subsets),
        "batch_size_per_device": dataset.batch_size,
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
