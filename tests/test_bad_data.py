"""Bad dataset input (issue 3 item 9): each a one-line UserError naming the file or folder, nothing written;
--skip_bad_images leaves out unreadable / truncated images with one warning listing them."""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import train_network
from library.dataset.folders import discover_subsets
from library.dataset.image_check import ends_complete, image_problem
from library.dataset.loader import build_dataset
from library.errors import UserError
from tests.conftest import files_under, train_argv

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def image_bytes(ext: str, size=(48, 32), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=FORMATS[ext])
    return buffer.getvalue()


def write(path, data: bytes | str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)
    return str(path)


def make_cfg(data_dir, **overrides):
    values = dict(train_data_dir=str(data_dir), resolution="64", enable_bucket=False, train_batch_size=2,
                  caption_extension=".caption", seed=0)
    values.update(overrides)
    return argparse.Namespace(**values)


def one_line_error(cfg) -> str:
    with pytest.raises(UserError) as info:
        build_dataset(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- folders and captions ----

def test_zero_repeat_folder_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    write(tmp_path / "0_off" / "a.png", image_bytes(".png"))
    write(tmp_path / "2_on" / "b.png", image_bytes(".png"))
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(make_cfg(tmp_path))
    assert [r.path for r in dataset.records] == [str(tmp_path / "2_on" / "b.png")]
    skipped = [r.getMessage() for r in caplog.records if "0_off" in r.getMessage()]
    assert len(skipped) == 1 and "repeat count 0" in skipped[0] and "1_off" in skipped[0]


def test_only_a_zero_repeat_folder_is_an_error_naming_it(tmp_path):
    write(tmp_path / "0_off" / "a.png", image_bytes(".png"))
    message = one_line_error(make_cfg(tmp_path))
    assert message.startswith(f"no training images found in {tmp_path}") and "skipped sub-folders: 0_off" in message


def test_empty_folder_and_folder_without_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_line_error(make_cfg(empty)).startswith(f"no training images found in {empty};")
    write(tmp_path / "texts" / "10_a" / "a.caption", "a caption without its image")
    message = one_line_error(make_cfg(tmp_path / "texts"))
    assert str(tmp_path / "texts") in message and "skipped sub-folders: 10_a" in message


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    ("caf\u00e9".encode("latin-1"), "is not UTF-8"),
])
def test_bad_caption_files(tmp_path, content, expected):
    write(tmp_path / "1_x" / "a.png", image_bytes(".png"))
    caption = write(tmp_path / "1_x" / "a.caption", content)
    message = one_line_error(make_cfg(tmp_path))
    assert message.startswith(f"caption file {caption} ") and expected in message


# ---- the image check ----

