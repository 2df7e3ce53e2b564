"""The training dataset: images placed in buckets, batches planned per epoch, pixels or cached latents.

`build_dataset(cfg)` reads only the dataset folders (no model). Each item of the dataset is one
batch: images of one bucket, `cfg.train_batch_size` of them (the last batch of a bucket may be
smaller), in an order shuffled deterministically from (seed, epoch).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Callable

import torch

from library.dataset import buckets as bk
from library.dataset.batch_loader import BatchLoader, EpochSampler  # noqa: F401  (the package's names)
from library.dataset.captions import CaptionOptions, process_caption, tag_frequency
from library.dataset.command_line import command_line_subsets
from library.dataset.folders import Subset
from library.dataset.images import PLAIN, Augmentation, load_pixels, random_crop_offsets
from library.dataset.masks import NO_MASKS, MaskSource, full_mask, latent_mask
from library.dataset.report import schedule_length
from library.dataset.size_cond import batch_size_cond
from library.errors import UserError

logger = logging.getLogger(__name__)

@dataclass
class ImageRecord:
    """One unique image: where it is, its caption, and where it goes (bucket and resized size)."""

    path: str
    caption: str
    num_repeats: int
    is_reg: bool
    size: bk.Size
    bucket: bk.Size | None = None
    resized: bk.Size | None = None
    ar_error: float = 0.0
    caption_options: CaptionOptions | None = None  # its subset's (--dataset_config); None: the dataset's
    resolution: bk.Size | None = None  # multi-resolution: the training size this copy is placed at
    image_index: int = -1  # multi-resolution: the index of its image in TrainDataset.records
    augment: Augmentation | None = None  # its subset's (--dataset_config); None: the dataset's
    masks: MaskSource | None = None  # likewise
    metadata_bucket: bk.Size | None = None  # a fine-tuning entry's train_resolution: its bucket, as in kohya

    @property
    def cache_key(self) -> str:
        """Latent caches key by image, and by bucket when an image trains at several sizes."""
        return self.path if self.resolution is None else f"{self.path}#{self.bucket[0]}x{self.bucket[1]}"


@dataclass(frozen=True)
class BucketSettings:
    """How images are sized: one fixed resolution, or aspect-ratio buckets; with several `resolutions`
    (multi-resolution training) `resolution` is the largest of them and images are placed at each."""

    resolution: bk.Size
    enable_bucket: bool = False
    min_reso: int | None = None
    max_reso: int | None = None
    steps: int | None = None
    no_upscale: bool = False
    resolutions: tuple[bk.Size, ...] = ()  # two or more: multi-resolution training

    @classmethod
    def from_cfg(cls, cfg) -> "BucketSettings":
        """Read and check the bucket options (kohya's checks, as one-line errors)."""
        if getattr(cfg, "resolution", None) is None:
            raise UserError("--resolution is required, e.g. --resolution 512 or --resolution 512,768")
        sizes = bk.parse_resolutions(cfg.resolution)
        # the largest size stands for the run (ss_resolution, modelspec.resolution)
        resolution, several = max(sizes, key=lambda s: s[0] * s[1]), tuple(sizes) if len(sizes) > 1 else ()
        if not getattr(cfg, "enable_bucket", False):
            return cls(resolution, resolutions=several)
        low, high = _option(cfg, "min_bucket_reso", 256), _option(cfg, "max_bucket_reso", 1024)
        steps = _option(cfg, "bucket_reso_steps", 64)
        if steps < 1 or low < 1:
            raise UserError(f"--bucket_reso_steps {steps} and --min_bucket_reso {low} must be positive")
        if min(min(s) for s in sizes) < steps:  # the bucket grid would round such a side down to 0
            raise UserError(f"--resolution {cfg.resolution}: every side must be at least --bucket_reso_steps {steps}")
        if min(min(s) for s in sizes) < low:
            raise UserError(f"--min_bucket_reso {low} is larger than --resolution {cfg.resolution}: lower it")
        if max(max(s) for s in sizes) > high:
            raise UserError(f"--max_bucket_reso {high} is smaller than --resolution {cfg.resolution}: raise it")
        return cls(resolution, True, low, high, steps, bool(getattr(cfg, "bucket_no_upscale", False)), several)

    def variants(self, records: list[ImageRecord]) -> list[ImageRecord]:
        """What batches are planned from: the (placed) records themselves, or with several resolutions
        one copy of each record per resolution, placed with the same bucket rules at that size."""
        if not self.resolutions:
            return records
        copies = []
        for size in self.resolutions:
            at_size = replace(self, resolution=size, resolutions=())
            predefined = at_size.predefined()
            for index, record in enumerate(records):
                copy = replace(record, resolution=size, image_index=index)
                at_size.place(copy, predefined)
                copies.append(copy)
        return copies

    def place(self, record: ImageRecord, predefined: list[bk.Size]) -> None:
        """Set the record's bucket, resized size and aspect-ratio error."""
        width, height = record.size
        if record.metadata_bucket is not None:  # covered and cropped, never stretched as kohya does
            bucket = record.metadata_bucket
            placed = (bucket, bk.cover_size(record.size, bucket), bucket[0] / bucket[1] - width / height)
        elif self.enable_bucket and self.no_upscale:
            area = self.resolution[0] * self.resolution[1]
            placed = bk.no_upscale_bucket(width, height, area, self.steps)
            if min(placed[0]) == 0:
                raise UserError(f"image {record.path} ({width}x{height}) is smaller than --bucket_reso_steps "
                                f"{self.steps}: remove it or lower the step")
        else:
            placed = bk.select_bucket(width, height, predefined)
        record.bucket, record.resized, record.ar_error = placed

    def predefined(self) -> list[bk.Size]:
        """The buckets an image may be put in (unused with bucket_no_upscale)."""
        if not self.enable_bucket:
            return [self.resolution]  # without buckets every image covers, then is cropped to, one size
        return bk.make_bucket_resolutions(self.resolution, self.min_reso, self.max_reso, self.steps)


def _option(cfg, name: str, default: int) -> int:
    """An integer option, kohya's default when it is absent or None."""
    value = getattr(cfg, name, None)
    return default if value is None else int(value)


def epoch_rng(seed: int, epoch: int) -> random.Random:
    """The random source of one epoch: the same (seed, epoch) always gives the same order."""
    return random.Random(f"{seed}:{epoch}")


def plan_batches(records: list[ImageRecord], batch_size: int, rng: random.Random, seed: int = 0) -> list[list[int]]:
    """Batches of record indices: each image num_repeats times, batches within one bucket, order shuffled.

    Buckets are filled in sorted bucket order, each bucket's entries shuffled, cut into batches of
    `batch_size` (the last one may be short), then all batches shuffled (kohya's scheme). Multi-resolution
    records (BucketSettings.variants) are grouped by (resolution, bucket) instead: see resolution_groups.
    """
    if records and records[0].resolution is not None:
        groups = resolution_groups(records, batch_size, rng, seed)
    else:
        groups = {}
        for index, record in enumerate(records):
            groups.setdefault(record.bucket, []).extend([index] * record.num_repeats)
    batches = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches.extend(members[start:start + batch_size] for start in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


def resolution_groups(variants: list[ImageRecord], batch_size: int, rng: random.Random,
                      seed: int) -> dict[tuple, list[int]]:
    """Each occurrence (image, repeat) of the epoch gets one resolution: the copy of that size joins
    the (resolution, bucket) group, so every batch has one resolution.

    Images that share their bucket at every resolution are interchangeable for grouping: their
    occurrences are shuffled together and dealt the resolutions in turn, so every resolution gets
    1/k of them and each group has the same size in every epoch (the trainer counts the steps of an
    epoch once). Only where k does not divide a class's occurrences are the left-over ones dealt from a
    start fixed per (seed, class); with batch size 1 the start follows the epoch too, as any grouping
    then gives one batch per occurrence.
    """
    by_image: dict[int, list[int]] = {}
    for index, variant in enumerate(variants):
        by_image.setdefault(variant.image_index, []).append(index)
    classes: dict[tuple, list[list[int]]] = {}
    for copies in by_image.values():
        signature = tuple(variants[i].bucket for i in copies)
        classes.setdefault(signature, []).extend([copies] * variants[copies[0]].num_repeats)
    groups: dict[tuple, list[int]] = {}
    for signature in sorted(classes):
        occurrences, k = classes[signature], len(signature)
        rng.shuffle(occurrences)
        start = (rng if batch_size == 1 else random.Random(f"{seed}:{signature}")).randrange(k)
        for slot, copies in enumerate(occurrences):
            chosen = variants[copies[(start + slot) % k]]
            groups.setdefault((chosen.resolution, chosen.bucket), []).append(copies[(start + slot) % k])
    return groups


@dataclass(frozen=True)
class StepClock:
    """Which optimizer step batch i of an epoch trains in, worked out in any process from (epoch, i).

    The trainer steps once per `accumulation` batches and once more at an epoch's end when they do not
    divide it (accelerate syncs the gradients of the last batch), so an epoch holds
    ceil(batches / accumulation) steps. max_train_steps turns a token_warmup_step ratio into steps.
    """

    batches_per_epoch: int
    accumulation: int = 1
    max_train_steps: int = 0

    def step(self, epoch: int, index: int) -> int:
        steps_per_epoch = -(-self.batches_per_epoch // self.accumulation)
        return epoch * steps_per_epoch + index // self.accumulation


def balance_reg_records(num_train_images: int, reg: list[ImageRecord]) -> list[ImageRecord]:
    """The regularisation images of one epoch, with repeats set so they match the train images (kohya).

    kohya's DreamBooth dataset sees as many reg images per epoch as train images (repeats included):
    reg images are taken in folder order with their own repeats until that count is reached, so the
    ones after it are not used at all; when all of them fall short, each gets one more repeat in turn
    until the count is reached exactly. Returns copies; `reg` is left as it was.
    """
    used: list[ImageRecord] = []
    total = 0
    for record in reg:
        if total >= num_train_images:
            break
        used.append(replace(record))
        total += record.num_repeats
    if used and total < num_train_images:
        rounds, rest = divmod(num_train_images - total, len(used))
        for position, record in enumerate(used):
            record.num_repeats += rounds + (1 if position < rest else 0)
    return used


def _split_reg(records: list[ImageRecord]) -> list[ImageRecord]:
    """Train records first, then the balanced reg records (see balance_reg_records)."""
    train = [r for r in records if not r.is_reg]
    reg = [r for r in records if r.is_reg]
    num_train_images = sum(r.num_repeats for r in train)
    num_reg_images = sum(r.num_repeats for r in reg)
    if not reg:
        return train
    if num_train_images < num_reg_images:
        logger.warning("%d regularization images (repeats included) for %d train images: "
                       "some regularization images are not used", num_reg_images, num_train_images)
    return train + balance_reg_records(num_train_images, reg)


class TrainDataset:
    """Batches of one epoch. `dataset[i]` is batch i: a dict of images or latents, captions, is_reg, flipped,
    size_cond (and text_outputs with cached text-encoder outputs)."""

    augment: Augmentation = PLAIN  # set from the options by whoever builds the dataset (see build_dataset)
    network_multiplier: float = 1.0  # a --dataset_config dataset's network_multiplier
    masks: MaskSource = NO_MASKS  # likewise; items carry latent-size loss masks when it is enabled
    clock: StepClock | None = None  # set by build_dataset; None: every batch counts as step 0

    def __init__(self, subsets: list[Subset], records: list[ImageRecord], settings: BucketSettings,
                 batch_size: int, seed: int, caption_options: CaptionOptions = CaptionOptions()):
        self.subsets = subsets
        self.caption_options = caption_options
        self.records = records
        self.settings = settings
        self.variants = settings.variants(records)  # the records batches index: one per resolution
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.latent_cache = None  # set by cache_latents; then items carry latents instead of images
        self.text_cache = None  # set by caching.cache_text_encoder_outputs; then items carry text_outputs
        self._batches = plan_batches(self.variants, batch_size, epoch_rng(seed, 0), seed)

    def set_epoch(self, epoch: int) -> None:
        """Re-plan batches for `epoch`; independent of earlier calls, so a resumed run sees the same order."""
        self.epoch = epoch
        self._batches = plan_batches(self.variants, self.batch_size, epoch_rng(self.seed, epoch), self.seed)

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index: int | tuple) -> dict:
        step = 0
        if isinstance(index, tuple):  # (epoch, i) from EpochSampler: a worker process follows the epoch itself
            epoch, index, *group_step = index  # a DatasetGroup adds the step: its i is not this dataset's
            if epoch != self.epoch:
                self.set_epoch(epoch)
            step = group_step[0] if group_step else self.clock.step(epoch, index) if self.clock else 0
        members = [self.variants[i] for i in self._batches[index]]
        rngs = [self._image_rng(index, position) for position in range(len(members))]
        # drawn first, so the same with a cache
        flipped = [self.augment_of(r).flip and rng.random() < 0.5 for r, rng in zip(members, rngs)]
        images = latents = None
        # a batch where some samples have masks gives the others all-ones masks: plain loss for them
        masked = any(self.masks_of(r).enabled for r in members)
        masks = self._masks(members, rngs, flipped, index) if masked else None
        if self.latent_cache is not None:
            latents = torch.stack([self._latents(r, flip) for r, flip in zip(members, flipped)])
        else:
            images = torch.stack([load_pixels(r.path, r.resized, r.bucket, self.augment_of(r), rng, flip)
                                  for r, rng, flip in zip(members, rngs, flipped)])
        captions = [self._caption(r, index, position, step) for position, r in enumerate(members)]
        batch = {
            "images": images,
            "latents": latents,
            "captions": captions,
            "is_reg": torch.tensor([r.is_reg for r in members], dtype=torch.bool),
            "flipped": torch.tensor(flipped, dtype=torch.bool),
            "network_multiplier": self.network_multiplier,
            "image_paths": [r.path for r in members],
            "buckets": [r.bucket for r in members],  # with several resolutions, this sample's own
            "resized": [r.resized for r in members],
            "masks": masks,
            "size_cond": batch_size_cond(members, flipped),  # SDXL's added time ids (library/dataset/size_cond.py)
        }
        if self.text_cache is not None:  # --cache_text_encoder_outputs: the encoders' outputs, per key stacked
            batch["text_outputs"] = self.text_cache.batch([r.path for r in members], captions)
        return batch

    def augment_of(self, record: ImageRecord) -> Augmentation:
        """The record's augmentation: its subset's, else the dataset's."""
        return self.augment if record.augment is None else record.augment

    def masks_of(self, record: ImageRecord) -> MaskSource:
        """The record's mask source: its subset's, else the dataset's."""
        return self.masks if record.masks is None else record.masks

    def _masks(self, members: list[ImageRecord], rngs: list[random.Random], flipped: list[bool],
               index: int) -> torch.Tensor:
        """Latent-size loss masks (B, 1, h, w), aligned with the pixels or latents of the same occurrences."""
        masks = []
        for position, (record, rng, flip) in enumerate(zip(members, rngs, flipped)):
            drop_rng = random.Random(f"{self.seed}:{self.epoch}:{index}:{position}:mask")
            if not self.masks_of(record).enabled or self.masks_of(record).drops_mask(drop_rng):
                masks.append(full_mask(record.bucket))
            elif self.latent_cache is not None:
                masks.append(self._cached_mask(record, flip))
            else:
                masks.append(self._mask(record, rng, flip))
        return torch.stack(masks)

    def _mask(self, record: ImageRecord, rng: random.Random, flip: bool) -> torch.Tensor:
        """The mask cut as load_pixels will cut the image: it draws the crop window first from the same
        stream, so a copy of the stream (taken before the pixels are loaded) gives the same window."""
        offsets = None
        augment = self.augment_of(record)
        if augment.random_crop:
            replay = random.Random()
            replay.setstate(rng.getstate())
            offsets = random_crop_offsets(record.resized, record.bucket, replay)
        return latent_mask(self.masks_of(record), record.path, record.size, record.resized, record.bucket,
                           augment.interpolation, offsets, flip)

    def _cached_mask(self, record: ImageRecord, flip: bool) -> torch.Tensor:
        """The cached (unflipped) latent-size mask; mirrored at latent size for a flipped occurrence
        (area averages of whole latent cells commute with the mirror)."""
        mask = self.latent_cache.get_mask(record.cache_key)
        if mask is None:
            return full_mask(record.bucket)
        return torch.flip(mask, dims=[-1]) if flip else mask

    def _image_rng(self, index: int, position: int) -> random.Random:
        """The random source of one occurrence's pixels (flip, crop window, colour): like the caption's,
        the same in any process, but a stream of its own so captions draw the same with or without it."""
        return random.Random(f"{self.seed}:{self.epoch}:{index}:{position}:pixels")

    def _latents(self, record: ImageRecord, flip: bool) -> torch.Tensor:
        """Cached latents of the record; those of its mirror image when this occurrence is flipped."""
        return self.latent_cache.get(record.cache_key, flipped=flip)

    def _caption(self, record: ImageRecord, index: int, position: int, step: int = 0) -> str:
        """The record's caption for this occurrence at optimizer `step`: its own random draw, the same in
        any process."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}:{position}")
        max_steps = self.clock.max_train_steps if self.clock else 0
        return process_caption(record.caption, record.caption_options or self.caption_options, self.epoch, rng,
                               step, max_steps)

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1,
                      cache=None) -> None:
        """Encode every unique image once into `cache` (memory when None; see library.caching)."""
        from library.caching import cache_latents

        cache_latents(self, encode, batch_size, cache)

    def verify_bucket_reso_steps(self, min_steps: int) -> None:
        """The model family needs bucket sides divisible by `min_steps` (kohya: 64 for SD1/2, 32 for SDXL)."""
        steps = self.settings.steps
        if self.settings.enable_bucket and steps % min_steps:
            raise UserError(f"--bucket_reso_steps {steps} must be divisible by {min_steps} for this model")
        for record in self.records:  # a metadata file's train_resolution is checked here, for the model
            bucket = record.metadata_bucket
            if bucket is not None and (bucket[0] % min_steps or bucket[1] % min_steps):
                raise UserError(f"train_resolution {list(bucket)} of {record.path} in its metadata file: both "
                                f"sides must be divisible by {min_steps} for this model")

    def bucket_counts(self) -> dict[bk.Size, int]:
        """Images per bucket, repeats included, in sorted bucket order (summed over resolutions)."""
        counts: dict[bk.Size, int] = {}
        for (_, bucket), n in self.group_counts().items():
            counts[bucket] = counts.get(bucket, 0) + n
        return dict(sorted(counts.items()))

    def group_counts(self) -> dict[tuple, int]:
        """Samples per (resolution, bucket) in an epoch, sorted; the resolution is None with one size.
        Multi-resolution groups are read from epoch 0's plan: they have the same size every epoch."""
        counts: dict[tuple, int] = {}
        for batch in plan_batches(self.variants, self.batch_size, epoch_rng(self.seed, 0), self.seed):
            record = self.variants[batch[0]]
            key = (record.resolution, record.bucket)
            counts[key] = counts.get(key, 0) + len(batch)
        return dict(sorted(counts.items(), key=lambda item: (item[0][0] or (0, 0), item[0][1])))

    @property
    def info(self) -> dict:
        """Dataset facts for ss_* metadata, in the shapes kohya's train_network.py writes."""
        s = self.settings
        dirs: dict[str, dict] = {}
        reg_dirs: dict[str, dict] = {}
        tags: dict[str, dict[str, int]] = {}
        for subset in self.subsets:
            target = reg_dirs if subset.is_reg else dirs
            target[subset.name] = {"n_repeats": subset.num_repeats, "img_count": subset.img_count}
            counts = tags.setdefault(subset.name, {})
            texts = subset.captions if subset.tag_texts is None else subset.tag_texts
            for tag, n in tag_frequency(texts).items():
                counts[tag] = counts.get(tag, 0) + n
        return {
            "num_train_images": sum(s_.num_repeats * s_.img_count for s_ in self.subsets if not s_.is_reg),
            "num_reg_images": sum(s_.num_repeats * s_.img_count for s_ in self.subsets if s_.is_reg),
            "dataset_dirs": dirs,
            "reg_dataset_dirs": reg_dirs,
            "tag_frequency": tags,
            "bucket_info": self._bucket_info(),
            "resolution": s.resolution,
            "enable_bucket": s.enable_bucket or self.metadata_buckets,
            "bucket_no_upscale": s.no_upscale,
            "min_bucket_reso": s.min_reso,
            "max_bucket_reso": s.max_reso,
            "bucket_reso_steps": s.steps,
            "batch_size": self.batch_size,
            "num_batches_per_epoch": len(self),
        }

    @property
    def metadata_buckets(self) -> bool:
        """Buckets come from a metadata file's train_resolution (kohya then turns bucketing on)."""
        return any(r.metadata_bucket is not None for r in self.records)

    def _bucket_info(self) -> dict | None:
        """kohya's ss_bucket_info: used buckets numbered in sorted order, and the mean |ar error| per image."""
        if not (self.settings.enable_bucket or self.metadata_buckets):
            return None
        buckets = {i: {"resolution": list(reso), "count": n} for i, (reso, n) in enumerate(self.bucket_counts().items())}
        mean_error = sum(abs(r.ar_error) for r in self.records) / len(self.records)
        return {"buckets": buckets, "mean_img_ar_error": float(mean_error)}


def build_dataset(cfg) -> TrainDataset:
    """The training dataset described by `cfg` (train_data_dir, resolution, bucket and batch options).

    Captions stay strings: the model family tokenizes them. Options whose feature is not built yet
    were already refused by library.config. With --dataset_config, a DatasetGroup of its datasets.
    """
    if getattr(cfg, "dataset_config", None):  # "" is off, as GUI-written files hold it
        from library.dataset.dataset_config import build_config_datasets

        group = build_config_datasets(cfg)
        for dataset in group.datasets:
            dataset.masks = MaskSource.from_cfg(cfg, check_face_crop=False)  # records carry their subset's
            _log_summary(dataset)
        group.clock = make_clock(cfg, len(group), _warmup_ratio(group.records))
        for dataset in group.datasets:  # the group hands each batch its step; its datasets need the run length
            dataset.clock = group.clock
        return group
    if getattr(cfg, "resolution", None) is not None:  # a bad --resolution fails before the scan
        BucketSettings.from_cfg(cfg)
    masks = MaskSource.from_cfg(cfg)
    subsets = command_line_subsets(cfg, masks)
    settings = settings_for(cfg, subsets)
    records = _split_reg([record for subset in subsets for record in subset_records(subset)])
    predefined = settings.predefined()
    for record in records:
        settings.place(record, predefined)
    batch_size = int(getattr(cfg, "train_batch_size", 1) or 1)
    seed = getattr(cfg, "seed", None) or 0
    dataset = TrainDataset(subsets, records, settings, batch_size, seed, CaptionOptions.from_cfg(cfg))
    dataset.augment = Augmentation.from_cfg(cfg)
    dataset.masks = masks
    dataset.clock = make_clock(cfg, len(dataset))
    _log_summary(dataset)
    return dataset


def subset_records(subset: Subset, caption_options: CaptionOptions | None = None) -> list[ImageRecord]:
    """One record per image of a subset, with the sizes read while scanning and the subset's settings."""
    buckets = subset.buckets or [None] * subset.img_count
    return [ImageRecord(path, caption, subset.num_repeats, subset.is_reg, size, caption_options=caption_options,
                        augment=subset.augment, masks=subset.masks, metadata_bucket=bucket)
            for path, caption, size, bucket in zip(subset.image_paths, subset.captions, subset.sizes, buckets)]


def settings_for(cfg, subsets: list[Subset], where: str = "") -> BucketSettings:
    """The bucket settings of a dataset: BucketSettings.from_cfg, with kohya's rules for fine-tuning
    subsets whose metadata gives every image its bucket (train_resolution): used only when every subset of
    the dataset has them; they turn bucketing on, --resolution may then be left out (the largest bucket
    stands for it) and --bucket_no_upscale cannot apply."""
    fixed = [s for s in subsets if s.buckets is not None]
    if fixed and len(fixed) < len(subsets):
        logger.info("%sonly some subsets give train_resolution buckets: buckets come from the resolution", where)
        for subset in fixed:
            subset.buckets = None
        fixed = []
    if not fixed:
        return _bucket_settings(cfg, where)
    name = fixed[0].metadata_file
    if getattr(cfg, "bucket_no_upscale", False):
        raise UserError(f"{where}{name} gives every image its bucket (train_resolution): --bucket_no_upscale "
                        "cannot apply; remove it (kohya refuses it too)")
    if getattr(cfg, "resolution", None) is None:
        return BucketSettings(max((b for s in fixed for b in s.buckets), key=lambda b: b[0] * b[1]))
    settings = _bucket_settings(cfg, where)
    if settings.resolutions:
        raise UserError(f"{where}{name} gives every image its bucket (train_resolution): a multi-resolution "
                        "--resolution cannot apply")
    return settings


def _bucket_settings(cfg, where: str) -> BucketSettings:
    try:
        return BucketSettings.from_cfg(cfg)
    except UserError as exc:
        raise UserError(f"{where}{exc}") from None


def _warmup_ratio(records: list[ImageRecord]) -> bool:
    """Some subset's token_warmup_step is a ratio of the run (below 1)."""
    return any(r.caption_options is not None and 0 < r.caption_options.token_warmup_step < 1 for r in records)


def make_clock(cfg, batches_per_epoch: int, warmup_ratio: bool = False) -> StepClock:
    """The dataset's StepClock: token warmup needs the optimizer step in every DataLoader worker, and
    with a token_warmup_step below 1 (the option's, or some subset's) the run's length
    (library.dataset.report.schedule_length)."""
    accumulation = int(getattr(cfg, "gradient_accumulation_steps", 1) or 1)
    max_steps = 0
    if warmup_ratio or 0 < (getattr(cfg, "token_warmup_step", 0) or 0) < 1:
        steps_per_epoch = -(-batches_per_epoch // accumulation)
        max_steps, _ = schedule_length(steps_per_epoch, getattr(cfg, "max_train_steps", None),
                                       getattr(cfg, "max_train_epochs", None))
    return StepClock(batches_per_epoch, accumulation, max_steps)


def _log_summary(dataset: TrainDataset) -> None:
    info = dataset.info
    logger.info("%d images in %d folders, %d with repeats; %d batches of up to %d per epoch",
                len(dataset.records), len(dataset.subsets), info["num_train_images"], len(dataset), dataset.batch_size)
    if info["reg_dataset_dirs"]:
        used = sum(r.num_repeats for r in dataset.records if r.is_reg)
        logger.info("%d regularization images with repeats, %d of them seen per epoch", info["num_reg_images"], used)
    if info["bucket_info"] is not None:
        for i, bucket in info["bucket_info"]["buckets"].items():
            logger.info("bucket %d: resolution %s, count %d", i, tuple(bucket["resolution"]), bucket["count"])
        logger.info("mean aspect-ratio error (without repeats): %.4f", info["bucket_info"]["mean_img_ar_error"])
