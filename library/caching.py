"""Latent caching: encode each unique training image once, before training, and reuse the latents.

A cache has `missing(records)` (the records it cannot serve), `put(record, latents)` and
`get(path) -> Tensor` (what dataset items read). `MemoryLatentCache` keeps latents in RAM for one run;
`DiskLatentCache` keeps them in kohya's `.npz` files next to the images, so they outlive the run and are
shared with kohya sd-scripts in both directions. Images are encoded in batches of one bucket size.

kohya's SD/SDXL disk format (library/strategy_sd.py, v0.9+): `<stem>_<W:04d>x<H:04d>_sd.npz` (W x H the
original image size; `<stem>.npz` from older versions is used instead when it exists), holding per
latent size h x w (= bucket / 8) the keys `latents_<h>x<w>` (float32 (4, h, w), the raw VAE sample,
not yet times the scaling factor), `original_size_<h>x<w>` ([W, H]), `crop_ltrb_<h>x<w>` and, with
--flip_aug, `latents_flipped_<h>x<w>` (the encoding of the mirrored image). kohya reads
no other keys and keeps unknown ones when it adds a resolution, so sdtune stores next to them
`sdtune_fingerprint_<h>x<w>`: a JSON record of everything that produced the latents. A cache whose
fingerprint differs from the current run is stale and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from library.dataset.buckets import center_crop_offsets, kohya_crop_ltrb  # noqa: F401  (also caching's name)
from library.dataset.images import PLAIN, Augmentation, load_pixels
from library.dataset import text_cache
from library.dataset.masks import NO_MASKS, MaskSource, latent_mask, to_latent_size
from library.errors import UserError
from library.saving import atomic_write_npz

logger = logging.getLogger(__name__)

SD_SUFFIX = "_sd.npz"  # kohya's SD 1.x / 2.x cache; SDXL uses "_sdxl.npz"
OLD_SUFFIX = ".npz"
FAMILY_SUFFIXES = {"sdxl": "_sdxl.npz"}  # kohya's strategy_sdxl; SD 1.x / 2.x share SD_SUFFIX
LATENT_STRIDE = 8
FINGERPRINT_VERSION = 1
# Anything that goes wrong while reading an npz means it is no usable cache (truncated zip, bad header, ...).
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


class LatentCache(Protocol):
    def missing(self, records: list, augment: Augmentation = PLAIN, masks: MaskSource = NO_MASKS) -> list: ...

    def put(self, record, latents: torch.Tensor, flipped: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> None: ...

    def get(self, key: str, flipped: bool = False) -> torch.Tensor | None: ...

    def get_mask(self, key: str) -> torch.Tensor | None: ...


def cache_key(record) -> str:
    """What a cache files a record's latents under: its path, with its bucket when the image trains at
    several sizes (ImageRecord.cache_key)."""
    return getattr(record, "cache_key", record.path)


def options_of(record, augment: Augmentation = PLAIN, masks: MaskSource = NO_MASKS) -> tuple:
    """(augmentation, mask source) of a record: its subset's (a dataset config sets them per subset), else
    the ones given for the whole dataset."""
    own_augment, own_masks = getattr(record, "augment", None), getattr(record, "masks", None)
    return (augment if own_augment is None else own_augment), (masks if own_masks is None else own_masks)


class MemoryLatentCache:
    """Latents in RAM, keyed by image path (and bucket, with several resolutions; and those of the mirrored image with --flip_aug, and the
    latent-size loss mask with masks on); float32 on the CPU."""

    def __init__(self) -> None:
        self._latents: dict[str, torch.Tensor] = {}
        self._flipped: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] = {}

    def missing(self, records: list, augment: Augmentation = PLAIN, masks: MaskSource = NO_MASKS) -> list:
        return [r for r in records if self._lacks(r, *options_of(r, augment, masks))]

    def _lacks(self, record, augment: Augmentation, masks: MaskSource) -> bool:
        key = cache_key(record)
        return (key not in self._latents or (augment.flip and key not in self._flipped)
                or (masks.enabled and key not in self._masks))

    def get_mask(self, key: str) -> torch.Tensor | None:
        return self._masks.get(key)

    def get(self, key: str, flipped: bool = False) -> torch.Tensor | None:
        return (self._flipped if flipped else self._latents).get(key)

    def put(self, record, latents: torch.Tensor, flipped: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> None:
        self._latents[cache_key(record)] = latents
        if flipped is not None:
            self._flipped[cache_key(record)] = flipped
        if mask is not None:
            self._masks[cache_key(record)] = mask

    def __len__(self) -> int:
        return len(self._latents)


# --- kohya's names and values ---------------------------------------------------------------------

def npz_path(image_path: str, original_size: tuple[int, int], suffix: str = SD_SUFFIX) -> str:
    """kohya's cache file of an image: the old `<stem>.npz` when it exists, else `<stem>_WWWWxHHHH_sd.npz`."""
    stem = os.path.splitext(image_path)[0]
    if os.path.exists(stem + OLD_SUFFIX):
        return stem + OLD_SUFFIX
    return f"{stem}_{original_size[0]:04d}x{original_size[1]:04d}{suffix}"


