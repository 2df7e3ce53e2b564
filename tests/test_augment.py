"""Augmentations: flip (also with cached latents), random crop, colour jitter, resize filter choice."""

from __future__ import annotations

import argparse
import colorsys
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import train_network
from library import caching
from library.config import parse_args
from library.dataset import build_dataset, loader
from library.dataset.images import (Augmentation, color_aug, load_pixels, random_crop_offsets, resize_and_crop,
                                    to_tensor)
from library.errors import UserError
from tests.conftest import files_under, train_argv


def write_image(path, size, seed=0):
    """An image with no symmetry: a left-to-right ramp in red, noise in green and blue."""
    width, height = size
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    array[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_cfg(data_dir, **overrides):
    values = dict(train_data_dir=str(data_dir), resolution="64", enable_bucket=True, min_bucket_reso=32,
                  max_bucket_reso=128, bucket_reso_steps=16, bucket_no_upscale=False, train_batch_size=2,
                  caption_extension=".caption", seed=7, flip_aug=True)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture
def data(tmp_path):
    """10_shape: two 64x64 images and one 64x96 (bucket 48x80), ten repeats: 30 samples an epoch."""
    root = tmp_path / "data"
    write_image(str(root / "10_shape" / "a.png"), (64, 64), seed=1)
    write_image(str(root / "10_shape" / "b.png"), (64, 64), seed=2)
    write_image(str(root / "10_shape" / "t.png"), (64, 96), seed=3)
    return root


def fake_encode(pixels):
    """A deterministic stand-in for the VAE: 8x8 average pooling, 4 channels."""
    pooled = F.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1) * 0.5


def no_decoding(path, resized, bucket, augment, rng, flip):
    """Pixels that only say whether they were flipped: 1.0 flipped, 0.0 not (no image decoded)."""
    return torch.full((3, bucket[1], bucket[0]), float(flip))


def occurrences(dataset, epochs):
    """(epoch, path, flipped) of every sample of `epochs`, in batch order."""
    seen = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            batch = dataset[i]
            seen += [(epoch, p, bool(f)) for p, f in zip(batch["image_paths"], batch["flipped"])]
    return seen


# --- flip -------------------------------------------------------------------------------------------

def test_flipped_pixels_are_the_mirrored_image(tmp_path):
    path = write_image(str(tmp_path / "a.png"), (80, 64))
    plain = load_pixels(path, (80, 64), (64, 64))
    flipped = load_pixels(path, (80, 64), (64, 64), flip=True)
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))
    # the centred window of the 80-wide image starts at column 8; its mirror ends there
    source = np.asarray(Image.open(path), dtype=np.float32) / 127.5 - 1
    assert flipped[0, 5, 0].item() == pytest.approx(source[5, 8 + 63, 0])
    assert flipped[0, 5, 63].item() == pytest.approx(source[5, 8, 0])


def test_flip_rate_is_half_and_stays_off_without_the_option(data, monkeypatch):
    monkeypatch.setattr(loader, "load_pixels", no_decoding)
    seen = occurrences(build_dataset(make_cfg(data)), range(10))
    rate = sum(f for _, _, f in seen) / len(seen)
    assert len(seen) == 300 and 0.42 < rate < 0.58
    for path in {p for _, p, _ in seen}:  # every image is seen both ways
        assert {f for _, p, f in seen if p == path} == {True, False}
    assert not any(f for _, _, f in occurrences(build_dataset(make_cfg(data, flip_aug=False)), range(3)))


def test_flips_are_the_same_for_the_same_seed_and_epoch_in_any_process(data, monkeypatch):
    monkeypatch.setattr(loader, "load_pixels", no_decoding)
    dataset = build_dataset(make_cfg(data))
    expected = occurrences(dataset, [3])
    assert expected == occurrences(build_dataset(make_cfg(data)), [3])  # a new dataset object
    assert expected != occurrences(build_dataset(make_cfg(data, seed=8)), [3])
    assert expected != occurrences(dataset, [4])
    workers = loader.BatchLoader(dataset, max_workers=2, persistent=False)  # forked worker processes
    workers.sampler.set_epoch(3)
    served = []
    for batch in workers:
        served += [(3, p, bool(f)) for p, f in zip(batch["image_paths"], batch["flipped"])]
        # the pixels were made flipped exactly when the batch says so
        assert torch.equal(batch["images"].amax(dim=(1, 2, 3)), batch["flipped"].float())
    assert served == expected


