"""SDXL's size conditioning of a batch, with kohya's values: what every batch carries as "size_cond".

SDXL's U-Net is told each sample's original image size, the crop's top-left corner and the target
size (the added time ids). kohya's dataset (train_util.BaseDataset.__getitem__) builds them per sample as

    original_sizes_hw = (original height, original width)
    crop_top_lefts    = (top, left) of crop_ltrb = BucketManager.get_crop_ltrb(bucket, original size),
                        where a flipped sample uses left = bucket width - crop right
    target_sizes_hw   = (bucket height, bucket width)   (the pixels' or latents' size x 8)

each value cast with int(), and concatenates them in that order. crop_ltrb is the same whether the
latents are cached (kohya reads it back from the npz, written from the same function) or not, and
whatever the random crop drew, so it is computed here from the record alone.
"""

from __future__ import annotations

import torch

from library.dataset.buckets import Size, kohya_crop_ltrb


def size_condition(original_size: Size, bucket: Size, flipped: bool = False) -> tuple[int, ...]:
    """(original_h, original_w, crop_top, crop_left, target_h, target_w) of one sample; sizes are
    (width, height) as everywhere in library.dataset."""
    left, top, right, _ = kohya_crop_ltrb(bucket, original_size)
    if flipped:  # the mirrored image's box starts where the unmirrored one ended
        left = bucket[0] - right
    return (int(original_size[1]), int(original_size[0]), int(top), int(left), int(bucket[1]), int(bucket[0]))


def batch_size_cond(records: list, flipped: list[bool]) -> torch.Tensor:
    """float (B, 6): size_condition of each record (its `size` and `bucket`) of a batch."""
    return torch.tensor([size_condition(r.size, r.bucket, f) for r, f in zip(records, flipped)], dtype=torch.float32)
