"""Dataset folders, captions, bucket arithmetic, batching and the in-memory latent cache."""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library import caching
from library.dataset import build_dataset
from library.dataset import buckets as bk
from library.dataset import loader
from library.dataset.captions import read_caption, tag_frequency
from library.dataset.demo_data import make_demo_dataset
from library.dataset.folders import discover_subsets
from library.dataset.images import resize_and_crop, to_tensor
from library.errors import UserError, run_cli


def write_image(path, size, value=0):
    """A solid RGB image whose red channel is `value` and green channel the row index (to check crops)."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 0] = value
    array[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def make_cfg(data_dir, **overrides):
    values = dict(train_data_dir=str(data_dir), resolution="64", enable_bucket=True, min_bucket_reso=32,
                  max_bucket_reso=128, bucket_reso_steps=16, bucket_no_upscale=False, train_batch_size=4,
                  caption_extension=".caption", seed=7)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture
def two_buckets(tmp_path):
    """2_square: five 64x64 images (captioned 'red, square, N'); 2_tall: three 64x96 images, one captioned."""
    root = tmp_path / "data"
    for i in range(5):
        write_image(str(root / "2_square" / f"s{i}.png"), (64, 64), value=10 * i)
        write_text(str(root / "2_square" / f"s{i}.caption"), f"red, Square, n{i}")
    for i in range(3):
        write_image(str(root / "2_tall" / f"t{i}.png"), (64, 96), value=100 + 10 * i)
    write_text(str(root / "2_tall" / "t0.caption"), "tall one")
    return root


# ---- buckets: hand-computed numbers ----

def test_bucket_resolutions_512():
    expected = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                (1024, 256)]
    assert bk.make_bucket_resolutions((512, 512), 256, 1024, 64) == expected


def test_bucket_resolutions_small_steps():
    # area 4096: w=32 -> 128; 48 -> 85//16*16=80; 64 -> 64; 80 -> 48; 96 -> 32; 112 -> 32; 128 -> 32
    assert bk.make_bucket_resolutions((64, 64), 32, 128, 16) == [
        (32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]


def test_select_bucket_closest_aspect_ratio():
    buckets = bk.make_bucket_resolutions((512, 512), 256, 1024, 64)
    bucket, resized, error = bk.select_bucket(1000, 500, buckets)
    assert bucket == (704, 320)  # ar 2.2 beats 640x384 (1.667)
    assert resized == (704, 352)  # width matches, height overhangs by 32
    assert error == pytest.approx(0.2)
    assert bk.center_crop_offsets(resized, bucket) == (0, 16)
    assert bk.select_bucket(640, 384, buckets) == ((640, 384), (640, 384), pytest.approx(0.0))
    assert bk.select_bucket(300, 300, buckets)[:2] == ((512, 512), (512, 512))  # upscaled


def test_cover_size_and_crop():
    assert bk.cover_size((100, 50), (64, 64)) == (128, 64)
    assert bk.cover_size((64, 96), (64, 64)) == (64, 96)
    assert bk.cover_size((1000, 500), (512, 768)) == (1536, 768)
    assert bk.center_crop_offsets((128, 64), (64, 64)) == (32, 0)


def test_no_upscale_bucket():
    # 1000x500 over 512^2: scaled to ~724x362; fixing the height (320 -> 640 wide) keeps ar exactly 2
    assert bk.no_upscale_bucket(1000, 500, 512 * 512, 64) == ((640, 320), (640, 320), 0.0)
    bucket, resized, error = bk.no_upscale_bucket(300, 200, 512 * 512, 64)
    assert (bucket, resized) == ((256, 192), (300, 200))
    assert error == pytest.approx(256 / 192 - 1.5)
    assert bk.round_to_steps(724.08, 64) == 704


@pytest.mark.parametrize("value, expected", [("512", (512, 512)), ("512,768", (512, 768)), (" 640 , 384 ", (640, 384)),
                                             (768, (768, 768)), ([512, 640], (512, 640))])
def test_parse_resolution(value, expected):
    assert bk.parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["abc", "1,2,3", "0", "512,-1", ""])
def test_parse_resolution_rejects(value):
    with pytest.raises(UserError, match="--resolution"):
        bk.parse_resolution(value)


# ---- folders and captions ----

def test_discover_subsets_captions_and_class_tokens(tmp_path, caplog):
    root = tmp_path / "data"
    write_image(str(root / "3_my_dog" / "a.png"), (8, 8))
    write_text(str(root / "3_my_dog" / "a.caption"), "a dog on grass\nmore text")
    write_image(str(root / "3_my_dog" / "b.jpg"), (8, 8))
    write_image(str(root / "3_my_dog" / "C.PNG"), (8, 8))
    write_text(str(root / "3_my_dog" / "C.caption"), "  spaced caption  ")
    write_text(str(root / "3_my_dog" / "notes.md"), "not an image")
    write_image(str(root / "dogs" / "x.png"), (8, 8))
    write_image(str(root / "0_unused" / "x.png"), (8, 8))
    with caplog.at_level(logging.WARNING):
        subsets = discover_subsets(str(root), "caption")  # the missing dot is added
    assert len(subsets) == 1
    subset = subsets[0]
    assert (subset.num_repeats, subset.class_tokens, subset.name, subset.img_count) == (3, "my_dog", "3_my_dog", 3)
    names = [os.path.basename(p) for p in subset.image_paths]
    assert names == ["C.PNG", "a.png", "b.jpg"]
    assert subset.captions == ["spaced caption", "a dog on grass\nmore text", "my_dog"]  # every line kept
    assert subset.num_caption_files == 2
    text = caplog.text
    assert "dogs" in text and "repeat count" in text
    assert "0_unused" in text
    assert "1 of 3 images" in text and "'my_dog'" in text


def test_txt_captions_hint_and_extension(tmp_path, caplog):
    root = tmp_path / "data"
    write_image(str(root / "1_cat" / "a.png"), (8, 8))
    write_text(str(root / "1_cat" / "a.txt"), "a cat")
    with caplog.at_level(logging.WARNING):
        subsets = discover_subsets(str(root), ".caption")
    assert subsets[0].captions == ["cat"]
    hints = [r for r in caplog.records if "--caption_extension .txt" in r.getMessage()]
    assert len(hints) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert discover_subsets(str(root), "txt")[0].captions == ["a cat"]
    assert "--caption_extension" not in caplog.text


def test_caption_reading_rules(tmp_path):
    image = str(tmp_path / "face_10_20_30_40.png")
    assert read_caption(image, ".caption") is None
    write_text(str(tmp_path / "face.caption"), "shared face caption")  # kohya's face-crop name fallback
    assert read_caption(image, ".caption") == "shared face caption"
    write_text(str(tmp_path / "face_10_20_30_40.caption"), "own caption")
    assert read_caption(image, ".caption") == "own caption"
    write_text(str(tmp_path / "empty.caption"), "")
    with pytest.raises(UserError, match="empty.caption"):
        read_caption(str(tmp_path / "empty.png"), ".caption")
    with open(tmp_path / "latin.caption", "wb") as f:
        f.write(b"caf\xe9")
    with pytest.raises(UserError, match="latin.caption.*UTF-8"):
        read_caption(str(tmp_path / "latin.png"), ".caption")


def test_tag_frequency():
    assert tag_frequency(["Red, square, n0", "red,  circle,", "red"]) == {"red": 3, "square": 1, "n0": 1, "circle": 1}


def test_folder_errors_name_the_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match="nope.*folder not found"):
        discover_subsets(missing)
    root = tmp_path / "flat"
    write_image(str(root / "a.png"), (8, 8))
    with pytest.raises(UserError) as info:
        discover_subsets(str(root))
    message = str(info.value)
    assert str(root) in message and "<repeats>_<concept>" in message and "sub-folder" in message
    assert "\n" not in message


def test_user_error_exits_2_without_traceback(tmp_path, capsys):
    cfg = make_cfg(tmp_path / "missing")
    assert run_cli(lambda argv: build_dataset(cfg), []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --train_data_dir") and "missing" in err and "Traceback" not in err


# ---- the dataset ----

def test_batches_per_epoch_with_repeats_and_buckets(two_buckets):
    dataset = build_dataset(make_cfg(two_buckets))
    # square: 5 images x 2 repeats = 10 -> 3 batches of <= 4; tall (48x80 bucket): 3 x 2 = 6 -> 2 batches
    assert len(dataset) == 5
    seen: dict[str, int] = {}
    for index in range(len(dataset)):
        batch = dataset[index]
        assert batch["latents"] is None
        assert batch["images"].shape[1:] in (torch.Size([3, 64, 64]), torch.Size([3, 80, 48]))
        assert len(batch["captions"]) == batch["images"].shape[0] <= 4
        assert batch["is_reg"].dtype == torch.bool and not batch["is_reg"].any()
        for path in batch["image_paths"]:
            seen[os.path.basename(path)] = seen.get(os.path.basename(path), 0) + 1
    assert seen == {**{f"s{i}.png": 2 for i in range(5)}, **{f"t{i}.png": 2 for i in range(3)}}
    assert len(build_dataset(make_cfg(two_buckets, enable_bucket=False))) == 4  # one bucket: 16 / 4


def test_captions_in_batches(two_buckets):
    dataset = build_dataset(make_cfg(two_buckets, train_batch_size=1))
    captions = {}
    for index in range(len(dataset)):
        batch = dataset[index]
        captions[os.path.basename(batch["image_paths"][0])] = batch["captions"][0]
    assert captions["s3.png"] == "red, Square, n3"
    assert captions["t0.png"] == "tall one"
    assert captions["t1.png"] == captions["t2.png"] == "tall"


def test_info_matches_kohya_shapes(two_buckets):
    info = build_dataset(make_cfg(two_buckets)).info
    assert info["num_train_images"] == 16 and info["num_reg_images"] == 0
    assert info["dataset_dirs"] == {"2_square": {"n_repeats": 2, "img_count": 5},
                                    "2_tall": {"n_repeats": 2, "img_count": 3}}
    assert info["tag_frequency"]["2_square"] == {"red": 5, "square": 5, **{f"n{i}": 1 for i in range(5)}}
    assert info["tag_frequency"]["2_tall"] == {"tall one": 1, "tall": 2}
    buckets = info["bucket_info"]["buckets"]
    assert buckets == {0: {"resolution": [48, 80], "count": 6}, 1: {"resolution": [64, 64], "count": 10}}
    # three 64x96 images in 48x80: |0.6 - 2/3| each; five exact squares: 0
    assert info["bucket_info"]["mean_img_ar_error"] == pytest.approx(3 * (2 / 3 - 0.6) / 8)
    assert (info["resolution"], info["min_bucket_reso"], info["num_batches_per_epoch"]) == ((64, 64), 32, 5)
    flat = build_dataset(make_cfg(two_buckets, enable_bucket=False)).info
    assert flat["bucket_info"] is None and flat["min_bucket_reso"] is None


def batch_order(dataset):
    return [tuple(os.path.basename(p) for p in dataset[i]["image_paths"]) for i in range(len(dataset))]


def test_order_is_deterministic_per_seed_and_epoch(two_buckets, monkeypatch):
    monkeypatch.setattr(loader, "load_pixels", lambda path, resized, bucket, *_: torch.zeros(3, bucket[1], bucket[0]))
    first, second = build_dataset(make_cfg(two_buckets)), build_dataset(make_cfg(two_buckets))
    first.set_epoch(1)
    second.set_epoch(1)
    epoch1 = batch_order(first)
    assert epoch1 == batch_order(second)
    first.set_epoch(2)
    assert batch_order(first) != epoch1
    first.set_epoch(1)
    assert batch_order(first) == epoch1  # independent of which epochs came before
    other_seed = build_dataset(make_cfg(two_buckets, seed=8))
    other_seed.set_epoch(1)
    assert batch_order(other_seed) != epoch1


def test_without_buckets_images_cover_then_center_crop(two_buckets):
    dataset = build_dataset(make_cfg(two_buckets, enable_bucket=False, train_batch_size=16))
    batch = dataset[0]
    assert batch["images"].shape == (16, 3, 64, 64)
    index = [os.path.basename(p) for p in batch["image_paths"]].index("t1.png")
    green = batch["images"][index, 1]
    # 64x96 covers 64x64 without resizing; the crop starts at row (96 - 64) // 2 = 16
    assert green[0, 0].item() == pytest.approx(16 / 127.5 - 1)
    assert green[63, 5].item() == pytest.approx(79 / 127.5 - 1)
    assert batch["images"][index, 0, 10, 10].item() == pytest.approx(110 / 127.5 - 1)


def test_resize_and_crop_numbers():
    image = Image.fromarray(np.full((50, 100, 3), 200, dtype=np.uint8))
    out = resize_and_crop(image, (128, 64), (64, 64))
    assert out.size == (64, 64)
    pixels = to_tensor(out)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert torch.allclose(pixels, torch.full_like(pixels, 200 / 127.5 - 1), atol=1e-6)
    extremes = to_tensor(Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8)))
    assert extremes.flatten().tolist() == pytest.approx([-1.0, 1.0, -0.6])


def test_bucket_option_errors(two_buckets):
    with pytest.raises(UserError, match="--min_bucket_reso 256"):
        build_dataset(make_cfg(two_buckets, min_bucket_reso=256))
    with pytest.raises(UserError, match="--max_bucket_reso 48"):
        build_dataset(make_cfg(two_buckets, max_bucket_reso=48))
    with pytest.raises(UserError, match="--resolution is required"):
        build_dataset(make_cfg(two_buckets, resolution=None))
    dataset = build_dataset(make_cfg(two_buckets))
    dataset.verify_bucket_reso_steps(16)
    with pytest.raises(UserError, match="--bucket_reso_steps 16 must be divisible by 64"):
        dataset.verify_bucket_reso_steps(64)


def test_bucket_no_upscale_keeps_small_images(two_buckets):
    write_image(str(two_buckets / "2_square" / "big.png"), (200, 100))
    write_image(str(two_buckets / "2_square" / "small.png"), (40, 24))
    dataset = build_dataset(make_cfg(two_buckets, bucket_no_upscale=True))
    placed = {os.path.basename(r.path): (r.bucket, r.resized) for r in dataset.records}
    assert placed["small.png"] == ((32, 16), (40, 24))  # never upscaled: cropped to multiples of 16
    assert placed["s0.png"] == ((64, 64), (64, 64))
    # 200x100 over 64^2 is ~90.5x45.3; fixing the height (32 -> 64 wide) keeps ar 2, fixing the width gives 80x32
    assert placed["big.png"] == ((64, 32), (64, 32))
    # 64x96 over 64^2 is ~52.3x78.4; width 48 (-> 72 tall, ar error 0.083) beats height 64 (-> 32 wide, 0.167)
    assert placed["t0.png"] == ((48, 64), (48, 72))
    write_image(str(two_buckets / "2_square" / "tiny.png"), (12, 40))
    with pytest.raises(UserError, match="tiny.png.*12x40.*--bucket_reso_steps 16"):
        build_dataset(make_cfg(two_buckets, bucket_no_upscale=True))


# ---- latent cache ----

def fake_encode(calls):
    def encode(pixels):
        calls.append(pixels.shape[0])
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1) * 0.5

    return encode


def test_latent_cache_encodes_each_image_once(two_buckets, monkeypatch):
    dataset = build_dataset(make_cfg(two_buckets, train_batch_size=3))
    calls: list[int] = []
    dataset.cache_latents(fake_encode(calls), batch_size=2)
    # 3 tall images (smaller area first) -> 2 + 1, then 5 squares -> 2 + 2 + 1
    assert calls == [2, 1, 2, 2, 1]
    assert len(dataset.latent_cache) == 8
    expected = {
        r.path: fake_encode([])(loader.load_pixels(r.path, r.resized, r.bucket)[None])[0] for r in dataset.records
    }

    def no_decoding(*args):
        raise AssertionError("images must not be decoded after caching")

    monkeypatch.setattr(loader, "load_pixels", no_decoding)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            batch = dataset[index]
            assert batch["images"] is None
            assert batch["latents"].shape[1:] in (torch.Size([4, 8, 8]), torch.Size([4, 10, 6]))
            for path, latents in zip(batch["image_paths"], batch["latents"]):
                assert torch.allclose(latents, expected[path], atol=1e-6)
    assert calls == [2, 1, 2, 2, 1]


def test_plan_cache_batches_groups_by_bucket():
    records = [loader.ImageRecord(f"{i}.png", "", 1, False, (8, 8), bucket=b)
               for i, b in enumerate([(64, 64), (48, 80), (64, 64), (64, 64), (48, 80)])]
    batches = caching.plan_cache_batches(records, 2)
    assert [[r.path for r in b] for b in batches] == [["1.png", "4.png"], ["0.png", "2.png"], ["3.png"]]


def test_demo_dataset_is_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    make_demo_dataset(str(first), seed=0)
    make_demo_dataset(str(second), seed=0)
    names = sorted(os.listdir(first / "10_shapes"))
    assert len([n for n in names if n.endswith(".png")]) == 9
    assert len([n for n in names if n.endswith(".caption")]) == 8
    for name in names:
        assert (first / "10_shapes" / name).read_bytes() == (second / "10_shapes" / name).read_bytes()
    dataset = build_dataset(make_cfg(first))
    assert dataset.info["num_train_images"] == 90
    assert dataset.bucket_counts() == {(48, 80): 20, (64, 64): 70}
    assert sum(c == "shapes" for c in dataset.subsets[0].captions) == 1


def test_epoch_addressed_items_and_loader(two_buckets):
    from library.dataset import BatchLoader

    dataset = build_dataset(make_cfg(two_buckets))
    by_tuple = [dataset[(1, i)]["image_paths"] for i in range(len(dataset))]
    dataset.set_epoch(1)
    assert by_tuple == [dataset[i]["image_paths"] for i in range(len(dataset))]
    dataset.set_epoch(0)
    loader = BatchLoader(dataset, max_workers=0, persistent=False)
    loader.sampler.set_epoch(1)
    assert [b["image_paths"] for b in loader] == by_tuple
