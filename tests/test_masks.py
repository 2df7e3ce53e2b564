"""Loss masks: OneTrainer's -masklabel.png and kohya's --alpha_mask, through crop / flip / cache / loss."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import train_network
from library import caching, losses
from library.dataset import build_dataset
from library.dataset.masks import MaskSource, latent_mask, mask_path
from library.errors import UserError
from tests.conftest import files_under, train_argv


def half_white(size, left=True) -> np.ndarray:
    width, height = size
    array = np.zeros((height, width), dtype=np.uint8)
    array[:, : width // 2] = 255
    return array if left else array[:, ::-1].copy()


def write_pair(folder, name, size, mask: np.ndarray | None, pixels: np.ndarray | None = None) -> str:
    """An image (its pixels grey = `pixels`, default mid grey) and, when given, its -masklabel.png."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".png")
    grey = pixels if pixels is not None else np.full((size[1], size[0]), 128, dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(path)
    if mask is not None:
        Image.fromarray(mask).save(mask_path(path))
    return path


def make_cfg(data_dir, **overrides):
    values = dict(train_data_dir=str(data_dir), resolution="64", enable_bucket=False, train_batch_size=1,
                  caption_extension=".caption", seed=3, masked_loss=True, masked_loss_unmasked_probability=0.0)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_half_white_mask_follows_resize_crop_and_flip(tmp_path):
    # 128x64 image covering a 64x64 bucket: resized 128x64, centre window x = 32..96; the white left
    # half (x < 64) leaves x = 32..64 white: latent columns 0..3 of 8.
    path = write_pair(str(tmp_path), "a", (128, 64), half_white((128, 64)))
    source = MaskSource(masklabel=True)
    mask = latent_mask(source, path, (128, 64), (128, 64), (64, 64))
    expected = torch.zeros(1, 8, 8)
    expected[..., :4] = 1.0
    assert torch.equal(mask, expected)
    assert torch.equal(latent_mask(source, path, (128, 64), (128, 64), (64, 64), flip=True),
                       expected.flip(-1))
    # a window at x = 48: white x = 48..64 -> latent columns 0, 1 of 8
    shifted = latent_mask(source, path, (128, 64), (128, 64), (64, 64), offsets=(48, 0))
    assert shifted[0, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    # halved (128x64 -> 64x32 in a 64x32 bucket): area averaging keeps the half exactly
    small = latent_mask(source, path, (128, 64), (64, 32), (64, 32))
    assert small.shape == (1, 4, 8) and small.sum().item() == 16


def test_dataset_masks_match_pixels_under_random_crop_and_flip(tmp_path):
    # The image's grey value IS its mask, so the batch pixels, area-averaged, must equal the batch mask.
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(96, 128), dtype=np.uint8)
    write_pair(str(tmp_path / "5_x"), "a", (128, 96), array, pixels=array)
    dataset = build_dataset(make_cfg(tmp_path, random_crop=True, flip_aug=True, resize_interpolation="nearest"))
    seen_flips = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            batch = dataset[i]
            grey = (batch["images"][:, :1] + 1) / 2
            assert torch.allclose(F.avg_pool2d(grey, 8), batch["masks"], atol=1e-5)
            seen_flips.add(bool(batch["flipped"][0]))
    assert seen_flips == {True, False}


def write_half_alpha_image(root):
    """`1_x/a.png`, 64x64 RGBA whose alpha is the half_white pattern; returns the folder."""
    folder = root / "1_x"
    os.makedirs(folder)
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = half_white((64, 64))
    Image.fromarray(rgba).save(folder / "a.png")
    return folder


def test_alpha_mask_and_images_without_a_mask(tmp_path):
    folder = write_half_alpha_image(tmp_path)
    write_pair(str(folder), "b", (64, 64), None)  # no alpha, no mask file: learnt everywhere
    dataset = build_dataset(make_cfg(tmp_path, masked_loss=False, alpha_mask=True))
    masks = {batch["image_paths"][0][-5:]: batch["masks"][0] for batch in (dataset[i] for i in range(len(dataset)))}
    assert masks["a.png"][0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert torch.equal(masks["b.png"], torch.ones(1, 8, 8))


def test_masklabel_files_are_not_training_images(tmp_path):
    write_pair(str(tmp_path / "2_x"), "a", (64, 64), half_white((64, 64)))
    dataset = build_dataset(make_cfg(tmp_path, masked_loss=False))
    assert [os.path.basename(r.path) for r in dataset.records] == ["a.png"]
    assert dataset[0]["masks"] is None


def test_mask_of_another_size_is_one_line(tmp_path):
    write_pair(str(tmp_path / "1_x"), "a", (64, 64), half_white((32, 64)))
    dataset = build_dataset(make_cfg(tmp_path))
    with pytest.raises(UserError, match=r"mask .*a-masklabel.png is 32x64 but its image is 64x64"):
        dataset[0]


def test_masked_loss_equals_hand_computation():
    prediction = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 0.0]]]])  # squared errors [1, 4] and [9, 0]
    mask = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 1.0]]]])
    plain = losses.masked_diffusion_loss(prediction, target, mask)  # kohya: error x mask, mean
    assert plain.tolist() == pytest.approx([(1 * 1 + 4 * 0) / 2, (9 * 0.5 + 0) / 2])
    floored = losses.masked_diffusion_loss(prediction, target, mask, unmasked_weight=0.1)
    assert floored.tolist() == pytest.approx([(1 + 4 * 0.1) / 2, (9 * 0.5) / 2])
    normalized = losses.masked_diffusion_loss(prediction, target, mask, unmasked_weight=0.1, normalize=True)
    assert normalized.tolist() == pytest.approx([(1 + 0.4) / 2 / 0.55, 4.5 / 2 / 0.75])
    ones = losses.masked_diffusion_loss(prediction, target, torch.ones(2, 1, 1, 2), 0.1, True)
    assert torch.allclose(ones, losses.diffusion_loss(prediction, target))
    # a pixel-size mask is area-averaged to the loss size first (kohya's apply_masked_loss)
    big = mask.repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2)
    assert torch.allclose(losses.masked_diffusion_loss(prediction, target, big), plain)


