"""Benchmark: the dataset layer's two performance targets from issue 3.

1. `scan`: discover_subsets + build_dataset over 10,000 generated images (PNG and JPEG, several aspect
   ratios and realistic pixel sizes, half of them captioned, in 4 folders), bucketing on. Target: <= 3 s.
   The files are written just before, so they are in the page cache: this measures sdtune's work, not
   the disk.
2. `cache`: latent caching with the real SD1.5 VAE architecture (random weights, built in-process) on
   256 px images: the time spent preparing pixels (decode, resize, crop, stack) on the caching thread,
   against the time spent in the VAE encoder. Target: data preparation overhead <= 10% of VAE time.
3. `verify`: what checking every image for truncation at scan time costs (library.dataset.image_check,
   done on every run), per image, against PIL's verify() and a full decode, on camera-sized files.

Prints one JSON line per part (`--only` picks one).

    .venv/bin/python bench/bench_dataset.py [--work .bench/dataset] [--images 10000] [--cache_images 24]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (width, height) of the generated images: landscape, square and portrait photos at camera-ish sizes.
SIZES = ((1024, 768), (768, 1024), (832, 832), (1216, 832), (640, 960), (1536, 1024))


def _templates() -> list[tuple[str, bytes]]:
    """One encoded file per size and format; copies of them make the data set quickly."""
    import numpy as np
    from PIL import Image

    templates = []
    for i, (width, height) in enumerate(SIZES):
        ramp = np.linspace(0, 255, width, dtype=np.uint8)
        pixels = np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)
        for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG")):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format=fmt)
            templates.append((ext, buffer.getvalue()))
    return templates


def make_scan_dataset(root: str, count: int) -> str:
    """`count` images in 4 `N_concept` folders; every second image has a caption file."""
    shutil.rmtree(root, ignore_errors=True)
    templates = _templates()
    folders = [os.path.join(root, f"{n}_concept{n}") for n in (1, 2, 3, 5)]
    for folder in folders:
        os.makedirs(folder)
    for i in range(count):
        ext, data = templates[i % len(templates)]
        folder = folders[i % len(folders)]
        with open(os.path.join(folder, f"img{i:05d}{ext}"), "wb") as handle:
            handle.write(data)
        if i % 2 == 0:
            with open(os.path.join(folder, f"img{i:05d}.caption"), "w", encoding="utf-8") as handle:
                handle.write(f"a photo of thing {i}, tag{i % 7}, tag{i % 11}\n")
    return root


def scan_cfg(data: str, **extra) -> SimpleNamespace:
    values = dict(train_data_dir=data, resolution="512", enable_bucket=True, min_bucket_reso=256,
                  max_bucket_reso=1024, bucket_reso_steps=64, train_batch_size=4, seed=0,
                  caption_extension=".caption")
    values.update(extra)
    return SimpleNamespace(**values)


def bench_scan(work: str, count: int, repeats: int = 3) -> dict:
    from library.dataset.folders import discover_subsets
    from library.dataset.loader import build_dataset

    data = make_scan_dataset(os.path.join(work, "scan"), count)
    cfg = scan_cfg(data)
    discover, build = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        discover_subsets(data, ".caption")
        discover.append(time.perf_counter() - start)
        start = time.perf_counter()
        dataset = build_dataset(cfg)
        build.append(time.perf_counter() - start)
    return {"bench": "dataset_scan", "images": len(dataset.records), "buckets": len(dataset.bucket_counts()),
            "discover_subsets_s": round(min(discover), 3), "build_dataset_s": round(min(build), 3),
            "target_s": 3.0, "ok": min(build) <= 3.0, "runs": repeats, "cpus": os.cpu_count()}


def make_photo_dataset(root: str, count: int, sizes=SIZES) -> str:
    """`count` noisy JPEGs (q90) in `1_photos`: noise costs as much to decode as a photo of the same size."""
    import numpy as np
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)
    folder = os.path.join(root, "1_photos")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC)
        image.save(os.path.join(folder, f"p{i:03d}.jpg"), quality=90)
    return root


def bench_cache(work: str, count: int, vae_batch_size: int) -> dict:
    """cache_latents with the SD1.5 VAE: seconds inside the encoder vs everything else on that thread."""
    import torch
    from diffusers import AutoencoderKL

    from library.dataset.loader import build_dataset
    from library.models.synthetic import sd1_configs

    data = make_photo_dataset(os.path.join(work, "cache"), count)
    dataset = build_dataset(scan_cfg(data, resolution="256", min_bucket_reso=128, max_bucket_reso=512))
    torch.manual_seed(0)
    vae = AutoencoderKL(**sd1_configs("sd15")["vae"]).eval()
    encode_s = []

    def encode(pixels):
        start = time.perf_counter()
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        encode_s.append(time.perf_counter() - start)
        return latents

    with torch.no_grad():
        encode(torch.zeros(1, 3, 64, 64))  # first-call set-up is not caching work
    encode_s.clear()
    start = time.perf_counter()
    dataset.cache_latents(encode, vae_batch_size)
    total = time.perf_counter() - start
    vae_time = sum(encode_s)
    overhead = (total - vae_time) / vae_time
    return {"bench": "latent_cache_overhead", "images": count, "vae_batch_size": vae_batch_size,
            "buckets": len(dataset.bucket_counts()), "total_s": round(total, 2), "vae_encode_s": round(vae_time, 2),
            "data_prep_s": round(total - vae_time, 3), "overhead": round(overhead, 4), "target": 0.10,
            "ok": overhead <= 0.10, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def bench_verify(work: str) -> dict:
    """ms per image for the scan-time check (header + end marker) against PIL verify() and a full decode,
    on camera-sized files (the noisy JPEGs of make_photo_dataset, and the same pixels as PNG)."""
    from PIL import Image

    from library.dataset.image_check import image_problem
    from library.dataset.images import image_size

    folder = os.path.join(make_photo_dataset(os.path.join(work, "verify"), 12), "1_photos")
    jpgs = sorted(os.path.join(folder, n) for n in os.listdir(folder))
    pngs = []
    for path in jpgs:
        with Image.open(path) as image:
            pngs.append(path[:-4] + ".png")
            image.save(pngs[-1])

    def verify(path):
        with Image.open(path) as image:
            image.verify()

    def decode(path):
        with Image.open(path) as image:
            image.load()

    result = {"bench": "bad_image_check_ms_per_image", "cpus": os.cpu_count()}
    for ext, paths in ((".jpg", jpgs), (".png", pngs)):
        size_mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 2**20
        result[ext] = {"mean_file_mb": round(size_mb, 2)}
        for name, fn in (("header_only", image_size), ("sdtune_check", image_problem), ("pil_verify", verify),
                         ("full_decode", decode)):
            start = time.perf_counter()
            for _ in range(3):
                for path in paths:
                    fn(path)
            result[ext][name] = round((time.perf_counter() - start) / (3 * len(paths)) * 1000, 3)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(REPO, ".bench", "dataset"))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--cache_images", type=int, default=24)
    parser.add_argument("--only", choices=["scan", "cache", "verify"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.only in (None, "scan"):
        print(json.dumps(bench_scan(args.work, args.images)), flush=True)
    if args.only in (None, "cache"):
        for batch_size in (1, 4):
            print(json.dumps(bench_cache(args.work, args.cache_images, batch_size)), flush=True)
    if args.only in (None, "verify"):
        print(json.dumps(bench_verify(args.work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
