"""SDXL size conditioning in every batch: kohya's (original hw, crop top-left, target hw), flips and caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from library import caching
from library.dataset import build_dataset
from library.dataset.size_cond import size_condition
from tests.test_dataset import fake_encode, make_cfg, write_image

# A 140x60 image goes into the 96x32 bucket (bucket_reso_steps 16, resolution 64). kohya's crop_ltrb fits
# it by height: 32 * 140 / 60 = 74.67 wide, left = (96 - 74.67) // 2 = 10, right = 84.67; mirrored, its
# left is 96 - 84.67 = 11.33, cast to 11. A 64x96 image goes into 48x80: fitted by width, 72 tall,
# top = (80 - 72) // 2 = 4.
WIDE = (60.0, 140.0, 0.0, 10.0, 32.0, 96.0)
WIDE_FLIPPED = (60.0, 140.0, 0.0, 11.0, 32.0, 96.0)
TALL = (96.0, 64.0, 4.0, 0.0, 80.0, 48.0)


def test_size_condition_values():
    assert size_condition((140, 60), (96, 32)) == (60, 140, 0, 10, 32, 96)
    assert size_condition((140, 60), (96, 32), flipped=True) == (60, 140, 0, 11, 32, 96)
    # wider than its bucket: fitted by width, the box is 64 x 32 and starts 16 rows down
    assert size_condition((100, 50), (64, 64)) == (50, 100, 16, 0, 64, 64)
    assert size_condition((64, 64), (64, 64), flipped=True) == (64, 64, 0, 0, 64, 64)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    write_image(str(root / "4_shape" / "wide.png"), (140, 60), value=10)
    write_image(str(root / "4_shape" / "tall.png"), (64, 96), value=50)
    return root


def expected_rows(batch) -> list[tuple]:
    rows = []
    for path, flipped in zip(batch["image_paths"], batch["flipped"].tolist()):
        rows.append(TALL if path.endswith("tall.png") else WIDE_FLIPPED if flipped else WIDE)
    return rows


def all_rows(dataset) -> list[tuple]:
    found = []
    for index in range(len(dataset)):
        batch = dataset[index]
        assert batch["size_cond"].dtype == torch.float32 and batch["size_cond"].shape == (len(batch["captions"]), 6)
        assert [tuple(row) for row in batch["size_cond"].tolist()] == expected_rows(batch)
        found += [(path, tuple(row)) for path, row in zip(batch["image_paths"], batch["size_cond"].tolist())]
    return found


def test_batches_carry_kohyas_values(data):
    dataset = build_dataset(make_cfg(data, train_batch_size=2))
    rows = all_rows(dataset)
    assert sorted(set(r for _, r in rows)) == sorted({WIDE, TALL})


def test_flipped_samples_mirror_the_crop(data):
    dataset = build_dataset(make_cfg(data, train_batch_size=1, flip_aug=True))
    seen = set()
    for epoch in range(4):  # 8 wide occurrences: both sides show up
        dataset.set_epoch(epoch)
        seen |= {row for path, row in all_rows(dataset) if path.endswith("wide.png")}
    assert seen == {WIDE, WIDE_FLIPPED}


@pytest.mark.parametrize("to_disk", [False, True])
def test_cached_latents_give_the_same_values(data, to_disk):
    plain = build_dataset(make_cfg(data, train_batch_size=1, flip_aug=True))
    cached = build_dataset(make_cfg(data, train_batch_size=1, flip_aug=True))
    cache = caching.DiskLatentCache("vae-a", 0.5) if to_disk else caching.MemoryLatentCache()
    cached.cache_latents(fake_encode([]), batch_size=2, cache=cache)
    if to_disk:  # the file's crop_ltrb is the one the batches use
        with np.load(data / "4_shape" / "wide_0140x0060_sd.npz") as npz:
            assert npz["crop_ltrb_4x12"].tolist() == pytest.approx([10.0, 0, 84.6667, 32], abs=1e-4)
    for epoch in range(2):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in range(len(plain)):
            a, b = plain[index], cached[index]
            assert b["images"] is None and torch.equal(a["size_cond"], b["size_cond"])
            assert [tuple(r) for r in b["size_cond"].tolist()] == expected_rows(b)