def test_unmasked_probability_rate(tmp_path):
    source = MaskSource(masklabel=True, unmasked_probability=0.3)
    drops = sum(source.drops_mask(random.Random(i)) for i in range(20000))
    assert abs(drops / 20000 - 0.3) < 0.015
    # through the dataset: the share of occurrences whose (half-white) mask became all ones
    write_pair(str(tmp_path / "400_x"), "a", (64, 64), half_white((64, 64)))
    dataset = build_dataset(make_cfg(tmp_path, masked_loss_unmasked_probability=0.3))
    full = sum(bool(dataset[i]["masks"].min() == 1) for i in range(len(dataset)))
    assert len(dataset) == 400 and abs(full / 400 - 0.3) < 0.07


def fake_encode(pixels):
    return F.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]


@pytest.mark.parametrize("disk", [False, True])
def test_cached_masks_round_trip(tmp_path, disk):
    write_pair(str(tmp_path / "1_x"), "a", (128, 64), half_white((128, 64)))
    cfg = make_cfg(tmp_path, flip_aug=True)
    expected = torch.zeros(1, 8, 8)
    expected[..., :4] = 1.0

    def cached():
        dataset = build_dataset(cfg)
        cache = caching.DiskLatentCache("vae", 1.0) if disk else caching.MemoryLatentCache()
        dataset.cache_latents(fake_encode, cache=cache)
        return dataset, cache

    dataset, cache = cached()
    assert torch.equal(cache.get_mask(dataset.records[0].path), expected)
    for epoch in range(4):  # flipped occurrences get the mirrored mask, aligned with their latents
        dataset.set_epoch(epoch)
        batch = dataset[0]
        assert torch.equal(batch["masks"][0], expected.flip(-1) if batch["flipped"][0] else expected)
    if not disk:
        return
    npz = [p for p in files_under(tmp_path / "1_x") if p.endswith(".npz")][0]
    assert npz.endswith("_0128x0064_sd.npz") and "sdtune_masklabel_8x8" in np.load(npz).files
    again = build_dataset(cfg)
    assert caching.DiskLatentCache("vae", 1.0).missing(again.records, again.augment, again.masks) == []
    Image.fromarray(half_white((128, 64), left=False)).save(mask_path(dataset.records[0].path))  # a new mask
    fresh, cache = cached()
    assert cache.counts["stale"] == 1
    assert torch.equal(cache.get_mask(fresh.records[0].path), expected.flip(-1))  # white x = 64..96 of the window


