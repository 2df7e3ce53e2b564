"""Training data: dataset folders, captions, buckets, batches (see loader.build_dataset)."""

from library.dataset.loader import BatchLoader, TrainDataset, build_dataset

__all__ = ["BatchLoader", "TrainDataset", "build_dataset"]