@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_complete_images_pass_and_truncated_ones_are_named(tmp_path, ext):
    data = image_bytes(ext)
    good = write(tmp_path / f"good{ext}", data)
    cut = write(tmp_path / f"cut{ext}", data[: len(data) * 2 // 3])
    assert ends_complete(good) and image_problem(good) is None
    assert not ends_complete(cut)
    assert image_problem(cut).startswith("truncated or damaged: ")


def test_unreadable_header_and_data_after_the_end_marker(tmp_path):
    junk = write(tmp_path / "junk.png", b"this is not an image" * 10)
    assert image_problem(junk) == "unreadable: not an image, or a damaged one"
    # a phone "motion photo": a complete JPEG with a video appended; it decodes, so it is fine
    motion = write(tmp_path / "motion.jpg", image_bytes(".jpg") + b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    assert not ends_complete(motion) and image_problem(motion) is None


def bad_dataset(root) -> dict:
    """1_a: two good PNGs, a truncated PNG and a text file named .jpg; 2_b: one good JPEG."""
    png = image_bytes(".png")
    paths = {
        "good": [write(root / "1_a" / "a0.png", png), write(root / "1_a" / "a1.png", image_bytes(".png", seed=1)),
                 write(root / "2_b" / "b0.jpg", image_bytes(".jpg"))],
        "cut": write(root / "1_a" / "a2.png", png[:-40]),
        "junk": write(root / "1_a" / "a3.jpg", "not a picture"),
    }
    write(root / "1_a" / "a2.caption", "the truncated one")
    return paths


def test_bad_images_stop_the_scan_with_one_line(tmp_path):
    paths = bad_dataset(tmp_path)
    message = one_line_error(make_cfg(tmp_path))
    assert message.startswith(f"cannot use image {paths['cut']} (truncated or damaged: ")
    assert message.endswith("; 1 more in that folder: fix or remove it, or pass --skip_bad_images")


def test_skip_bad_images_leaves_them_out_with_one_warning(tmp_path, caplog):
    paths = bad_dataset(tmp_path)
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(make_cfg(tmp_path, skip_bad_images=True))
    assert sorted(r.path for r in dataset.records) == sorted(paths["good"])
    assert [s.img_count for s in dataset.subsets] == [2, 1]
    assert dataset.subsets[0].num_caption_files == 0  # the caption of the skipped image is not counted
    assert dataset.info["num_train_images"] == 2 * 1 + 1 * 2
    warnings = [r.getMessage() for r in caplog.records if "--skip_bad_images" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("--skip_bad_images: skipping 2 images that cannot be used: ")
    assert paths["cut"] in warnings[0] and paths["junk"] in warnings[0]


def test_skip_bad_images_when_no_image_is_left(tmp_path, caplog):
    write(tmp_path / "1_a" / "a.png", image_bytes(".png")[:-40])
    with caplog.at_level(logging.WARNING):
        message = one_line_error(make_cfg(tmp_path, skip_bad_images=True))
    assert "skipped sub-folders: 1_a" in message
    assert any("1_a: no usable images" in r.getMessage() for r in caplog.records)


def test_reg_folder_bad_images(tmp_path):
    write(tmp_path / "train" / "1_a" / "a.png", image_bytes(".png"))
    cut = write(tmp_path / "reg" / "1_r" / "r.webp", image_bytes(".webp")[:-30])
    cfg = make_cfg(tmp_path / "train", reg_data_dir=str(tmp_path / "reg"))
    assert one_line_error(cfg).startswith(f"cannot use image {cut} (truncated or damaged: ")
    cfg.skip_bad_images = True
    assert [r.is_reg for r in build_dataset(cfg).records] == [False]
    with pytest.raises(UserError, match="cannot use image"):
        discover_subsets(str(tmp_path / "reg"), is_reg=True)


# ---- end to end ----

@pytest.fixture
def data_with_truncated_image(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    image = sorted((data / "10_shapes").glob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:200])  # cut in the pixel data: its header still reads
    return data, image


def test_truncated_image_stops_before_training(tiny_model_dir, data_with_truncated_image, tmp_path, capsys):
    data, image = data_with_truncated_image
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = train_argv(tiny_model_dir, str(data), str(out), "--logging_dir", str(logs), "--cache_latents")
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot use image {image} (truncated or damaged: "), err
    assert err[0].endswith("or pass --skip_bad_images")
    assert files_under(out) == [] and files_under(logs) == []


def test_skip_bad_images_trains_without_it(tiny_model_dir, data_with_truncated_image, tmp_path, caplog):
    data, image = data_with_truncated_image
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert train_network.main(train_argv(tiny_model_dir, str(data), str(out), "--skip_bad_images")) == 0
    assert (out / "lora.safetensors").is_file()
    warnings = [r.getMessage() for r in caplog.records if "--skip_bad_images" in r.getMessage()]
    assert len(warnings) == 1 and str(image) in warnings[0]


def test_skip_bad_images_with_a_dataset_config(tmp_path, caplog):
    from library.config import parse_args

    good = write(tmp_path / "imgs" / "good.png", image_bytes(".png"))
    cut = write(tmp_path / "imgs" / "cut.png", image_bytes(".png", seed=1)[:-40])
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "imgs"}"\n'
                      'num_repeats = 2\n')
    argv = ["--dataset_config", str(config), "--resolution", "64"]
    with pytest.raises(UserError, match="cannot use image .*cut.png"):
        build_dataset(parse_args(argv))
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(parse_args([*argv, "--skip_bad_images"]))
    assert dataset.info["num_train_images"] == 2
    assert [r.path for d in dataset.datasets for r in d.records] == [good]
    assert sum(cut in r.getMessage() for r in caplog.records) == 1