def test_kohya_alpha_mask_key_at_pixel_size_is_read(tmp_path):
    folder = write_half_alpha_image(tmp_path)
    cfg = make_cfg(tmp_path, masked_loss=False, alpha_mask=True)
    dataset = build_dataset(cfg)
    dataset.cache_latents(fake_encode, cache=caching.DiskLatentCache("vae", 1.0))
    npz = [p for p in files_under(folder) if p.endswith(".npz")][0]
    arrays = dict(np.load(npz))
    assert arrays["alpha_mask_8x8"].shape == (8, 8)
    arrays["alpha_mask_8x8"] = half_white((64, 64)).astype(np.float32) / 255  # kohya keeps pixel size
    np.savez(npz, **arrays)
    again = build_dataset(cfg)
    cache = caching.DiskLatentCache("vae", 1.0, skip_check=True)
    cache.missing(again.records, again.augment, again.masks)
    assert cache.get_mask(again.records[0].path)[0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_train_with_masklabel_files(tiny_model_dir, demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    for image in [p for p in files_under(data) if p.endswith(".png")]:
        width, height = Image.open(image).size
        Image.fromarray(half_white((width, height))).save(mask_path(image))
    out = tmp_path / "out"
    for extra in ([], ["--cache_latents", "--masked_loss_normalize"]):
        argv = train_argv(tiny_model_dir, str(data), str(out), "--masked_loss", "--masked_loss_unmasked_weight", "0",
                          "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128", *extra)
        assert train_network.main(argv) == 0
        assert os.path.exists(out / "lora.safetensors")
    report = json.loads((out / "dataset_report.json").read_text())
    assert report["subsets"][0]["images"] == 9  # the 9 mask files are not counted as images


def test_masks_refuse_face_crop():
    import argparse

    from library.dataset.masks import MaskSource
    from library.errors import UserError

    cfg = argparse.Namespace(masked_loss=True, alpha_mask=False, face_crop_aug_range="2.0,4.0",
                             masked_loss_unmasked_probability=0.1, masked_loss_unmasked_weight=0.1)
    with pytest.raises(UserError, match=r"--face_crop_aug_range cannot be combined with masks \(--masked_loss, alpha_mask"):
        MaskSource.from_cfg(cfg)
    assert MaskSource.from_cfg(argparse.Namespace(**{**vars(cfg), "face_crop_aug_range": None})).masklabel


def test_alpha_mask_per_subset_mixes_masked_and_plain_samples(tiny_model_dir, tmp_path):
    # cutout/: RGBA images, left half opaque, alpha_mask on; plain/: RGBA images with the same alpha, off
    for folder in ("cutout", "plain"):
        for i in range(2):
            os.makedirs(tmp_path / folder, exist_ok=True)
            rgba = np.full((64, 64, 4), 100 + i, dtype=np.uint8)
            rgba[..., 3] = half_white((64, 64))
            Image.fromarray(rgba).save(tmp_path / folder / f"{folder}{i}.png")
    ds = tmp_path / "ds.toml"
    ds.write_text(f'[general]\nresolution = 64\nbatch_size = 4\n[[datasets]]\n'
                  f'  [[datasets.subsets]]\n  image_dir = "{tmp_path / "cutout"}"\n  alpha_mask = true\n'
                  f'  [[datasets.subsets]]\n  image_dir = "{tmp_path / "plain"}"\n', encoding="utf-8")
    from library.config import parse_args

    group = build_dataset(parse_args(["--dataset_config", str(ds), "--masked_loss_unmasked_probability", "0"]))
    batch = group[0]  # one batch of all four: masked and plain samples side by side
    half = torch.zeros(1, 8, 8)
    half[..., :4] = 1.0
    for path, mask in zip(batch["image_paths"], batch["masks"]):
        assert torch.equal(mask, half if "cutout" in path else torch.ones(1, 8, 8))
    # an all-ones mask trains exactly as no mask does, whatever the unmasked weight
    prediction, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ones = losses.masked_diffusion_loss(prediction, target, torch.ones(2, 1, 8, 8), 0.1, True)
    assert torch.allclose(ones, losses.diffusion_loss(prediction, target))
    group.cache_latents(fake_encode)
    assert {os.path.basename(p): group.latent_cache.get_mask(p) is not None for p in batch["image_paths"]} == {
        "cutout0.png": True, "cutout1.png": True, "plain0.png": False, "plain1.png": False}
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, "unused", str(out), "--dataset_config", str(ds), "--max_train_steps", "2",
                      "--cache_latents")
    assert train_network.main(argv) == 0
    assert json.loads(safe_open(str(out / "lora.safetensors"), "pt").metadata()["ss_steps"]) == 2
