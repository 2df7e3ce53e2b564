"""Token warmup (kohya's token_warmup_min / token_warmup_step) and face crop (face_crop_aug_range)."""

from __future__ import annotations

import argparse
import os
import random

import pytest
import torch
from PIL import Image

from library import caching
from library.dataset.captions import CaptionOptions, process_caption, warmup_steps, warmup_tag_count
from library.dataset.images import (PLAIN, Augmentation, face_box, face_crop_window, load_pixels,
                                    parse_face_crop_range)
from library.dataset.loader import StepClock, build_dataset
from library.errors import UserError

TAGS = "a, b, c, d, e, f, g, h, i, j"


# --- token warmup ------------------------------------------------------------------------------------

@pytest.mark.parametrize("step, expected", [(0, 1), (1, 2), (2, 4), (4, 8), (5, 10), (9, 10)])
def test_warmup_tag_count_grows_linearly_rounded_down(step, expected):
    # floor(step * (10 - 1) / 5) + 1: 1, 1+1, 3+1, 7+1, then all ten from step 5
    assert warmup_tag_count(10, step, 5, 1) == expected


def test_warmup_steps_ratio_is_of_max_train_steps():
    assert warmup_steps(0.5, 10) == 5
    assert warmup_steps(0.25, 10) == 2  # floor(2.5)
    assert warmup_steps(7, 10) == 7
    assert warmup_steps(0, 10) == 0


def test_warmup_keeps_first_tags_in_file_order_after_the_fixed_ones():
    opts = CaptionOptions(token_warmup_step=5, token_warmup_min=1)
    assert process_caption(TAGS, opts, 0, random.Random(0), step=2) == "a, b, c, d"
    kept = CaptionOptions(token_warmup_step=5, token_warmup_min=1, keep_tokens=1)
    # head "a" stays; 9 flexible tags: floor(2 * 8 / 5) + 1 = 4 of them
    assert process_caption(TAGS, kept, 0, random.Random(0), step=2) == "a, b, c, d, e"
    assert process_caption(TAGS, opts, 0, random.Random(0), step=5) == TAGS


def test_warmup_cuts_before_shuffling_and_takes_ratio_of_the_run():
    opts = CaptionOptions(token_warmup_step=0.5, token_warmup_min=2, shuffle=True)
    for seed in range(5):
        # ends at step 5 of 10; step 1: floor(1 * 8 / 5) + 2 = 3 tags, always the first three, shuffled
        caption = process_caption(TAGS, opts, 0, random.Random(seed), step=1, max_train_steps=10)
        assert sorted(caption.split(", ")) == ["a", "b", "c"]


def test_step_clock_counts_optimizer_steps():
    clock = StepClock(batches_per_epoch=5, accumulation=2)  # 3 steps an epoch: the last one has one batch
    assert [clock.step(0, i) for i in range(5)] == [0, 0, 1, 1, 2]
    assert [clock.step(1, i) for i in range(5)] == [3, 3, 4, 4, 5]


def _folder(root: str, names: list[str], caption: str, size=(64, 64)) -> str:
    folder = os.path.join(root, "1_x")
    os.makedirs(folder)
    for name in names:
        Image.new("RGB", size, (0, 0, 255)).save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + ".caption"), "w", encoding="utf-8") as handle:
            handle.write(caption)
    return root


def test_dataset_items_follow_the_warmup_schedule(tmp_path):
    data = _folder(str(tmp_path), ["p", "q"], "a, b, c, d, e")
    cfg = argparse.Namespace(train_data_dir=data, resolution="64", train_batch_size=1, seed=3,
                             token_warmup_step=0.5, token_warmup_min=1, max_train_steps=8,
                             gradient_accumulation_steps=1)
    dataset = build_dataset(cfg)
    assert dataset.clock == StepClock(2, 1, 8)
    # warmup ends at step 4: floor(step * 4 / 4) + 1 tags = step + 1
    counts = [len(dataset[(epoch, i)]["captions"][0].split(", ")) for epoch in range(3) for i in range(2)]
    assert counts == [1, 2, 3, 4, 5, 5]


