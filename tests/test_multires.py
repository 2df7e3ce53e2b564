"""Multi-resolution training: --resolution "32,48,64" trains each occurrence at one of several sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

import train_network
from tests.conftest import train_argv
from library import caching
from library.config import parse_args
from library.dataset import build_dataset
from library.dataset import buckets as bk
from library.dataset.report import build_report
from library.errors import UserError
from tests.test_caching import fake_encode
from tests.test_dataset import make_cfg, write_image

SIZES = [(32, 32), (48, 48), (64, 64)]
# the 64x96 images' bucket and resized size at each size (area 32², 48², 64², steps 16, closest aspect)
TALL = {(32, 32): ((16, 48), (32, 48)), (48, 48): ((32, 64), (43, 64)), (64, 64): ((48, 80), (53, 80))}


@pytest.fixture
def data(tmp_path):
    """3_sq: six 64x64 images; 3_tall: two 64x96 images."""
    root = tmp_path / "data"
    for i in range(6):
        write_image(str(root / "3_sq" / f"s{i}.png"), (64, 64), value=i)
    for i in range(2):
        write_image(str(root / "3_tall" / f"t{i}.png"), (64, 96), value=100 + i)
    return root


def multires(root, **overrides):
    values = dict(resolution="32,48,64", min_bucket_reso=16, train_batch_size=2)
    return build_dataset(make_cfg(root, **{**values, **overrides}))


@pytest.mark.parametrize("value, expected", [
    ("512", [(512, 512)]), ("512,768", [(512, 768)]), (512, [(512, 512)]), ([512, 768], [(512, 768)]),
    ("384, 448,512", [(384, 384), (448, 448), (512, 512)]), ("multires:512,640", [(512, 512), (640, 640)]),
    ("MultiRes:512", [(512, 512)]),
])
def test_parse_resolutions(value, expected):
    assert bk.parse_resolutions(value) == expected


@pytest.mark.parametrize("value, message", [
    ("512,512,512", "different"), ("512,0,64", "positive"), ("multires:", "square sizes"),
    ("multires:512x640", "square sizes"), ("512,a", "WIDTH,HEIGHT"),
])
def test_parse_resolutions_rejects(value, message):
    with pytest.raises(UserError, match=message):
        bk.parse_resolutions(value)


def test_command_line_accepts_lists_and_checks_bucket_limits(data):
    assert parse_args(["--resolution", "multires:512,640"]).resolution == "multires:512,640"
    with pytest.raises(UserError, match="sizes must be positive and different"):
        parse_args(["--resolution", "64,64,32"])
    with pytest.raises(UserError, match="--min_bucket_reso 40 is larger"):
        multires(data, min_bucket_reso=40)
    with pytest.raises(UserError, match="--max_bucket_reso 48 is smaller"):
        multires(data, max_bucket_reso=48)


def test_buckets_per_resolution(data):
    dataset = multires(data)
    assert len(dataset.records) == 8 and len(dataset.variants) == 24
    for v in dataset.variants:
        tall = "3_tall" in v.path
        assert (v.bucket, v.resized) == (TALL[v.resolution] if tall else (v.resolution, v.resolution))
    # 18 square and 6 tall occurrences dealt evenly over 3 sizes: 6 / 2 per group, 2 batches of 2 / 1
    assert dataset.group_counts() == {
        ((32, 32), (16, 48)): 2, ((32, 32), (32, 32)): 6, ((48, 48), (32, 64)): 2, ((48, 48), (48, 48)): 6,
        ((64, 64), (48, 80)): 2, ((64, 64), (64, 64)): 6}
    assert dataset.bucket_counts()[(32, 32)] == 6 and dataset.info["resolution"] == (64, 64)


def test_batches_have_one_resolution_and_fixed_length(data):
    dataset = multires(data)
    seen = {}
    for epoch in range(60):
        dataset.set_epoch(epoch)
        assert len(dataset) == 12  # 3 x (6/2 + 2/2) every epoch: the trainer counts steps once
        for index in range(len(dataset)):
            batch = dataset[(epoch, index)]
            assert len({tuple(image.shape[-2:]) for image in batch["images"]}) == 1
            for i in dataset._batches[index]:
                v = dataset.variants[i]
                seen[(v.path, v.resolution)] = seen.get((v.path, v.resolution), 0) + 1
    # each image: 3 repeats x 60 epochs = 180 occurrences, about 1/3 at each size
    assert len(seen) == 24 and all(45 <= n <= 75 for n in seen.values())
    assert sum(seen.values()) == 24 * 60


def test_batch_size_one_varies_the_leftover_too(data):
    """One image, one repeat, batch size 1: its size still changes from epoch to epoch."""
    dataset = multires(data / "3_tall" / "..", train_batch_size=1)
    dataset.records[0].num_repeats = 1
    for v in dataset.variants:
        v.num_repeats = 1 if v.image_index == 0 else v.num_repeats
    sizes = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        sizes |= {dataset.variants[i].resolution for b in dataset._batches for i in b if i % 8 == 0}
    assert sizes == set(SIZES)


def _plan_script(root) -> str:
    return ("import sys; sys.path[:0] = ['.']\n"
            "from tests.test_multires import multires\n"
            f"d = multires({str(root)!r}); d.set_epoch(5)\n"
            "print([[d.variants[i].path[-6:-4] + str(d.variants[i].resolution[0]) for i in b] for b in d._batches])\n")


def test_plan_is_the_same_in_another_process(data):
    dataset = multires(data)
    dataset.set_epoch(5)
    here = [[dataset.variants[i].path[-6:-4] + str(dataset.variants[i].resolution[0]) for i in b]
            for b in dataset._batches]
    env = {**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _plan_script(data)], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True).stdout
    assert out.strip() == str(here)


def test_memory_cache_encodes_each_image_and_size_once(data):
    dataset = multires(data, flip_aug=True)
    calls: list[int] = []
    cache = caching.MemoryLatentCache()
    dataset.cache_latents(fake_encode(calls), batch_size=4, cache=cache)
    assert sum(calls) == 2 * 24 and len(cache) == 24  # 8 images x 3 sizes, and their mirror images
    dataset.cache_latents(fake_encode(calls), batch_size=4, cache=cache)
    assert sum(calls) == 2 * 24  # nothing left to encode
    for index in range(len(dataset)):
        batch = dataset[(0, index)]
        v = dataset.variants[dataset._batches[index][0]]
        assert tuple(batch["latents"].shape[-2:]) == (v.bucket[1] // 8, v.bucket[0] // 8)


def test_disk_cache_keeps_every_size_in_one_file(data):
    dataset = multires(data)
    calls: list[int] = []
    dataset.cache_latents(fake_encode(calls), batch_size=2, cache=caching.DiskLatentCache("vae", 0.5))
    assert sum(calls) == 24
    with np.load(str(data / "3_tall" / "t0_0064x0096_sd.npz")) as npz:
        latents = sorted(k for k in npz.files if k.startswith("latents_"))
    assert latents == ["latents_10x6", "latents_6x2", "latents_8x4"]
    again = multires(data)
    cache = caching.DiskLatentCache("vae", 0.5)
    again.cache_latents(fake_encode(calls), batch_size=2, cache=cache)
    assert sum(calls) == 24 and cache.counts["valid"] == 24


def test_report_lists_buckets_per_resolution(data):
    report = build_report(multires(data), make_cfg(data, max_train_epochs=1), lambda caption: 1)
    rows = [(b.training_size, b.resolution, b.samples, b.batches) for b in report.buckets]
    assert rows == [((32, 32), (16, 48), 2, 1), ((32, 32), (32, 32), 6, 3), ((48, 48), (32, 64), 2, 1),
                    ((48, 48), (48, 48), 6, 3), ((64, 64), (48, 80), 2, 1), ((64, 64), (64, 64), 6, 3)]
    assert report.batches_per_epoch == 12
    assert "resolution  bucket" in report.text()
    assert report.as_dict()["buckets"][0]["training_size"] == [32, 32]


def test_debug_dataset_shows_each_samples_own_size(data):
    from library.dataset.report import debug_dataset

    dataset = multires(data)
    shown = [line for line in debug_dataset(dataset, max_batches=len(dataset)).splitlines() if line.startswith("  ")]
    seen = set()
    for line in shown:
        path, sizes = line.split()[0], line.split("  ")[2]
        seen.add((os.path.basename(path)[0], sizes))
    # every size of TALL and of the squares appears, not only the largest
    assert seen == {("t", f"64x96 -> {r[0]}x{r[1]} -> bucket {b[0]}x{b[1]}") for b, r in TALL.values()} | {
        ("s", f"64x64 -> {n}x{n} -> bucket {n}x{n}") for n in (32, 48, 64)}


def test_dataset_config_takes_a_resolution_list(data, tmp_path):
    path = tmp_path / "ds.toml"
    path.write_text(f'[[datasets]]\nresolution = "multires:32,64"\nbatch_size = 2\nenable_bucket = false\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{data / "3_tall"}"\n  num_repeats = 2\n', encoding="utf-8")
    group = build_dataset(parse_args(["--dataset_config", str(path), "--seed", "3"]))
    dataset = group.datasets[0]
    assert {(v.resolution, v.bucket) for v in dataset.variants} == {((32, 32), (32, 32)), ((64, 64), (64, 64))}
    assert len(group) == 2  # 4 occurrences, 2 per size, one batch each


def test_trains_at_three_sizes(tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--resolution", "32,48,64", "--enable_bucket",
                      "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
                      "--cache_latents")
    assert train_network.main(argv) == 0
    assert os.path.exists(out / "lora.safetensors")
    report = json.loads((out / "dataset_report.json").read_text())
    assert {tuple(b["training_size"]) for b in report["buckets"]} == set(SIZES)
    assert sum(b["samples"] for b in report["buckets"]) == 90  # 9 images x 10 repeats, each at one size
    meta = safe_open(str(out / "lora.safetensors"), "pt").metadata()
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"


def test_a_size_below_the_bucket_step_is_refused():
    import argparse

    from library.dataset.loader import BucketSettings

    cfg = argparse.Namespace(resolution="32,48,64", enable_bucket=True, min_bucket_reso=16, max_bucket_reso=128,
                             bucket_reso_steps=64, bucket_no_upscale=False)
    with pytest.raises(UserError, match="every side must be at least --bucket_reso_steps 64"):
        BucketSettings.from_cfg(cfg)
    assert BucketSettings.from_cfg(argparse.Namespace(**{**vars(cfg), "bucket_reso_steps": 16})).resolutions
