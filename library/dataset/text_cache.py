"""Cached text-encoder outputs: --cache_text_encoder_outputs and --cache_text_encoder_outputs_to_disk.

Each image's caption is encoded once before training (the family's encode_conditioning, no grad) and
every batch then carries the outputs as "text_outputs", so the text encoders may leave the GPU. The
captions must therefore be the same at every step: check_options refuses what changes them.

Disk format (kohya's SdxlTextEncoderOutputsCachingStrategy, library/strategy_sdxl.py):
`<image stem>_te_outputs.npz` beside the image, holding one sample's arrays without the batch dimension
under encode_conditioning's keys: SDXL `hidden_state1` (L, 768), `hidden_state2` (L, 1280), `pool2`
(1280,); SD 1.x / 2.x `hidden_state` (L, D) (kohya caches no SD 1.x / 2.x outputs to disk; the name
follows the SDXL ones). L = 77, or --max_token_length + 2. kohya stores nothing else (no caption) and
reuses any file that holds those keys; sdtune adds `sdtune_fingerprint` (JSON: the caption and what
encoded it), which kohya never reads, and re-encodes when it differs. A file without it (kohya's) is
reused when its arrays have the expected shapes, with a warning: its caption cannot be checked.
"""

from __future__ import annotations

import json
import logging
import os
import random
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from library.dataset.captions import process_caption
from library.errors import UserError
from library.saving import atomic_write_npz

logger = logging.getLogger(__name__)

NPZ_SUFFIX = "_te_outputs.npz"
FINGERPRINT_KEY = "sdtune_fingerprint"
FINGERPRINT_VERSION = 1
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
# CaptionOptions field -> the option that sets it: each makes a caption differ between steps
_CHANGING = (("shuffle", "shuffle_caption"), ("dropout_rate", "caption_dropout_rate"),
             ("dropout_every_n_epochs", "caption_dropout_every_n_epochs"),
             ("tag_dropout_rate", "caption_tag_dropout_rate"), ("token_warmup_step", "token_warmup_step"),
             ("enable_wildcard", "enable_wildcard"))


def npz_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + NPZ_SUFFIX


# --- what may be cached ---------------------------------------------------------------------------

def trains_text_encoder(cfg) -> bool:
    """A network run trains the text encoders unless --network_train_unet_only (kohya's rule for the cache)."""
    if hasattr(cfg, "network_train_unet_only"):
        return not cfg.network_train_unet_only
    return bool(getattr(cfg, "train_text_encoder", False))


def _datasets(dataset) -> list:
    return list(getattr(dataset, "datasets", [dataset]))


def check_options(cfg, dataset, text_encoder_trains: bool | None = None) -> None:
    """Refuse, in one line, what cached outputs cannot serve: a text encoder that trains (the run's method
    says whether one does; by default the network rule), and captions that change between steps (an option
    on for the run or for one subset, or a caption file of several lines, of which sdtune draws one per sample)."""
    if text_encoder_trains is None:
        text_encoder_trains = trains_text_encoder(cfg)
    if text_encoder_trains and getattr(cfg, "train_text_encoder", False):
        raise UserError("--cache_text_encoder_outputs cannot be used with --train_text_encoder: a text encoder "
                        "that trains cannot use outputs encoded once (kohya refuses it too)")
    if text_encoder_trains:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only: a text encoder that "
                        "trains cannot use outputs encoded once (kohya refuses it too)")
    for ds in _datasets(dataset):
        for record in ds.records:
            opts = record.caption_options or ds.caption_options
            for attribute, option in _CHANGING:
                if getattr(opts, attribute):
                    where = f" for {os.path.dirname(record.path)}" if record.caption_options is not None else ""
                    raise UserError(f"--cache_text_encoder_outputs needs captions that never change, but "
                                    f"--{option} is on{where}: turn one of them off")
            lines = record.caption.count("\n") + 1
            if lines > 1:
                raise UserError(f"--cache_text_encoder_outputs needs one caption per image, but the caption file "
                                f"of {record.path} has {lines} lines (one is drawn per step): keep one line, "
                                "or turn the cache off")