def test_negative_warmup_is_refused():
    with pytest.raises(UserError, match="token_warmup_min"):
        CaptionOptions.from_cfg(argparse.Namespace(token_warmup_min=-1))


# --- face crop ---------------------------------------------------------------------------------------

def test_face_box_from_file_name():
    assert face_box("/d/img_200_150_40_30.png") == (200, 150, 40, 30)
    assert face_box("/d/img.png") is None
    assert face_box("/d/a_b_c_d_e.png") is None  # five parts, but not numbers
    assert face_box("/d/img_0_150_40_30.png") is None  # kohya: no face when cx is 0


def test_parse_face_crop_range():
    assert parse_face_crop_range("2.0,4.0") == (2.0, 4.0)
    assert parse_face_crop_range([2, 3]) == (2.0, 3.0)
    assert parse_face_crop_range("") is None
    for bad in ("2.0", "a,b", "4,2", "0,1"):
        with pytest.raises(UserError, match="face_crop_aug_range"):
            parse_face_crop_range(bad)


def test_face_crop_window_fixed_factor():
    # short side 64 = 2 faces: scale 64 / (40 * 2) = 0.8; 400x300 -> 320x240, face centre (160, 120)
    resized, offsets = face_crop_window((400, 300), (200, 150, 40, 40), (64, 64), (2.0, 2.0), False, random.Random(0))
    assert resized == (320, 240)
    assert offsets == (160 - 32, 120 - 32)


def test_face_crop_window_holds_the_face_at_a_factor_in_range():
    face = (200, 150, 40, 40)
    for seed in range(20):
        resized, (left, top) = face_crop_window((400, 300), face, (64, 64), (2.0, 4.0), False, random.Random(seed))
        scale = resized[0] / 400
        assert 2.0 - 0.05 <= 64 / (40 * scale) <= 4.0 + 0.05
        half = 20 * scale
        cx, cy = 200 * scale, 150 * scale
        assert left <= cx - half and cx + half <= left + 64
        assert top <= cy - half and cy + half <= top + 64


def test_face_crop_never_leaves_the_image_and_covers_the_bucket():
    # a face at the corner of a small image: the window is clamped and the image grows to cover it
    resized, (left, top) = face_crop_window((50, 80), (5, 5, 10, 10), (64, 64), (2.0, 4.0), True, random.Random(1))
    assert resized[0] >= 64 and resized[1] >= 64
    assert 0 <= left <= resized[0] - 64 and 0 <= top <= resized[1] - 64


def _face_image(path: str) -> None:
    image = Image.new("RGB", (400, 300), (0, 0, 255))
    image.paste((255, 0, 0), (180, 130, 220, 170))  # the 40x40 face around (200, 150)
    image.save(path)


def test_load_pixels_crops_around_the_face(tmp_path):
    path = str(tmp_path / "img_200_150_40_40.png")
    _face_image(path)
    augment = Augmentation(face_crop_range=(2.0, 2.0))
    pixels = load_pixels(path, (85, 64), (64, 64), augment, random.Random(0))
    assert pixels.shape == (3, 64, 64)
    # the face is 32 px wide in the middle of the window: red there, blue at the corners
    assert torch.allclose(pixels[:, 32, 32], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(pixels[:, 2, 2], torch.tensor([-1.0, -1.0, 1.0]))
    red = (pixels[0] > 0).sum().item()
    assert abs(red - 32 * 32) <= 2 * 32


def test_images_without_face_coordinates_are_unaffected(tmp_path):
    path = str(tmp_path / "plain.png")
    _face_image(path)
    with_face_crop = load_pixels(path, (85, 64), (64, 64), Augmentation(face_crop_range=(2.0, 4.0)), random.Random(0))
    assert torch.equal(with_face_crop, load_pixels(path, (85, 64), (64, 64), PLAIN))


def test_face_crop_cannot_be_cached():
    cfg = argparse.Namespace(cache_latents=True, face_crop_aug_range="2.0,4.0")
    with pytest.raises(UserError, match="face_crop_aug_range"):
        caching.resolve_cache_options(cfg)
    caching.resolve_cache_options(argparse.Namespace(cache_latents=True, face_crop_aug_range=""))
