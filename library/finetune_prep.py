"""kohya's fine-tuning preparation (finetune/*.py): the metadata JSON that `--in_json` training reads.

- merge_text_files: caption files (`.caption`) or tag files (`.txt`) of a folder's images into the
  metadata, under "caption" or "tags" (merge_captions_to_metadata / merge_dd_tags_to_metadata);
- prepare_buckets_latents: each image's bucket as "train_resolution" [width, height], and its latents in
  sdtune's latent cache files (library/caching.py), so `--in_json ... --cache_latents_to_disk` training
  with the same VAE and precision encodes nothing again.

An image's key is its file name without the extension, or with --full_path its path as written under
train_data_dir (kohya's keys; library/dataset/finetune.py finds the image of either). Entries already in
the file keep their other fields, so captions, tags and buckets end up in one file. The output is written
once, atomically, after everything else succeeded: a failed run leaves the input file as it was.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from library.dataset import buckets as bk
from library.dataset.finetune import read_metadata
from library.dataset.folders import list_images, usable_images
from library.errors import UserError, not_supported
from library.saving import atomic_write_text

logger = logging.getLogger(__name__)

METADATA_STRIDE = 8  # kohya stores train_resolution rounded down to whole latent cells


def find_images(train_data_dir: str, recursive: bool) -> list[str]:
    """The images of a folder (and its sub-folders with `recursive`), sorted, as paths under train_data_dir."""
    if not os.path.isdir(train_data_dir):
        raise UserError(f"train_data_dir {train_data_dir}: folder not found")
    folders = [train_data_dir]
    if recursive:
        folders = sorted(root for root, _, _ in os.walk(train_data_dir))
    return [str(Path(path)) for folder in folders for path in list_images(folder)]


def image_key(path: str, full_path: bool) -> str:
    """kohya's metadata key: the path with --full_path, else the file name without its extension."""
    return path if full_path else Path(path).stem


def keyed_images(paths: list[str], full_path: bool) -> dict[str, str]:
    """{key: image path}; two images with one key (a.png and a.jpg) are an error, not a silent overwrite."""
    keyed: dict[str, str] = {}
    for path in paths:
        key = image_key(path, full_path)
        if key in keyed:
            raise UserError(f"{keyed[key]} and {path} have the same metadata key {key!r}: rename one"
                            + ("" if full_path else " or use --full_path"))
        keyed[key] = path
    return keyed


def _check_recursive(recursive: bool, full_path: bool) -> None:
    if recursive and not full_path:  # kohya's rule: bare names from several folders could not be found again
        raise UserError("--recursive needs --full_path: image keys must say which sub-folder an image is in")


def _existing(in_json: str | None, label: str) -> dict:
    if in_json is None:
        return {}
    if not os.path.isfile(in_json):
        raise UserError(f"{label} {in_json}: file not found")
    return read_metadata(in_json, f"{label} ")


def write_metadata(path: str, metadata: dict) -> None:
    """The metadata JSON, written atomically (kohya's layout: indent 2)."""
    try:
        atomic_write_text(path, json.dumps(metadata, indent=2))
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


@dataclass
class MergeResult:
    images: int
    merged: int
    missing: list[str] = field(default_factory=list)  # images without a text file: left as they were


def merge_text_files(train_data_dir: str, out_json: str, in_json: str | None, extension: str, name: str,
                     full_path: bool = False, recursive: bool = False) -> MergeResult:
    """Put each image's `<stem><extension>` text (stripped) under `name` ("caption" or "tags") in the
    metadata read from in_json (else from out_json when it exists, as kohya), and write out_json."""
    _check_recursive(recursive, full_path)
    if not extension.startswith("."):
        extension = "." + extension
    images = keyed_images(find_images(train_data_dir, recursive), full_path)
    if not images:
        raise UserError(f"train_data_dir {train_data_dir}: no images ({', '.join(_image_types())})")
    if in_json is None and os.path.isfile(out_json):
        in_json = out_json
    metadata = _existing(in_json, "--in_json")
    result = MergeResult(len(images), 0)
    for key, path in images.items():
        text_path = os.path.splitext(path)[0] + extension
        if not os.path.isfile(text_path):
            result.missing.append(path)
            continue
        try:
            with open(text_path, encoding="utf-8") as handle:
                text = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {text_path}: {exc}; save it as UTF-8 text") from None
        metadata.setdefault(key, {})[name] = text
        logger.debug("%s: %s", key, text)
        result.merged += 1
    if result.missing:
        logger.warning("%d of %d images have no %s file (first: %s): their entries are left as they were",
                       len(result.missing), len(images), extension, result.missing[0])
    write_metadata(out_json, metadata)
    logger.info("%s: %s of %d images merged, %d entries in all", out_json, name, result.merged, len(metadata))
    return result


def _image_types() -> list[str]:
    from library.dataset.images import IMAGE_EXTENSIONS

    return list(IMAGE_EXTENSIONS)


# --- buckets and latents ----------------------------------------------------------------------------

@dataclass
class PrepareResult:
    buckets: dict[str, bk.Size]  # key -> train_resolution
    encoded: int  # images whose latents were written
    skipped: list[str] = field(default_factory=list)  # unreadable images, left out as kohya does
    added: int = 0  # keys that were not in in_json before


