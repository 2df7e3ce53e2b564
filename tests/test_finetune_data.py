"""Fine-tuning data: kohya's metadata JSON (--in_json, metadata_file subsets), and kohya's
conditioning_data_dir masks."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train_network
from library import caching
from library.config import parse_args
from library.dataset import build_dataset
from library.dataset.finetune import entry_caption
from library.errors import UserError
from tests.conftest import files_under, train_argv
from tests.test_caching import fake_encode
from tests.test_dataset import write_image

META = {
    "a": {"caption": "a photo of a cat", "tags": "cat, sitting", "train_resolution": [64, 64]},
    "sub/b": {"tags": "dog,\nrunning"},
    "c.jpg": {"caption": "first line\nsecond line", "tags": "tag"},
}


@pytest.fixture
def ft(tmp_path):
    """imgs/: a.png (64x64), sub/b.png (64x96), c.jpg (96x64) and d.png (not in the metadata); meta.json."""
    imgs = tmp_path / "imgs"
    write_image(str(imgs / "a.png"), (64, 64), value=1)
    write_image(str(imgs / "sub" / "b.png"), (64, 96), value=2)
    Image.new("RGB", (96, 64), (3, 0, 0)).save(imgs / "c.jpg")
    write_image(str(imgs / "d.png"), (64, 64), value=4)
    write_meta(tmp_path / "meta.json", META)
    return tmp_path


def write_meta(path, data) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def in_json_cfg(root, *extra):
    return parse_args(["--in_json", str(root / "meta.json"), "--train_data_dir", str(root / "imgs"),
                       "--resolution", "64", "--seed", "1", *extra])


def test_captions_and_tags_are_joined_as_kohya_does():
    assert entry_caption("m", "k", {"caption": "a cat", "tags": "cat, sitting"}, ",") == ("a cat,cat, sitting",
                                                                                         "cat, sitting")
    assert entry_caption("m", "k", {"tags": "x, y"}, ",") == ("x, y", None)  # tags only: not counted (kohya)
    assert entry_caption("m", "k", {"caption": " one \n\n two ", "tags": "t"}, "|") == ("one|t\ntwo|t", "t")
    assert entry_caption("m", "k", {"caption": ""}, ",") == ("", None)  # explicitly empty: allowed
    with pytest.raises(UserError, match=r"^m: 'k': no \"caption\" or \"tags\": add one"):
        entry_caption("m", "k", {"train_resolution": [64, 64]}, ",")
    with pytest.raises(UserError, match=r"^m: 'k': \"tags\" must be a string, not \['x'\]"):
        entry_caption("m", "k", {"tags": ["x"]}, ",")


def test_in_json_images_captions_repeats_and_metadata(ft):
    dataset = build_dataset(in_json_cfg(ft, "--dataset_repeats", "3"))
    by_name = {os.path.relpath(r.path, ft / "imgs"): r for r in dataset.records}
    assert sorted(by_name) == ["a.png", "c.jpg", "sub/b.png"]  # d.png is not in the metadata
    assert by_name["a.png"].caption == "a photo of a cat,cat, sitting"
    assert by_name["sub/b.png"].caption == "dog,\nrunning"  # tags only, kept as written
    assert by_name["c.jpg"].caption == "first line,tag\nsecond line,tag"
    assert {r.num_repeats for r in dataset.records} == {3} and len(dataset) == 9
    # only some entries have train_resolution: buckets come from --resolution (64x64, no bucketing)
    assert {r.bucket for r in dataset.records} == {(64, 64)}
    info = dataset.info
    assert info["dataset_dirs"] == {"meta.json": {"n_repeats": 3, "img_count": 3}} and info["reg_dataset_dirs"] == {}
    assert info["tag_frequency"] == {"meta.json": {"cat": 1, "sitting": 1, "tag": 1}}
    assert info["num_train_images"] == 9


def test_train_resolution_gives_each_image_its_bucket(ft, caplog):
    meta = {"a": {"caption": "x", "train_resolution": [64, 64]}, "sub/b": {"caption": "y", "train_resolution": [48, 80]}}
    write_meta(ft / "meta.json", meta)
    cfg = parse_args(["--in_json", str(ft / "meta.json"), "--train_data_dir", str(ft / "imgs")])  # no --resolution
    dataset = build_dataset(cfg)
    tall = next(r for r in dataset.records if r.path.endswith("b.png"))
    assert (tall.bucket, tall.resized) == ((48, 80), (53, 80))  # covered, then cropped: never stretched
    assert dataset.settings.resolution == (64, 64) and dataset.info["enable_bucket"] is True
    assert dataset.info["bucket_info"]["buckets"] == {0: {"resolution": [48, 80], "count": 1},
                                                     1: {"resolution": [64, 64], "count": 1}}
    with pytest.raises(UserError, match=r"train_resolution \[48, 80\] of .*b.png in its metadata file: both "
                                        "sides must be divisible by 32"):
        dataset.verify_bucket_reso_steps(32)
    with pytest.raises(UserError, match="train_resolution.*--bucket_no_upscale cannot apply"):
        build_dataset(parse_args([*cfg_args(cfg), "--bucket_no_upscale", "--enable_bucket"]))
    with pytest.raises(UserError, match="multi-resolution --resolution cannot apply"):
        build_dataset(parse_args([*cfg_args(cfg), "--resolution", "32,48,64"]))


def cfg_args(cfg) -> list[str]:
    return ["--in_json", cfg.in_json, "--train_data_dir", cfg.train_data_dir]


BAD = [
    ("{not json", "meta.json: not valid JSON"),
    ("[1, 2]", "meta.json: expected an object of image keys"),
    ('{"a": "a cat"}', "meta.json: 'a': expected an object with \"caption\" and/or \"tags\""),
    ('{"a": {"caption": "x"}, "zz": {"caption": "y"}, "yy": {"caption": "z"}}',
     "meta.json: 'zz': image not found or under "),
    ('{"a": {"caption": "x", "train_resolution": [64]}}', "meta.json: 'a': train_resolution = [64]: expected"),
    ('{"a": {"tags": 3}}', "meta.json: 'a': \"tags\" must be a string"),
]


@pytest.mark.parametrize("text, expected", BAD)
def test_bad_metadata_is_one_line_and_writes_nothing(ft, tmp_path, text, expected, capsys):
    (ft / "meta.json").write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as err:
        build_dataset(in_json_cfg(ft))
    assert expected in str(err.value) and "\n" not in str(err.value)
    if "zz" in text:
        assert str(err.value).endswith("(1 more keys have no image)")
    out = tmp_path / "out"
    argv = [*train_argv(str(tmp_path / "no_model"), str(ft / "imgs"), str(out)), "--in_json", str(ft / "meta.json")]
    assert train_network.main(argv) == 2
    assert expected in capsys.readouterr().err and files_under(out) == []


def test_missing_metadata_file_and_image_lookup(ft):
    with pytest.raises(UserError, match="metadata file .*nope.json: file not found"):
        build_dataset(parse_args(["--in_json", str(ft / "nope.json"), "--train_data_dir", str(ft / "imgs"),
                                  "--resolution", "64"]))
    # an absolute key; a stem with two images takes the first in name order (kohya's glob, sorted)
    Image.new("RGB", (64, 64)).save(ft / "imgs" / "a.jpg")
    write_meta(ft / "meta.json", {str(ft / "imgs" / "d.png"): {"caption": "d"}, "a": {"caption": "a"}})
    dataset = build_dataset(in_json_cfg(ft))
    assert [os.path.basename(r.path) for r in dataset.records] == ["d.png", "a.jpg"]


def test_damaged_image_of_an_entry(ft, caplog):
    data = (ft / "imgs" / "a.png").read_bytes()
    (ft / "imgs" / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cannot use image .*a.png \(truncated or damaged"):
        build_dataset(in_json_cfg(ft))
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(in_json_cfg(ft, "--skip_bad_images"))
    assert sorted(os.path.basename(r.path) for r in dataset.records) == ["b.png", "c.jpg"]
    assert "--skip_bad_images: skipping 1 images" in caplog.text


def dataset_config(root, subsets: str, *extra):
    path = root / "ds.toml"
    path.write_text(f"[general]\nresolution = 64\nbatch_size = 2\n[[datasets]]\n{subsets}", encoding="utf-8")
    return parse_args(["--dataset_config", str(path), "--seed", "1", *extra])


def test_metadata_file_subsets_in_a_dataset_config(ft):
    other = write_meta(ft / "more.json", {"d": {"caption": "d", "tags": "extra"}})
    subsets = (f'  [[datasets.subsets]]\n  metadata_file = "{ft / "meta.json"}"\n  image_dir = "{ft / "imgs"}"\n'
               f'  num_repeats = 2\n  caption_separator = "|"\n'
               f'  [[datasets.subsets]]\n  metadata_file = "{other}"\n  image_dir = "{ft / "imgs"}"\n')
    group = build_dataset(dataset_config(ft, subsets))
    captions = {os.path.basename(r.path): r.caption for r in group.records}
    assert captions["a.png"] == "a photo of a cat|cat, sitting" and captions["d.png"] == "d,extra"
    info = group.info
    assert info["dataset_dirs"] == {"meta.json": {"n_repeats": 2, "img_count": 3},
                                    "more.json": {"n_repeats": 1, "img_count": 1}}
    entry = info["datasets"][0]
    assert entry["is_dreambooth"] is False and entry["num_train_images"] == 7
    assert entry["subsets"][0]["metadata_file"] == "meta.json" and entry["subsets"][0]["image_dir"] == "imgs"
    assert "class_tokens" not in entry["subsets"][0] and "is_reg" not in entry["subsets"][0]
    assert info["tag_frequency"] == {"meta.json": {"cat": 1, "sitting": 1, "tag": 1}, "more.json": {"extra": 1}}


def test_train_network_with_a_metadata_file_subset(tiny_model_dir, ft, tmp_path):
    subsets = f'  [[datasets.subsets]]\n  metadata_file = "{ft / "meta.json"}"\n  image_dir = "{ft / "imgs"}"\n'
    ds = ft / "ds.toml"
    ds.write_text(f"[general]\nresolution = 64\nbatch_size = 1\n[[datasets]]\n{subsets}", encoding="utf-8")
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, "unused", str(out), "--dataset_config", str(ds), "--max_train_steps", "2")
    assert train_network.main(argv) == 0
    meta = safe_open(str(out / "lora.safetensors"), "pt").metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"meta.json": {"n_repeats": 1, "img_count": 3}}
    assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["metadata_file"] == "meta.json"
    assert (meta["ss_num_train_images"], meta["ss_steps"]) == ("3", "2")
    report = json.loads((out / "dataset_report.json").read_text())
    assert report["subsets"][0]["folder"] == str(ft / "meta.json") and report["subsets"][0]["caption_files"] == 3


# --- kohya's conditioning_data_dir masks -------------------------------------------------------------

def red_mask(path, size, left_white=True):
    """An RGB mask image whose red channel is 255 on the left half (green and blue are noise)."""
    width, height = size
    array = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    array[..., 0] = 0
    array[:, : width // 2, 0] = 255
    if not left_white:
        array = array[:, ::-1].copy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def cond(tmp_path):
    """data/2_x: p.png and q.png (128x64); masks/2_x/p.png, q.jpg... (red = left half); flat/: p.png, q.png."""
    for name in ("p", "q"):
        write_image(str(tmp_path / "data" / "2_x" / f"{name}.png"), (128, 64))
        red_mask(str(tmp_path / "masks" / "2_x" / f"{name}.png"), (128, 64))
        red_mask(str(tmp_path / "flat" / f"{name}.png"), (128, 64), left_white=False)
    return tmp_path


def cli_cfg(root, *extra):
    return parse_args(["--train_data_dir", str(root / "data"), "--resolution", "64", "--seed", "2",
                       "--masked_loss", "--masked_loss_unmasked_probability", "0", *extra])


def test_conditioning_masks_are_the_red_channel_cut_like_the_image(cond):
    expected = torch.zeros(1, 8, 8)
    expected[..., :4] = 1.0  # resized 128x64, centre window x = 32..96: the white half covers x < 64
    for folder, want in (("masks", expected), ("flat", expected.flip(-1))):  # own sub-folder, or flat
        dataset = build_dataset(cli_cfg(cond, "--conditioning_data_dir", str(cond / folder), "--flip_aug"))
        for epoch in range(3):
            dataset.set_epoch(epoch)
            for i in range(len(dataset)):
                batch = dataset[i]
                for mask, flipped in zip(batch["masks"], batch["flipped"].tolist()):
                    assert torch.equal(mask, want.flip(-1) if flipped else want)


def test_conditioning_mask_errors(cond, caplog):
    os.remove(cond / "masks" / "2_x" / "q.png")
    red_mask(str(cond / "masks" / "2_x" / "extra.png"), (8, 8))
    with pytest.raises(UserError, match=r"no mask for image .*2_x/q.png in conditioning_data_dir .*masks/2_x: add q.png"):
        build_dataset(cli_cfg(cond, "--conditioning_data_dir", str(cond / "masks")))
    red_mask(str(cond / "masks" / "2_x" / "q.webp"), (64, 64))  # any image extension; the wrong size
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(cli_cfg(cond, "--conditioning_data_dir", str(cond / "masks")))
    assert "1 files in conditioning_data_dir" in caplog.text and "extra.png" in caplog.text
    with pytest.raises(UserError, match=r"mask .*q.webp is 64x64 but its image is 128x64"):
        [dataset[i] for i in range(len(dataset))]
    with pytest.raises(UserError, match="--conditioning_data_dir holds loss masks: add --masked_loss"):
        build_dataset(parse_args(["--train_data_dir", str(cond / "data"), "--resolution", "64",
                                  "--conditioning_data_dir", str(cond / "masks")]))


def test_conditioning_masks_are_cached_and_follow_their_files(cond):
    cfg = cli_cfg(cond, "--conditioning_data_dir", str(cond / "masks"))
    dataset = build_dataset(cfg)
    dataset.cache_latents(fake_encode([]), cache=caching.DiskLatentCache("vae", 1.0))
    path = dataset.records[0].path
    assert dataset.latent_cache.get_mask(path)[0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    red_mask(str(cond / "masks" / "2_x" / os.path.basename(path)), (128, 64), left_white=False)
    again = build_dataset(cfg)
    cache = caching.DiskLatentCache("vae", 1.0)
    again.cache_latents(fake_encode([]), cache=cache)
    assert cache.counts["stale"] == 1 and cache.counts["valid"] == 1
    assert cache.get_mask(path)[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_conditioning_data_dir_in_a_dataset_config(cond):
    subsets = (f'  [[datasets.subsets]]\n  image_dir = "{cond / "data" / "2_x"}"\n'
               f'  conditioning_data_dir = "{cond / "masks" / "2_x"}"\n')
    group = build_dataset(dataset_config(cond, subsets, "--masked_loss", "--masked_loss_unmasked_probability", "0"))
    batch = group[0]
    assert batch["masks"].shape == (2, 1, 8, 8) and batch["masks"][:, 0, 0].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]] * 2