def test_cached_flipped_latents_are_the_encoding_of_the_mirrored_image(data):
    dataset = build_dataset(make_cfg(data))
    cache = caching.cache_latents(dataset, fake_encode, batch_size=2)
    for record in dataset.records:
        pixels = load_pixels(record.path, record.resized, record.bucket)[None]
        assert torch.allclose(cache.get(record.path), fake_encode(pixels)[0], atol=1e-6)
        assert torch.allclose(cache.get(record.path, flipped=True), fake_encode(torch.flip(pixels, dims=[3]))[0],
                              atol=1e-6)
        assert not torch.allclose(cache.get(record.path), cache.get(record.path, flipped=True))
    dataset.set_epoch(2)
    for i in range(len(dataset)):
        batch = dataset[i]
        for path, flip, latents in zip(batch["image_paths"], batch["flipped"], batch["latents"]):
            assert torch.equal(latents, cache.get(path, flipped=bool(flip)))


def disk_run(data, flip):
    dataset = build_dataset(make_cfg(data, flip_aug=flip))
    cache = caching.DiskLatentCache("vae-a", scale=0.5)
    calls = []

    def encode(pixels):
        calls.append(pixels.shape[0])
        return fake_encode(pixels)

    caching.cache_latents(dataset, encode, batch_size=4, cache=cache)
    return dataset, cache, sum(calls)


def test_disk_cache_keeps_flipped_latents_in_kohyas_key(data):
    dataset, cache, encoded = disk_run(data, flip=True)
    assert encoded == 6 and cache.counts["missing"] == 3  # 3 images, each encoded as is and mirrored
    tall = next(r for r in dataset.records if r.path.endswith("t.png"))
    npz_file = caching.npz_path(tall.path, tall.size)
    with np.load(npz_file) as npz:
        assert {"latents_10x6", "latents_flipped_10x6"} <= set(npz.files)
        pixels = load_pixels(tall.path, tall.resized, tall.bucket)[None]
        expected = fake_encode(torch.flip(pixels, dims=[3]))[0] / 0.5  # files hold unscaled latents
        assert np.allclose(npz["latents_flipped_10x6"], expected.numpy(), atol=1e-6)
    _, cache, encoded = disk_run(data, flip=True)
    assert encoded == 0 and cache.counts["valid"] == 3
    _, cache, encoded = disk_run(data, flip=False)  # files with both sides serve a run without flips
    assert encoded == 0 and cache.counts["valid"] == 3


def test_disk_cache_without_flipped_latents_is_rebuilt_for_flip_aug(data):
    _, _, encoded = disk_run(data, flip=False)
    assert encoded == 3
    _, cache, encoded = disk_run(data, flip=True)
    assert cache.counts["stale"] == 3 and encoded == 6


# --- random crop ------------------------------------------------------------------------------------

def test_random_crop_windows_stay_inside_and_vary():
    rng = random.Random(0)
    windows = [random_crop_offsets((100, 64), (64, 48), rng) for _ in range(400)]
    lefts, tops = [w[0] for w in windows], [w[1] for w in windows]
    assert min(lefts) == 0 and max(lefts) == 36 and len(set(lefts)) == 37  # 0..overhang, both ends included
    assert min(tops) == 0 and max(tops) == 16 and len(set(tops)) == 17
    assert abs(np.mean(lefts) - 18) < 2.5
    assert random_crop_offsets((64, 64), (64, 64), rng) == (0, 0)


def test_random_crop_pixels_come_from_the_drawn_window(tmp_path):
    path = write_image(str(tmp_path / "a.png"), (100, 64))
    source = np.asarray(Image.open(path), dtype=np.float32) / 127.5 - 1
    augment = Augmentation(random_crop=True)
    starts = set()
    for seed in range(20):
        left, _ = random_crop_offsets((100, 64), (64, 64), random.Random(seed))
        pixels = load_pixels(path, (100, 64), (64, 64), augment, random.Random(seed))
        assert pixels.shape == (3, 64, 64)
        assert np.allclose(pixels.permute(1, 2, 0).numpy(), source[:, left:left + 64])
        starts.add(left)
    assert len(starts) > 5


# --- colour -----------------------------------------------------------------------------------------

def hsv_of(image):
    return np.array([colorsys.rgb_to_hsv(*(np.asarray(image, dtype=np.float64).reshape(-1, 3)[i] / 255))
                     for i in range(image.size[0] * image.size[1])])


