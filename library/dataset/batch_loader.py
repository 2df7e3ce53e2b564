"""Serving a dataset's batches to the training loop: one DataLoader item per batch, in the epoch's order."""

from __future__ import annotations

import os

import torch

from library.errors import UserError


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, batch index): DataLoader workers, persistent ones included, then plan the
    epoch's batches in their own copy of the dataset instead of keeping the order they were forked with."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Serve `epoch` from batch `start` on (a resumed run skips, without loading, what it trained)."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.start, len(self.dataset))])

    def __len__(self) -> int:
        return len(self.dataset) - self.start


class _ErrorsAsData(torch.utils.data.Dataset):
    """A UserError raised inside a DataLoader worker reaches the user as a multi-line traceback;
    hand it back as data instead, so the main process raises it as the usual one line."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UserError as exc:
            return {"user_error": str(exc)}


class BatchLoader:
    """Batches of a TrainDataset for the training loop. Workers decode images in parallel (kohya's
    rule: at most one per CPU); cached latents are already in memory, so then the main process serves."""

    def __init__(self, dataset, max_workers: int | None, persistent: bool):
        workers = 0 if dataset.latent_cache is not None else min(max_workers or 0, os.cpu_count() or 1)
        self.sampler = EpochSampler(dataset)
        # Worker seeds come from this generator, never from the global one, so the training noise is
        # the same whatever the worker settings.
        generator = torch.Generator().manual_seed(dataset.seed)
        self._loader = torch.utils.data.DataLoader(
            _ErrorsAsData(dataset), batch_size=None, sampler=self.sampler, num_workers=workers,
            persistent_workers=persistent and workers > 0, generator=generator,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self._loader:
            if "user_error" in batch:
                raise UserError(batch["user_error"])
            yield batch