def fixed_captions(dataset) -> list[tuple[str, str]]:
    """(image path, caption) of every image: the caption it trains with at every step (check_options
    made sure there is one), prefix and suffix included."""
    pairs = {}
    for ds in _datasets(dataset):
        for record in ds.records:
            opts = record.caption_options or ds.caption_options
            pairs[(record.path, process_caption(record.caption, opts, 0, random.Random(0)))] = None
    return list(pairs)


def expected_shapes(cfg, family) -> dict[str, tuple] | None:
    """Each key's per-sample shape, worked out without running an encoder (None when a text encoder has
    no transformers config): one encoder gives `hidden_state`, two (SDXL) kohya's three SDXL keys."""
    length = (getattr(cfg, "max_token_length", None) or 75) + 2
    try:
        sizes = [int(te.config.hidden_size) for te in family.text_encoders]
        if len(sizes) == 1:
            return {"hidden_state": (length, sizes[0])}
        return {"hidden_state1": (length, sizes[0]), "hidden_state2": (length, sizes[1]),
                "pool2": (int(family.text_encoders[1].config.projection_dim),)}
    except AttributeError:
        return None


def producer(cfg, family, encoder_ids: list[str]) -> dict:
    """What decides the outputs besides the caption: the encoders (config, dtype, sampled weights) and
    the options that change how a caption is encoded."""
    return {"version": FINGERPRINT_VERSION, "family": family.name, "encoders": encoder_ids,
            "max_token_length": getattr(cfg, "max_token_length", None) or 75,
            "clip_skip": getattr(cfg, "clip_skip", None), "weighted_captions": bool(getattr(cfg, "weighted_captions", False))}


# --- the caches -----------------------------------------------------------------------------------

