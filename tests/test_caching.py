"""The disk latent cache: kohya's npz names and keys, fingerprints that make stale caches rebuild, reuse."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train_network
from library import caching
from library.dataset import build_dataset
from library.dataset import loader
from library.errors import UserError
from tests.conftest import train_argv
from tests.test_dataset import make_cfg as dataset_cfg
from tests.test_dataset import fake_encode, write_image

SCALE = 0.5


def make_cfg(data_dir, **overrides):
    return dataset_cfg(data_dir, **{"train_batch_size": 2, **overrides})


@pytest.fixture
def data(tmp_path):
    """1_shape: two 64x64 images and one 64x96 (bucket 48x80 at resolution 64, steps 16)."""
    root = tmp_path / "data"
    write_image(str(root / "1_shape" / "a.png"), (64, 64), value=10)
    write_image(str(root / "1_shape" / "b.png"), (64, 64), value=20)
    write_image(str(root / "1_shape" / "t.png"), (64, 96), value=30)
    return root


def run_cache(root, vae_id="vae-a", skip_check=False, **cfg):
    """Build the dataset, fill a disk cache; returns (dataset, cache, images encoded)."""
    dataset = build_dataset(make_cfg(root, **cfg))
    cache = caching.DiskLatentCache(vae_id, SCALE, skip_check)
    calls: list[int] = []
    dataset.cache_latents(fake_encode(calls), batch_size=2, cache=cache)
    return dataset, cache, sum(calls)


def npz_of(root, name, size):
    return str(root / "1_shape" / f"{name}_{size[0]:04d}x{size[1]:04d}_sd.npz")


def test_files_have_kohyas_names_keys_and_values(data):
    dataset, cache, encoded = run_cache(data)
    assert encoded == 3 and len(cache) == 3
    names = sorted(n for n in os.listdir(data / "1_shape") if n.endswith(".npz"))
    assert names == ["a_0064x0064_sd.npz", "b_0064x0064_sd.npz", "t_0064x0096_sd.npz"]
    tall = next(r for r in dataset.records if r.path.endswith("t.png"))
    assert (tall.bucket, tall.resized) == ((48, 80), (53, 80))
    with np.load(npz_of(data, "t", (64, 96))) as npz:
        assert sorted(npz.files) == ["crop_ltrb_10x6", "latents_10x6", "original_size_10x6", "sdtune_fingerprint_10x6"]
        assert npz["latents_10x6"].shape == (4, 10, 6) and npz["latents_10x6"].dtype == np.float32
        assert npz["original_size_10x6"].tolist() == [64, 96]
        # bucket 48x80 (ar 0.6) is narrower than the image (ar 0.667): fitted by width, 72 tall, (80 - 72) // 2 on top
        assert npz["crop_ltrb_10x6"].tolist() == [0, 4.0, 48, 76.0]
        raw = npz["latents_10x6"]
        fingerprint = json.loads(str(npz["sdtune_fingerprint_10x6"]))
    expected = fake_encode([])(loader.load_pixels(tall.path, tall.resized, tall.bucket)[None])[0]
    assert np.allclose(raw, expected.numpy() / SCALE, atol=1e-6)  # kohya's raw latents, not scaled
    assert torch.allclose(cache.get(tall.path), expected, atol=1e-6)
    assert fingerprint["producer"] == {"version": 1, "bucket": [48, 80], "resized": [53, 80], "crop": [2, 0],
                                       "flip": False, "vae": "vae-a"}
    assert fingerprint["image"]["bytes"] == os.path.getsize(tall.path)


def test_kohya_crop_ltrb():
    assert caching.kohya_crop_ltrb((64, 64), (100, 50)) == (0, 16.0, 64, 48.0)
    assert caching.kohya_crop_ltrb((64, 32), (50, 100)) == (24.0, 0.0, 40.0, 32)


def test_second_run_reuses_files_and_serves_batches_from_disk(data, monkeypatch):
    first, _, _ = run_cache(data)
    expected = {r.path: first.latent_cache.get(r.path) for r in first.records}
    mtimes = {n: os.stat(data / "1_shape" / n).st_mtime_ns for n in os.listdir(data / "1_shape") if n.endswith(".npz")}

    def no_decoding(*args):
        raise AssertionError("images must not be decoded when every cache file is valid")

    monkeypatch.setattr(caching, "load_pixels", no_decoding)
    monkeypatch.setattr(loader, "load_pixels", no_decoding)
    dataset, cache, encoded = run_cache(data)
    assert encoded == 0 and cache.counts["valid"] == 3
    for index in range(len(dataset)):
        batch = dataset[index]
        for path, latents in zip(batch["image_paths"], batch["latents"]):
            assert torch.equal(latents, expected[path])
    assert mtimes == {n: os.stat(data / "1_shape" / n).st_mtime_ns for n in mtimes}


def test_changed_image_is_rebuilt_a_touched_one_is_not(data):
    run_cache(data)
    write_image(str(data / "1_shape" / "a.png"), (64, 64), value=200)
    os.utime(data / "1_shape" / "b.png", ns=(1, 1))  # same bytes, another mtime: the content hash decides
    _, cache, encoded = run_cache(data)
    assert encoded == 1 and (cache.counts["stale"], cache.counts["valid"]) == (1, 2)
    with np.load(npz_of(data, "a", (64, 64))) as npz:
        assert npz["latents_8x8"][0].mean() == pytest.approx((200 / 127.5 - 1) * 0.5 / SCALE, abs=1e-5)


def test_another_vae_makes_every_file_stale(data):
    run_cache(data)
    _, cache, encoded = run_cache(data, vae_id="vae-b")
    assert encoded == 3 and cache.counts["stale"] == 3
    _, _, encoded = run_cache(data, vae_id="vae-b")
    assert encoded == 0


def test_another_bucket_adds_its_size_and_keeps_the_others(data):
    run_cache(data)
    _, cache, encoded = run_cache(data, resolution="48", min_bucket_reso=32)
    assert encoded == 3 and cache.counts["missing"] == 3
    with np.load(npz_of(data, "a", (64, 64))) as npz:
        assert {"latents_8x8", "latents_6x6", "sdtune_fingerprint_6x6", "sdtune_fingerprint_8x8"} <= set(npz.files)
    _, _, encoded = run_cache(data)  # back at 64: the 8x8 latents were kept, as kohya keeps them
    assert encoded == 0


def test_latents_rewritten_by_another_tool_are_stale(data):
    run_cache(data)
    path = npz_of(data, "a", (64, 64))
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["latents_8x8"] = arrays["latents_8x8"] + 1  # kohya keeps unknown keys when it rewrites latents
    np.savez(path, **arrays)
    _, cache, encoded = run_cache(data)
    assert encoded == 1 and cache.counts["stale"] == 1


def test_skip_cache_check_trusts_files(data):
    run_cache(data)
    _, cache, encoded = run_cache(data, vae_id="vae-b", skip_check=True)
    assert encoded == 0 and cache.counts["trusted"] == 3


def test_skip_cache_check_with_a_missing_size_is_one_line(data):
    run_cache(data, resolution="48", min_bucket_reso=32)  # files hold 6x6 latents only
    _, cache, encoded = run_cache(data, skip_check=True)
    assert encoded == 0
    with pytest.raises(UserError, match=r"a_0064x0064_sd.npz has no readable latents_8x8 .*--skip_cache_check"):
        cache.get(str(data / "1_shape" / "a.png"))


def test_unreadable_file_is_rebuilt_with_a_warning(data, caplog):
    run_cache(data)
    path = npz_of(data, "b", (64, 64))
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING, logger="library.caching"):
        _, cache, encoded = run_cache(data)
    assert encoded == 1 and cache.counts["unreadable"] == 1
    assert "b_0064x0064_sd.npz cannot be read" in caplog.text
    with np.load(path) as npz:
        assert npz["latents_8x8"].shape == (4, 8, 8)


def write_kohya_npz(path, latents, original_size):
    np.savez(path, latents_8x8=latents, original_size_8x8=np.array(original_size),
             crop_ltrb_8x8=np.array([0, 0, 64, 64]))


def test_kohya_file_without_fingerprint_is_reused_when_plausible(data, caplog):
    raw = np.full((4, 8, 8), 0.25, dtype=np.float32)
    for name in ("a", "b"):
        write_kohya_npz(npz_of(data, name, (64, 64)), raw, [64, 64])
    with caplog.at_level(logging.WARNING, logger="library.caching"):
        _, cache, encoded = run_cache(data)
    assert encoded == 1 and cache.counts["foreign"] == 2  # only t.png had no file
    assert "2 latent cache files written without an sdtune fingerprint" in caplog.text
    assert torch.allclose(cache.get(str(data / "1_shape" / "a.png")), torch.full((4, 8, 8), 0.25 * SCALE))
    # an image newer than its cache file, or another original size, makes a kohya file stale
    later = os.stat(npz_of(data, "a", (64, 64))).st_mtime_ns + 10**9
    os.utime(data / "1_shape" / "a.png", ns=(later, later))
    write_kohya_npz(npz_of(data, "b", (64, 64)), raw, [64, 65])
    _, cache, encoded = run_cache(data)
    assert encoded == 2 and cache.counts["stale"] == 2


def test_old_npz_name_is_used_when_it_exists(data):
    old = str(data / "1_shape" / "a.npz")
    np.savez(old, latents=np.zeros((4, 8, 8), dtype=np.float32))  # kohya < 0.9: no size suffix, rebuilt
    _, cache, encoded = run_cache(data)
    assert encoded == 3 and not os.path.exists(npz_of(data, "a", (64, 64)))
    with np.load(old) as npz:
        assert {"latents", "latents_8x8", "sdtune_fingerprint_8x8"} <= set(npz.files)


def test_a_write_failure_is_one_line(data, monkeypatch):
    def refuse(path, arrays):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(caching, "atomic_write_npz", refuse)
    with pytest.raises(UserError, match=r"cannot write latent cache .*t_0064x0096_sd.npz: Permission denied; make"):
        run_cache(data)


def test_vae_fingerprint_follows_weights_and_dtype():
    from diffusers import AutoencoderKL

    from library.models.synthetic import sd1_configs

    torch.manual_seed(0)
    vae = AutoencoderKL(**sd1_configs("tiny")["vae"])
    first = caching.vae_fingerprint(vae)
    assert caching.vae_fingerprint(vae) == first and len(first) == 16
    names = sorted(vae.state_dict())
    with torch.no_grad():
        vae.state_dict()[names[0]].add_(1e-3)  # the first tensor is always sampled
    second = caching.vae_fingerprint(vae)
    assert second != first
    assert caching.vae_fingerprint(vae.to(torch.bfloat16)) not in (first, second)


def test_cache_options_follow_kohyas_rules():
    cfg = argparse.Namespace(cache_latents=False, cache_latents_to_disk=True, color_aug=False, random_crop=False)
    caching.resolve_cache_options(cfg)
    assert cfg.cache_latents is True
    for name in ("color_aug", "random_crop"):
        cfg = argparse.Namespace(cache_latents=True, cache_latents_to_disk=False, color_aug=False, random_crop=False)
        setattr(cfg, name, True)
        with pytest.raises(UserError, match=f"--{name} changes the pixels every epoch, so it cannot be used with"):
            caching.resolve_cache_options(cfg)
    caching.resolve_cache_options(argparse.Namespace(cache_latents=False, color_aug=True, random_crop=True))


def test_train_with_cache_latents_to_disk(tiny_model_dir, demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    out = tmp_path / "out"
    assert train_network.main(train_argv(tiny_model_dir, str(data), str(out), "--cache_latents_to_disk")) == 0
    images = sorted(n for n in os.listdir(data / "10_shapes") if n.endswith(".png"))
    files = sorted(n for n in os.listdir(data / "10_shapes") if n.endswith("_sd.npz"))
    assert len(files) == len(images) == 9
    with np.load(data / "10_shapes" / files[0]) as npz:
        assert npz["latents_8x8"].shape == (4, 8, 8) and "sdtune_fingerprint_8x8" in npz.files
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_cache_latents"] == "True"
    mtimes = [os.stat(data / "10_shapes" / n).st_mtime_ns for n in files]
    assert train_network.main(train_argv(tiny_model_dir, str(data), str(tmp_path / "out2"),
                                         "--cache_latents_to_disk")) == 0
    assert [os.stat(data / "10_shapes" / n).st_mtime_ns for n in files] == mtimes  # reused, not rewritten