def key_suffix(bucket: tuple[int, int]) -> str:
    """The per-resolution key suffix: latent height x width, e.g. bucket (64, 96) -> "_12x8"."""
    return f"_{bucket[1] // LATENT_STRIDE}x{bucket[0] // LATENT_STRIDE}"


# --- fingerprints ---------------------------------------------------------------------------------

def vae_fingerprint(vae, max_tensors: int = 8, max_elements: int = 1 << 20) -> str:
    """Identity of a VAE as an encoder: its config, dtype and a sample of its weights (hashed in full up to
    `max_elements` each), so a fine-tuned VAE with the same config is told apart in milliseconds."""
    digest = hashlib.sha256()
    config = {k: v for k, v in _config_dict(vae).items() if not k.startswith("_") and k != "transformers_version"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = vae.state_dict()
    names = sorted(state)
    step = max(1, len(names) // max_tensors)
    for name in names[::step][:max_tensors]:
        tensor = state[name].detach().reshape(-1)[:max_elements].to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(state[name].shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _config_dict(model) -> dict:
    """A diffusers config (a dict) or a transformers one (to_dict), without paths and versions."""
    config = getattr(model, "config", {})
    return dict(config) if isinstance(config, dict) or not hasattr(config, "to_dict") else config.to_dict()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def producer(record, vae_id: str, flip: bool = False, interpolation: str | None = None) -> dict:
    """What decides a record's latents besides the image bytes: pixel geometry, resize filter, the encoder,
    and whether the mirrored image's latents are stored too. The filter is recorded only when one was
    named, so caches written before --resize_interpolation existed stay valid."""
    made = {
        "version": FINGERPRINT_VERSION,
        "bucket": list(record.bucket),
        "resized": list(record.resized),
        "crop": list(center_crop_offsets(record.resized, record.bucket)),
        "flip": flip,
        "vae": vae_id,
    }
    if interpolation is not None:
        made["interpolation"] = interpolation
    return made


def _serves(stored: dict, wanted: dict) -> bool:
    """Latents made by `stored` can stand in for `wanted`: the same producer, except that latents stored
    with their mirror image also serve a run without --flip_aug."""
    same = {k: v for k, v in stored.items() if k != "flip"} == {k: v for k, v in wanted.items() if k != "flip"}
    return same and (stored.get("flip") is True or not wanted["flip"])


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


# --- the disk cache -------------------------------------------------------------------------------

FINGERPRINT_KEY = "sdtune_fingerprint"
FLIPPED_KEY = "latents_flipped"
REUSED = ("valid", "foreign", "trusted")


@dataclass
class _Entry:
    """Where one image's latents live and what must have produced them."""

    npz: str
    suffix: str
    producer: dict
    image_stat: tuple[int, int]  # (bytes, mtime_ns) when the run started
    mask: dict | None = None  # MaskSource.identity when masks are on: the file must hold that mask


@dataclass
class DiskLatentCache:
    """kohya's `.npz` files next to the images (see the module doc).

    Latents are read from disk when a batch needs them, as kohya does, so a large dataset need not fit
    in RAM. `skip_check` is kohya's --skip_cache_check: an existing file is trusted without opening it.
    `scale` is the VAE scaling factor: files hold kohya's raw latents, `get` returns scaled ones.
    """

    vae_id: str
    scale: float
    skip_check: bool = False
    suffix: str = SD_SUFFIX
    counts: dict = field(default_factory=dict, init=False)
    _entries: dict = field(default_factory=dict, init=False, repr=False)

    def missing(self, records: list, augment: Augmentation = PLAIN, masks: MaskSource = NO_MASKS) -> list:
        """Check every record's file; returns the records whose latents must be (re-)encoded."""
        self.counts = dict.fromkeys(REUSED + ("missing", "stale", "unreadable"), 0)
        todo = []
        for record in tqdm(records, desc="checking latent cache files", smoothing=1):
            aug, source = options_of(record, augment, masks)
            entry = _Entry(npz_path(record.path, record.size, self.suffix), key_suffix(record.bucket),
                           producer(record, self.vae_id, aug.flip, aug.interpolation), _stat(record.path),
                           source.identity(record.path) if source.enabled else None)
            self._entries[cache_key(record)] = entry
            state = self._state(record, entry)
            self.counts[state] += 1
            if state not in REUSED:
                todo.append(record)
        self._log_counts()
        return todo

    def _state(self, record, entry: _Entry) -> str:
        if not os.path.exists(entry.npz):
            return "missing"
        if self.skip_check:
            return "trusted"
        try:
            with np.load(entry.npz) as npz:
                return self._judge(record, entry, npz)
        except _READ_ERRORS as exc:  # an interrupted write by another tool: rebuilding is the only fix
            logger.warning("latent cache %s cannot be read (%s): rebuilding it", entry.npz, exc)
            return "unreadable"

    def _judge(self, record, entry: _Entry, npz) -> str:
        """valid / foreign (kohya's, no fingerprint, plausible) / stale / missing (other sizes only)."""
        s = entry.suffix
        if "latents" + s not in npz.files:
            return "missing"
        latents = npz["latents" + s]
        if latents.ndim != 3 or latents.shape[1:] != _latent_hw(record.bucket):
            return "stale"
        if FINGERPRINT_KEY + s not in npz.files:
            return self._judge_foreign(record, entry, npz)
        fingerprint = json.loads(str(npz[FINGERPRINT_KEY + s]))
        if not _serves(fingerprint.get("producer") or {}, entry.producer) or fingerprint.get("latents_sha256") != _array_sha256(latents):
            return "stale"  # another encoder, geometry, or latents rewritten by a tool that kept our key
        if entry.producer["flip"] and not _has_flipped(npz, s, record.bucket, fingerprint.get("flipped_sha256", "")):
            return "stale"
        if entry.mask is not None and (fingerprint.get("mask") != entry.mask or not _has_mask(npz, entry)):
            return "stale"  # masks turned on, another mask source, or the mask file changed
        return "valid" if _same_image(record.path, entry.image_stat, fingerprint.get("image", {})) else "stale"

    def _judge_foreign(self, record, entry: _Entry, npz) -> str:
        """A cache without our fingerprint (kohya wrote it): kohya's own test (the latent size fits the
        bucket) plus what can be checked without the encoder: the original size, and that the image has
        not changed since the file was written."""
        size_key = "original_size" + entry.suffix
        if size_key not in npz.files or tuple(npz[size_key].tolist()) != tuple(record.size):
            return "stale"
        if entry.producer["flip"] and not _has_flipped(npz, entry.suffix, record.bucket):
            return "stale"  # kohya re-caches such a file too
        if entry.mask is not None and entry.mask["kind"] not in ("alpha", "none"):
            return "stale"  # kohya stores no mask files' masks
        if entry.mask is not None and entry.mask["kind"] == "alpha" and not _has_mask(npz, entry):
            return "stale"  # kohya re-caches without alpha_mask too
        return "foreign" if os.stat(entry.npz).st_mtime_ns >= entry.image_stat[1] else "stale"

    def _log_counts(self) -> None:
        c = self.counts
        logger.info("latent cache files: %d valid, %d missing, %d stale, %d unreadable, %d trusted unchecked",
                    c["valid"] + c["foreign"], c["missing"], c["stale"], c["unreadable"], c["trusted"])
        if c["foreign"]:
            logger.warning("reusing %d latent cache files written without an sdtune fingerprint (by kohya?): "
                           "their VAE cannot be checked; delete them if the VAE changed", c["foreign"])

    def put(self, record, latents: torch.Tensor, flipped: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> None:
        """Write the record's latents (and its mirror image's, and its latent-size mask) with kohya's keys
        and our fingerprint, keeping other sizes' keys."""
        entry = self._entries[cache_key(record)]
        s = entry.suffix
        raw = self._raw(latents)
        arrays = _kept_arrays(entry)
        arrays["latents" + s] = raw
        arrays["original_size" + s] = np.array(record.size)
        arrays["crop_ltrb" + s] = np.array(kohya_crop_ltrb(record.bucket, record.size))
        image = {"bytes": entry.image_stat[0], "mtime_ns": entry.image_stat[1], "sha256": file_sha256(record.path)}
        made = dict(entry.producer, flip=flipped is not None)
        fingerprint = {"producer": made, "image": image, "latents_sha256": _array_sha256(raw)}
        if flipped is not None:
            arrays[FLIPPED_KEY + s] = self._raw(flipped)
            fingerprint["flipped_sha256"] = _array_sha256(arrays[FLIPPED_KEY + s])
        if entry.mask is not None and mask is not None:
            arrays[_mask_key(entry)] = mask[0].detach().to("cpu", torch.float32).numpy()
            fingerprint["mask"] = entry.mask
        arrays[FINGERPRINT_KEY + s] = np.array(json.dumps(fingerprint, sort_keys=True))
        try:
            atomic_write_npz(entry.npz, arrays)
        except OSError as exc:
            raise UserError(f"cannot write latent cache {entry.npz}: {exc.strerror or exc}; make the folder "
                            "writable or use --cache_latents without --cache_latents_to_disk") from None

    def _raw(self, latents: torch.Tensor) -> np.ndarray:
        return (latents.detach().to("cpu", torch.float32) / self.scale).numpy()

    def get(self, key: str, flipped: bool = False) -> torch.Tensor:
        entry = self._entries[key]
        s = entry.suffix
        raw = _read_array(entry.npz, (FLIPPED_KEY if flipped else "latents") + s)
        if raw.ndim != 3 or raw.shape[1:] != _latent_hw(entry.producer["bucket"]):
            raise UserError(f"latent cache {entry.npz} holds latents of shape {raw.shape}, not the bucket's: "
                            "delete it or run without --skip_cache_check to rebuild it")
        return torch.from_numpy(raw).float() * self.scale

    def get_mask(self, key: str) -> torch.Tensor | None:
        """The latent-size mask (1, h, w); a pixel-size one (kohya's alpha_mask) is area-averaged down."""
        entry = self._entries[key]
        if entry.mask is None or entry.mask["kind"] == "none":
            return None
        mask = torch.from_numpy(_read_array(entry.npz, _mask_key(entry))).float()
        if tuple(mask.shape) != _latent_hw(entry.producer["bucket"]):
            mask = to_latent_size(mask)
        return mask.reshape(1, *_latent_hw(entry.producer["bucket"]))

    def __len__(self) -> int:
        return len(self._entries)


def _latent_hw(bucket) -> tuple[int, int]:
    return (bucket[1] // LATENT_STRIDE, bucket[0] // LATENT_STRIDE)


def _mask_key(entry: _Entry) -> str:
    """kohya's `alpha_mask_<h>x<w>` for alpha masks (kohya holds them at pixel size, sdtune at latent
    size; both readers area-average to the size they need); our own key for mask files, which kohya
    must not take for alpha masks."""
    return ("alpha_mask" if entry.mask["kind"] == "alpha" else "sdtune_masklabel") + entry.suffix


def _has_mask(npz, entry: _Entry) -> bool:
    return entry.mask["kind"] == "none" or _mask_key(entry) in npz.files


def _has_flipped(npz, suffix: str, bucket, sha256: str | None = None) -> bool:
    """The file holds the mirror image's latents at the bucket's size (and, when given, those we wrote)."""
    if FLIPPED_KEY + suffix not in npz.files:
        return False
    flipped = npz[FLIPPED_KEY + suffix]
    if flipped.ndim != 3 or flipped.shape[1:] != _latent_hw(bucket):
        return False
    return sha256 is None or sha256 == _array_sha256(flipped)


def _same_image(path: str, stat: tuple[int, int], recorded: dict) -> bool:
    """Same bytes as when the latents were written: size, then mtime, and only if that moved the content
    hash, so a copy or a `touch` does not cost a re-encode."""
    if recorded.get("bytes") != stat[0]:
        return False
    return recorded.get("mtime_ns") == stat[1] or recorded.get("sha256") == file_sha256(path)


def _kept_arrays(entry: _Entry) -> dict:
    """The file's arrays for other latent sizes (kohya keeps them too); none from an unreadable file."""
    if not os.path.exists(entry.npz):
        return {}
    try:
        with np.load(entry.npz) as npz:
            return {k: npz[k] for k in npz.files if not k.endswith(entry.suffix)}
    except _READ_ERRORS:
        return {}


# --- filling a cache ------------------------------------------------------------------------------

def resolve_cache_options(cfg) -> None:
    """kohya's rules: --cache_latents_to_disk turns on --cache_latents (so ss_cache_latents says so too),
    --cache_text_encoder_outputs_to_disk turns on --cache_text_encoder_outputs;
    augmentations that change the pixels every epoch cannot use latents encoded once."""
    if getattr(cfg, "cache_latents_to_disk", False):
        cfg.cache_latents = True
    if getattr(cfg, "cache_text_encoder_outputs_to_disk", False):  # kohya's sdxl_train_network does the same
        cfg.cache_text_encoder_outputs = True
    if not getattr(cfg, "cache_latents", False):
        return
    for name in ("color_aug", "random_crop", "face_crop_aug_range"):
        if getattr(cfg, name, None):
            raise UserError(f"--{name} changes the pixels every epoch, so it cannot be used with --cache_latents "
                            f"or --cache_latents_to_disk: turn off one of them")


def make_latent_cache(cfg, vae, family_name: str = "sd1") -> LatentCache:
    """The cache the options ask for: kohya's npz files with --cache_latents_to_disk (named per family, as
    kohya's caching strategies do), else memory."""
    if not getattr(cfg, "cache_latents_to_disk", False):
        return MemoryLatentCache()
    return DiskLatentCache(vae_fingerprint(vae), float(vae.config.scaling_factor),
                           bool(getattr(cfg, "skip_cache_check", False)), FAMILY_SUFFIXES.get(family_name, SD_SUFFIX))


def plan_cache_batches(records: list, batch_size: int, augment: Augmentation = PLAIN) -> list[list]:
    """Unique records in encoder batches: grouped by bucket (smallest area first) and by augmentation
    (whether the mirror image is encoded too), at most batch_size each."""
    def group(record) -> tuple:
        return record.bucket, options_of(record, augment)[0]

    ordered = sorted(records, key=lambda r: (r.bucket[0] * r.bucket[1], r.bucket, group(r)[1].flip, r.path))
    batches: list[list] = []
    for record in ordered:
        if batches and len(batches[-1]) < batch_size and group(batches[-1][0]) == group(record):
            batches[-1].append(record)
        else:
            batches.append([record])
    return batches


def batch_masks(records: list, augment: Augmentation, masks: MaskSource) -> list:
    """Each record's latent-size mask, cut as its cached latents (no random crop, not flipped); None where
    its mask source is off."""
    found = []
    for record in records:
        aug, source = options_of(record, augment, masks)
        found.append(latent_mask(source, record.path, record.size, record.resized, record.bucket,
                                 aug.interpolation) if source.enabled else None)
    return found


def encode_batch(records: list, encode: Callable[[torch.Tensor], torch.Tensor],
                 augment: Augmentation = PLAIN) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load, resize and crop a batch of one bucket size, then encode it: latents (B, C, H/8, W/8) on the CPU,
    and with augment.flip those of the mirrored pixels (a second encoder call, as kohya)."""
    pixels = torch.stack([load_pixels(r.path, r.resized, r.bucket, augment) for r in records])
    flipped = _encode(encode, torch.flip(pixels, dims=[3]), len(records)) if augment.flip else None
    return _encode(encode, pixels, len(records)), flipped


def _encode(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, count: int) -> torch.Tensor:
    with torch.no_grad():
        latents = encode(pixels)
    if latents.shape[0] != count:
        raise ValueError(f"encoder returned {latents.shape[0]} latents for {count} images")
    return latents.detach().to("cpu", torch.float32)


def cache_latents(dataset, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1,
                  cache: LatentCache | None = None) -> LatentCache:
    """Encode every image of `dataset` that `cache` cannot serve (once, not once per repeat); attach the cache.

    `encode` takes pixels (B, 3, H, W) in [-1, 1] and returns scaled latents (the model family's
    encode_images). After this, dataset items carry latents and no image is decoded again. For records
    whose augmentation flips (options_of: their subset's, else dataset.augment) the mirrored images are
    encoded too, and each occurrence picks one of the two.
    """
    augment, masks = getattr(dataset, "augment", PLAIN), getattr(dataset, "masks", NO_MASKS)
    # one record per (image, size): the sizes an image trains at (dataset.variants) share a file or entry
    unique = {cache_key(r): r for r in getattr(dataset, "variants", dataset.records)}
    if any(options_of(r, augment)[0].changes_pixels_per_sample for r in unique.values()):
        # resolve_cache_options and the dataset config refuse these options before this point
        raise ValueError("latents cannot be cached with color_aug, random_crop or face_crop_aug_range")
    cache = cache if cache is not None else MemoryLatentCache()
    todo = cache.missing(list(unique.values()), augment, masks)
    batches = plan_cache_batches(todo, max(1, int(batch_size)), augment)
    logger.info("caching latents of %d images in %d batches", len(todo), len(batches))
    for batch in tqdm(batches, desc="caching latents", smoothing=1):
        latents, flipped = encode_batch(batch, encode, options_of(batch[0], augment)[0])
        for i, (record, mask) in enumerate(zip(batch, batch_masks(batch, augment, masks))):
            # clone: do not keep the whole batch's storage alive
            cache.put(record, latents[i].clone(), None if flipped is None else flipped[i].clone(), mask)
    dataset.latent_cache = cache
    return cache


def _read_array(npz_path: str, name: str) -> np.ndarray:
    """One array of a cache file; a missing or unreadable one is a one-line error saying how to rebuild."""
    try:
        with np.load(npz_path) as npz:
            return npz[name]
    except _READ_ERRORS as exc:
        raise UserError(f"latent cache {npz_path} has no readable {name} ({type(exc).__name__}): delete "
                        "it or run without --skip_cache_check to rebuild it") from None


# --- text-encoder outputs (library/dataset/text_cache.py) -----------------------------------------

def check_text_cache_options(cfg, dataset, text_encoder_trains: bool | None = None) -> None:
    """Before the model loads: --cache_text_encoder_outputs needs frozen text encoders and captions that
    never change; anything else is a one-line UserError naming the option."""
    text_cache.check_options(cfg, dataset, text_encoder_trains)


def make_text_cache(cfg, family):
    """kohya's `_te_outputs.npz` files with --cache_text_encoder_outputs_to_disk, else memory."""
    if not getattr(cfg, "cache_text_encoder_outputs_to_disk", False):
        return text_cache.MemoryTextCache()
    encoders = [vae_fingerprint(te) for te in family.text_encoders]
    return text_cache.DiskTextCache(text_cache.producer(cfg, family, encoders), text_cache.expected_shapes(cfg, family),
                                    bool(getattr(cfg, "skip_cache_check", False)))


def cache_text_encoder_outputs(dataset, family, cfg, device) -> None:
    """Encode each image's caption once (family.encode_conditioning, no grad, on `device`, batches of
    --vae_batch_size or the train batch size, whichever is larger) and attach the cache: every later
    batch carries "text_outputs". The text encoders stay on `device`; the caller moves them."""
    for te in family.text_encoders:
        te.to(device)
    cache = make_text_cache(cfg, family)
    batch_size = max(int(getattr(cfg, "vae_batch_size", 1) or 1), int(getattr(cfg, "train_batch_size", 1) or 1))
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(getattr(cfg, "mixed_precision", None))

    def encode(captions: list[str]) -> dict:
        if half is None:
            return family.encode_conditioning(captions)
        with torch.autocast(torch.device(device).type, dtype=half):  # as the training step encodes without the cache
            return family.encode_conditioning(captions)

    text_cache.fill(cache, text_cache.fixed_captions(dataset), encode, batch_size)
    dataset.text_cache = cache
