"""Latent caching: encode each unique training image once, before training, and reuse the latents.

A cache is any object with `get(key) -> Tensor | None` and `put(key, latents)`. `MemoryLatentCache`
keeps them in RAM for one run; a disk cache (kohya's `.npz` next to each image) fits the same two
methods. Images are encoded in batches of one bucket size, so every batch stacks.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from library.dataset.images import load_pixels

logger = logging.getLogger(__name__)


class LatentCache(Protocol):
    def get(self, key: str) -> torch.Tensor | None: ...

    def put(self, key: str, latents: torch.Tensor) -> None: ...


class MemoryLatentCache:
    """Latents in RAM, keyed by image path; float32 on the CPU."""

    def __init__(self) -> None:
        self._latents: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor | None:
        return self._latents.get(key)

    def put(self, key: str, latents: torch.Tensor) -> None:
        self._latents[key] = latents

    def __len__(self) -> int:
        return len(self._latents)


def plan_cache_batches(records: list, batch_size: int) -> list[list]:
    """Unique records in encoder batches: grouped by bucket (smallest area first), at most batch_size each."""
    ordered = sorted(records, key=lambda r: (r.bucket[0] * r.bucket[1], r.bucket, r.path))
    batches: list[list] = []
    for record in ordered:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].bucket == record.bucket:
            batches[-1].append(record)
        else:
            batches.append([record])
    return batches


def encode_batch(records: list, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Load, resize and crop a batch of one bucket size, then encode it: latents (B, C, H/8, W/8) on the CPU."""
    pixels = torch.stack([load_pixels(r.path, r.resized, r.bucket) for r in records])
    with torch.no_grad():
        latents = encode(pixels)
    if latents.shape[0] != len(records):
        raise ValueError(f"encoder returned {latents.shape[0]} latents for {len(records)} images")
    return latents.detach().to("cpu", torch.float32)


def cache_latents(dataset, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1,
                  cache: LatentCache | None = None) -> LatentCache:
    """Encode every image of `dataset` not yet in `cache` (once, not once per repeat); attach the cache.

    `encode` takes pixels (B, 3, H, W) in [-1, 1] and returns scaled latents (the model family's
    encode_images). After this, dataset items carry latents and no image is decoded again.
    """
    cache = cache if cache is not None else MemoryLatentCache()
    todo = [r for r in dataset.records if cache.get(r.path) is None]
    batches = plan_cache_batches(todo, max(1, int(batch_size)))
    logger.info("caching latents of %d images in %d batches", len(todo), len(batches))
    for batch in tqdm(batches, desc="caching latents", smoothing=1):
        for record, latents in zip(batch, encode_batch(batch, encode)):
            cache.put(record.path, latents.clone())  # clone: do not keep the whole batch's storage alive
    dataset.latent_cache = cache
    return cache