def test_color_aug_shifts_hue_a_little_and_keeps_brightness():
    """Brightness here is HSV value, max(R, G, B): a hue shift keeps it; kohya's gamma in [0.95, 1.05]
    moves it by at most 0.5**0.95 - 0.5 = 1.8% of full scale. Hue moves by at most 16 degrees."""
    hue = np.linspace(0, 1, 64, endpoint=False)
    rgb = [colorsys.hsv_to_rgb(h, 0.8, v) for v in (0.4, 0.7, 0.9) for h in hue]
    image = Image.fromarray((np.array(rgb).reshape(3, 64, 3) * 255).round().astype(np.uint8))
    before = hsv_of(image)
    kinds = {"same": 0, "hue": 0, "gamma": 0}
    shifts = []
    for seed in range(300):
        out = color_aug(image, random.Random(seed))
        draws = random.Random(seed)
        kind = "same" if draws.random() > 0.33 else ("hue" if draws.random() > 0.5 else "gamma")
        kinds[kind] += 1
        after = hsv_of(out)
        assert np.abs(after[:, 2] - before[:, 2]).max() <= 0.025  # brightness: quantisation + gamma
        turn = (after[:, 0] - before[:, 0] + 0.5) % 1 - 0.5  # signed hue change, in turns
        if kind == "same":
            assert out.tobytes() == image.tobytes()
        elif kind == "hue":
            expected = round(draws.uniform(-16, 16) * 255 / 360) / 255  # PIL's hue has 255 steps a turn
            shifts.append(expected)
            assert abs(np.median(turn) - expected) <= 1.5 / 360 and np.abs(turn - expected).max() <= 4 / 360
        else:
            assert np.abs(turn).max() <= 3 / 360  # gamma leaves hue (nearly) alone
    assert 70 <= kinds["hue"] + kinds["gamma"] <= 130  # about a third of 300 changed
    assert kinds["hue"] > 25 and kinds["gamma"] > 25
    assert 14 / 360 < np.abs(shifts).max() <= 16.1 / 360 and min(shifts) < 0 < max(shifts)


# --- resize filter ----------------------------------------------------------------------------------

def test_interpolation_choice_changes_the_result(tmp_path):
    image = Image.open(write_image(str(tmp_path / "a.png"), (97, 61)))
    out = {name: np.asarray(resize_and_crop(image, (64, 40), (64, 40), name), dtype=np.int32)
           for name in ("nearest", "bilinear", "bicubic", "lanczos", "area", "box")}
    for a, b in [("nearest", "bilinear"), ("bilinear", "bicubic"), ("bicubic", "lanczos"), ("lanczos", "area")]:
        assert np.abs(out[a] - out[b]).mean() > 1.0, (a, b)
    assert np.array_equal(out["area"], out["box"])  # both are area averaging
    assert np.array_equal(np.asarray(resize_and_crop(image, (64, 40), (64, 40))), out["area"])  # default shrink
    grown = resize_and_crop(image, (128, 80), (128, 80))
    assert np.array_equal(np.asarray(grown), np.asarray(resize_and_crop(image, (128, 80), (128, 80), "lanczos")))
    # nearest picks source pixels: every output value exists in the source
    assert set(np.unique(out["nearest"][..., 0])) <= set(np.unique(np.asarray(image)[..., 0]))


def test_interpolation_reaches_the_batches(data, monkeypatch):
    plain = build_dataset(make_cfg(data, flip_aug=False))
    nearest = build_dataset(make_cfg(data, flip_aug=False, resize_interpolation="nearest"))
    assert nearest.augment.interpolation == "nearest"
    tall = [i for i in range(len(plain)) if any(p.endswith("t.png") for p in plain[i]["image_paths"])][0]
    assert not torch.equal(plain[tall]["images"], nearest[tall]["images"])  # t.png is shrunk 64x96 -> 53x80


def test_bad_interpolation_is_one_line():
    with pytest.raises(UserError) as info:
        parse_args(["--resize_interpolation", "cubicspline"])
    assert "--resize_interpolation" in str(info.value) and "box" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="--resize_interpolation 'sinc'"):
        Augmentation.from_cfg(argparse.Namespace(resize_interpolation="sinc"))


# --- through the training script --------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--color_aug", "--random_crop"])
def test_pixel_changing_augmentations_refuse_latent_caching(flag, tiny_model_dir, demo_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), flag, "--cache_latents")
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} changes the pixels every epoch" in err[0]
    assert files_under(out) == []


def test_training_with_augmentations_records_them(tiny_model_dir, demo_data, tmp_path):
    extra = ["--flip_aug", "--color_aug", "--random_crop", "--resize_interpolation", "bicubic"]
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(tmp_path / "a"), *extra)) == 0
    with safe_open(str(tmp_path / "a" / "lora.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_flip_aug"], meta["ss_color_aug"], meta["ss_random_crop"]) == ("True", "True", "True")
    assert meta["ss_resize_interpolation"] == "bicubic"
    cached = ["--flip_aug", "--cache_latents"]
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(tmp_path / "b"), *cached)) == 0
