"""Training data: dataset folders, captions, buckets, batches (see loader.build_dataset)."""

from library.dataset.loader import TrainDataset, build_dataset, make_loader

__all__ = ["TrainDataset", "build_dataset", "make_loader"]