def _stack(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class MemoryTextCache:
    """Outputs in RAM (float32, CPU), one entry per distinct caption: images that share a caption share it."""

    def __init__(self) -> None:
        self._outputs: dict[str, dict[str, torch.Tensor]] = {}

    def missing(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(path, caption) for path, caption in pairs if caption not in self._outputs]

    def put(self, path: str, caption: str, outputs: dict[str, torch.Tensor]) -> None:
        self._outputs[caption] = outputs

    def batch(self, paths: list[str], captions: list[str]) -> dict[str, torch.Tensor]:
        lost = [c for c in captions if c not in self._outputs]
        if lost:  # check_options refuses whatever changes a caption; this is a bug, not bad input
            raise RuntimeError(f"caption {lost[0]!r} has no cached text-encoder outputs")
        return _stack([self._outputs[c] for c in captions])

    def __len__(self) -> int:
        return len(self._outputs)


@dataclass
class DiskTextCache:
    """kohya's `<stem>_te_outputs.npz` files (see the module doc), read when a batch needs them.
    `skip_check` is kohya's --skip_cache_check: an existing file is trusted without opening it."""

    producer: dict
    shapes: dict | None
    skip_check: bool = False
    counts: dict = field(default_factory=dict, init=False)

    def missing(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        paths: dict[str, str] = {}
        for path, caption in pairs:
            if paths.setdefault(path, caption) != caption:
                raise UserError(f"{path} trains with two captions ({paths[path]!r} and {caption!r}) in different "
                                "datasets: one _te_outputs.npz cannot hold both; use "
                                "--cache_text_encoder_outputs without _to_disk")
        self.counts = dict.fromkeys(("valid", "foreign", "trusted", "missing", "stale", "unreadable"), 0)
        todo = []
        for path, caption in tqdm(pairs, desc="checking text-encoder cache files", smoothing=1):
            state = self._state(npz_path(path), caption)
            self.counts[state] += 1
            if state not in ("valid", "foreign", "trusted"):
                todo.append((path, caption))
        c = self.counts
        logger.info("text-encoder cache files: %d valid, %d missing, %d stale, %d unreadable, %d trusted unchecked",
                    c["valid"] + c["foreign"], c["missing"], c["stale"], c["unreadable"], c["trusted"])
        if c["foreign"]:
            logger.warning("reusing %d text-encoder cache files written without an sdtune fingerprint (by kohya?): "
                           "their captions cannot be checked; delete them if a caption changed", c["foreign"])
        return todo

    def _state(self, npz: str, caption: str) -> str:
        if not os.path.exists(npz):
            return "missing"
        if self.skip_check:
            return "trusted"
        try:
            with np.load(npz) as data:
                return self._judge(data, caption)
        except _READ_ERRORS as exc:  # an interrupted write by another tool: re-encoding is the only fix
            logger.warning("text-encoder cache %s cannot be read (%s): encoding it again", npz, exc)
            return "unreadable"

    def _judge(self, data, caption: str) -> str:
        shapes = self.shapes or {}
        if any(key not in data.files or tuple(data[key].shape) != shape for key, shape in shapes.items()):
            return "stale"  # another model, or another --max_token_length
        if FINGERPRINT_KEY not in data.files:
            return "foreign"
        fingerprint = json.loads(str(data[FINGERPRINT_KEY]))
        same = fingerprint.get("producer") == self.producer and fingerprint.get("caption") == caption
        return "valid" if same else "stale"

    def put(self, path: str, caption: str, outputs: dict[str, torch.Tensor]) -> None:
        arrays = {key: value.numpy() for key, value in outputs.items()}
        arrays[FINGERPRINT_KEY] = np.array(json.dumps({"producer": self.producer, "caption": caption}, sort_keys=True))
        try:
            atomic_write_npz(npz_path(path), arrays)
        except OSError as exc:
            raise UserError(f"cannot write text-encoder cache {npz_path(path)}: {exc.strerror or exc}; make the "
                            "folder writable or use --cache_text_encoder_outputs without _to_disk") from None

    def batch(self, paths: list[str], captions: list[str]) -> dict[str, torch.Tensor]:
        return _stack([self._read(path) for path in paths])

    def _read(self, path: str) -> dict[str, torch.Tensor]:
        npz = npz_path(path)
        try:
            with np.load(npz) as data:
                keys = list(self.shapes) if self.shapes else [k for k in data.files if k != FINGERPRINT_KEY]
                return {key: torch.from_numpy(data[key]).float() for key in keys}
        except _READ_ERRORS as exc:
            raise UserError(f"text-encoder cache {npz} cannot be read ({type(exc).__name__}): delete it or run "
                            "without --skip_cache_check to encode it again") from None


# --- filling a cache ------------------------------------------------------------------------------

def fill(cache, pairs: list[tuple[str, str]], encode: Callable[[list[str]], dict], batch_size: int) -> int:
    """Encode the distinct captions `cache` lacks, `batch_size` at a time, and store each image's outputs
    (float32, CPU, no batch dimension). Returns how many captions were encoded."""
    todo = cache.missing(pairs)
    images: dict[str, list[str]] = {}
    for path, caption in todo:
        images.setdefault(caption, []).append(path)
    captions = sorted(images)
    chunks = [captions[i:i + batch_size] for i in range(0, len(captions), batch_size)]
    logger.info("caching text-encoder outputs of %d captions in %d batches", len(captions), len(chunks))
    for chunk in tqdm(chunks, desc="caching text-encoder outputs", smoothing=1):
        with torch.no_grad():
            outputs = encode(chunk)
        for i, caption in enumerate(chunk):
            sample = {key: value[i].detach().to("cpu", torch.float32).clone() for key, value in outputs.items()}
            _check_shapes(cache, sample)
            for path in images[caption]:
                cache.put(path, caption, sample)
    return len(captions)


def _check_shapes(cache, sample: dict[str, torch.Tensor]) -> None:
    """The files are judged by expected_shapes; should the encoder disagree, this run follows the encoder
    (and says so: such files are encoded again on every start)."""
    shapes = {key: tuple(value.shape) for key, value in sample.items()}
    if getattr(cache, "shapes", None) is not None and cache.shapes != shapes:
        logger.warning("text-encoder outputs have shapes %s, not the expected %s", shapes, cache.shapes)
        cache.shapes = shapes