def bucket_settings(args):
    """The bucket rules of `args` as the training dataset applies them (BucketSettings), with bucketing
    on: --max_resolution stands for training's --resolution."""
    from library.dataset.loader import BucketSettings

    cfg = SimpleNamespace(resolution=args.max_resolution, enable_bucket=True, min_bucket_reso=args.min_bucket_reso,
                          max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
                          bucket_no_upscale=args.bucket_no_upscale)
    if bk.is_multires(args.max_resolution):
        raise UserError(f"--max_resolution {args.max_resolution}: expected WIDTH,HEIGHT, e.g. 512,512")
    try:
        return BucketSettings.from_cfg(cfg)
    except UserError as exc:
        raise UserError(str(exc).replace("--resolution", "--max_resolution")) from None


def place_images(sizes: dict[str, bk.Size], settings) -> dict[str, object]:
    """{path: ImageRecord} placed as the training run will place them from train_resolution: the bucket
    the settings choose, rounded down to whole latent cells (kohya), then covered and centre-cropped."""
    from library.dataset.loader import ImageRecord

    predefined = settings.predefined()
    placed = {}
    for path, size in sizes.items():
        chosen = ImageRecord(path, "", 1, False, size)
        settings.place(chosen, predefined)
        bucket = tuple(side - side % METADATA_STRIDE for side in chosen.bucket)
        if min(bucket) == 0:
            raise UserError(f"image {path} ({size[0]}x{size[1]}) gets bucket {chosen.bucket}, smaller than a "
                            f"latent cell ({METADATA_STRIDE} px): remove it or change the bucket options")
        record = ImageRecord(path, "", 1, False, size, metadata_bucket=bucket)
        settings.place(record, predefined)
        placed[path] = record
    return placed


class _Records:
    """What caching.cache_latents and DiskLatentCache read of a dataset: its records and options."""

    def __init__(self, records: list, augment):
        from library.dataset.masks import NO_MASKS

        self.records = self.variants = records
        self.augment = augment
        self.masks = NO_MASKS
        self.latent_cache = None


def load_vae_family(args):
    """The model family of model_name_or_path (any family) with its VAE on the device, in --mixed_precision
    unless --no_half_vae."""
    from library.models import load_model

    cfg = SimpleNamespace(pretrained_model_name_or_path=args.model_name_or_path, vae=args.vae,
                          unsafe_load_ckpt=False, max_token_length=None, v_parameterization=False)
    family = load_model(cfg)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if args.no_half_vae:
        dtype = torch.float32
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    family.vae.requires_grad_(False)
    family.vae.eval()
    family.vae.to(device)
    if dtype != torch.float32:
        family.vae.to(dtype=dtype)
    return family


def prepare_buckets_latents(args, family=None) -> PrepareResult:
    """kohya's prepare_buckets_latents (see the module doc). `family` (a loaded model family) is for tests;
    by default model_name_or_path is loaded."""
    from library import caching
    from library.dataset.images import Augmentation

    if args.alpha_mask:
        raise not_supported("alpha_mask")
    _check_recursive(args.recursive, args.full_path)
    settings = bucket_settings(args)
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    images = keyed_images(find_images(args.train_data_dir, args.recursive), args.full_path)
    if not images:
        raise UserError(f"train_data_dir {args.train_data_dir}: no images ({', '.join(_image_types())})")
    if not os.path.isfile(args.in_json):  # kohya needs a metadata file to add the buckets to
        raise UserError(f"in_json {args.in_json}: file not found (make it with merge_captions_to_metadata.py)")
    metadata = read_metadata(args.in_json, "in_json ")
    skipped: list[str] = []
    sizes = usable_images(list(images.values()), True, skipped)
    for line in skipped:
        logger.warning("skipped %s", line)
    placed = place_images(sizes, settings)
    loaded = family is None
    family = load_vae_family(args) if loaded else family
    divisor = family.bucket_divisor
    if loaded:
        family.unet, family.text_encoders = None, []  # only the VAE is needed: free the rest
    for record in placed.values():
        if record.bucket[0] % divisor or record.bucket[1] % divisor:
            raise UserError(f"image {record.path}: bucket {list(record.bucket)} is not divisible by {divisor}, "
                            f"which this model needs: use a --bucket_reso_steps divisible by {divisor}")
    augment = Augmentation(flip=args.flip_aug)
    records = list(placed.values())
    cache = caching.make_latent_cache(SimpleNamespace(cache_latents_to_disk=True), family.vae, family.name)
    todo = cache.missing(records, augment)
    if not args.skip_existing:
        todo = records  # kohya's default: encode every image again
    for batch in caching.plan_cache_batches(todo, args.batch_size, augment):
        latents, flipped = caching.encode_batch(batch, family.encode_images, augment)
        for i, record in enumerate(batch):
            cache.put(record, latents[i].clone(), None if flipped is None else flipped[i].clone())
    result = PrepareResult({}, len(todo), skipped)
    for key, path in images.items():
        if path not in placed:
            continue
        result.added += key not in metadata
        result.buckets[key] = placed[path].bucket
        metadata.setdefault(key, {})["train_resolution"] = list(placed[path].bucket)
    _log_buckets(placed)
    if result.added:
        logger.warning("%d images had no entry in %s: added with train_resolution only; give them a caption or "
                       "tags before training", result.added, args.in_json)
    write_metadata(args.out_json, metadata)
    return result


def _log_buckets(placed: dict) -> None:
    counts: dict[bk.Size, int] = {}
    for record in placed.values():
        counts[record.bucket] = counts.get(record.bucket, 0) + 1
    for i, (bucket, count) in enumerate(sorted(counts.items())):
        logger.info("bucket %d %s: %d", i, bucket, count)
    if placed:
        errors = [abs(r.ar_error) for r in placed.values()]
        logger.info("mean ar error: %.4f", sum(errors) / len(errors))
