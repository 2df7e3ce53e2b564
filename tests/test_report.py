"""The pre-flight dataset report and --debug_dataset, on a small dataset built to have short batches,
upscaled images and over-long captions."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
from PIL import Image

import train_network
from library.dataset import build_dataset
from library.dataset.report import build_report, debug_dataset, schedule_length
from library.errors import UserError
from tests.conftest import files_under, train_argv


def write_image(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, dtype=np.uint8)).save(path)


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def count_words(caption: str) -> int:
    """A stand-in tokenizer: one token per word, commas apart."""
    return len(caption.replace(",", " ").split())


def make_cfg(data_dir, **overrides):
    values = dict(train_data_dir=str(data_dir), resolution="64", enable_bucket=True, min_bucket_reso=32,
                  max_bucket_reso=128, bucket_reso_steps=16, bucket_no_upscale=False, train_batch_size=4,
                  caption_extension=".caption", seed=3, gradient_accumulation_steps=4, max_train_steps=1600,
                  max_train_epochs=3, max_token_length=None)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture
def data(tmp_path):
    """3_chars: six square images (five 64x64, one 128x128), five captioned: c0 has 80 words, c1 two
    captions of which the second has 76; c5 has none. 2_small: two 32x48 images, upscaled to their bucket."""
    root = tmp_path / "data"
    for i in range(6):
        write_image(str(root / "3_chars" / f"c{i}.png"), (128, 128) if i == 4 else (64, 64))
    write_text(str(root / "3_chars" / "c0.caption"), " ".join(["word"] * 80))
    write_text(str(root / "3_chars" / "c1.caption"), "short one\n" + " ".join(["word"] * 76))
    for i in (2, 3, 4):
        write_text(str(root / "3_chars" / f"c{i}.caption"), " ".join(["word"] * 74))
    for i in range(2):
        write_image(str(root / "2_small" / f"s{i}.png"), (32, 48))
        write_text(str(root / "2_small" / f"s{i}.caption"), "small, thing")
    return root


def test_report_numbers(data):
    cfg = make_cfg(data)
    dataset = build_dataset(cfg)
    d = build_report(dataset, cfg, count_words).as_dict()
    root = str(data)
    assert d["subsets"] == [
        {"folder": os.path.join(root, "2_small"), "is_reg": False, "images": 2, "repeats": 2, "samples": 4, "caption_files": 2,
         "missing_captions": 0, "class_token": "small"},
        {"folder": os.path.join(root, "3_chars"), "is_reg": False, "images": 6, "repeats": 3, "samples": 18, "caption_files": 5,
         "missing_captions": 1, "class_token": "chars"},
    ]
    # 32x48 -> bucket 48x80 (nearest aspect ratio), resized to 53x80: upscaled. 4 samples fill one batch.
    # 64x64 and 128x128 -> bucket 64x64: 18 samples -> 4 full batches and one short batch of 2.
    assert d["buckets"] == [
        {"resolution": [48, 80], "images": 2, "samples": 4, "batches": 1, "short_batches": 0,
         "samples_in_short_batches": 0, "upscaled": 2},
        {"resolution": [64, 64], "images": 6, "samples": 18, "batches": 5, "short_batches": 1,
         "samples_in_short_batches": 2, "upscaled": 0},
    ]
    assert d["batches_per_epoch"] == len(dataset) == 6
    assert (d["batch_size"], d["gradient_accumulation_steps"]) == (4, 4)
    assert (d["short_batches"], d["samples_in_short_batches"], d["dropped_samples"]) == (1, 2, 0)
    # ceil(6 / 4) = 2 steps per epoch; --max_train_epochs 3 wins over --max_train_steps.
    assert (d["steps_per_epoch"], d["epochs"], d["total_steps"]) == (2, 3, 6)
    assert d["token_limit"] == 75
    assert d["long_captions"] == [{"image": os.path.join(root, "3_chars", "c0.png"), "tokens": 80},
                                  {"image": os.path.join(root, "3_chars", "c1.png"), "tokens": 76}]
    assert d["upscaled_images"] == [
        {"image": os.path.join(root, "2_small", f"s{i}.png"), "size": [32, 48], "bucket": [48, 80]} for i in range(2)
    ]


def test_prefix_and_token_limit_count(data):
    # The prefix makes the 74-word captions 76 tokens long; a 150-token limit flags nothing.
    cfg = make_cfg(data, caption_prefix="photo of")
    report = build_report(build_dataset(cfg), cfg, count_words)
    assert [(os.path.basename(c["image"]), c["tokens"]) for c in report.long_captions] == [
        ("c0.png", 82), ("c1.png", 78), ("c2.png", 76), ("c3.png", 76), ("c4.png", 76)]
    cfg = make_cfg(data, caption_prefix="photo of", max_token_length=150)
    report = build_report(build_dataset(cfg), cfg, count_words)
    assert report.token_limit == 150 and report.long_captions == []


def test_long_captions_use_each_subsets_prefix(data, tmp_path):
    # 3_chars gets a two-word suffix from its subset, 2_small none: the command line's prefix goes to both
    path = tmp_path / "ds.toml"
    path.write_text(f'[general]\nresolution = 64\n[[datasets]]\n  [[datasets.subsets]]\n'
                    f'  image_dir = "{data / "3_chars"}"\n  caption_suffix = "very long"\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{data / "2_small"}"\n', encoding="utf-8")
    from library.config import parse_args

    cfg = parse_args(["--dataset_config", str(path), "--caption_prefix", "photo"])
    report = build_report(build_dataset(cfg), cfg, count_words)
    assert [(os.path.basename(c["image"]), c["tokens"]) for c in report.long_captions] == [
        ("c0.png", 83), ("c1.png", 79), ("c2.png", 77), ("c3.png", 77), ("c4.png", 77)]


def test_schedule_follows_the_trainer():
    assert schedule_length(2, 5, None) == (5, 3)
    assert schedule_length(7, 1600, 2) == (14, 2)
    assert schedule_length(3, 3, 0) == (3, 1)
    with pytest.raises(UserError, match="max_train_steps"):
        schedule_length(3, 0, None)


def test_report_text_and_files(data, tmp_path):
    cfg = make_cfg(data, max_train_epochs=None, max_train_steps=5)
    report = build_report(build_dataset(cfg), cfg, count_words)
    text = report.text()
    lines = text.splitlines()
    root = str(data)
    assert lines[0] == "Subsets"
    assert lines[1].split() == ["folder", "images", "repeats", "samples", "captions", "missing", "caption", "of",
                                "missing"]
    assert lines[3].split() == [os.path.join(root, "2_small"), "2", "2", "4", "2", "0", "-"]
    assert lines[4].split() == [os.path.join(root, "3_chars"), "6", "3", "18", "5", "1", "'chars'"]
    assert "Buckets (batch size 4)" in lines
    at = lines.index("Buckets (batch size 4)")
    assert lines[at + 1:at + 5] == [
        "bucket  images  samples  batches  short  in short  upscaled",
        "------  ------  -------  -------  -----  --------  --------",
        "48x80        2        4        1      0         0         2",
        "64x64        6       18        5      1         2         0",
    ]
    assert lines[at + 5] == "short batches: 1, holding 2 samples: they train as smaller batches, nothing is dropped"
    assert "steps per epoch: 2 (gradient accumulation 4)" in lines
    assert "epochs: 3, total steps: 5" in lines
    assert "captions over 75 tokens: 2 (the text encoder cuts them there)" in lines
    assert f"  {os.path.join(root, '3_chars', 'c0.png')}: 80 tokens" in lines
    assert f"  {os.path.join(root, '2_small', 's1.png')}: 32x48 -> bucket 48x80" in lines

    out = tmp_path / "out"
    txt, js = report.write(str(out))
    assert sorted(os.listdir(out)) == ["dataset_report.json", "dataset_report.txt"]
    assert open(txt, encoding="utf-8").read() == text
    assert json.load(open(js, encoding="utf-8")) == report.as_dict()


def test_debug_dataset_lists_first_batches(data):
    cfg = make_cfg(data, shuffle_caption=True)
    dataset = build_dataset(cfg)
    shown = debug_dataset(dataset, max_batches=2).splitlines()
    assert shown[0] == "debug_dataset: 6 batches per epoch of up to 4 images; the first 2 of epoch 1"
    expected = [dataset[(0, i)] for i in range(2)]
    assert shown[1] == f"batch 1: {len(expected[0]['captions'])} samples"
    sample_lines = [line for line in shown if line.startswith("  ")]
    assert len(sample_lines) == sum(len(b["captions"]) for b in expected)
    pairs = [(p, c) for b in expected for p, c in zip(b["image_paths"], b["captions"])]
    for line, (path, caption) in zip(sample_lines, pairs):
        assert line.startswith(f"  {path}  ") and line.endswith(f"caption: {caption!r}")
        assert "-> 64x64 -> bucket 64x64" in line or "32x48 -> 53x80 -> bucket 48x80" in line


def test_regularisation_samples_are_the_balanced_ones(data, tmp_path):
    # 22 train samples; 3 reg images x 1 repeat are topped up to 22: repeats 8, 7, 7 (kohya's balance).
    for i in range(3):
        write_image(str(tmp_path / "reg" / "1_person" / f"r{i}.png"), (64, 64))
    cfg = make_cfg(data, reg_data_dir=str(tmp_path / "reg"))
    d = build_report(build_dataset(cfg), cfg, count_words).as_dict()
    reg = d["subsets"][2]
    assert (reg["is_reg"], reg["images"], reg["repeats"], reg["samples"], reg["missing_captions"]) == (True, 3, 1, 22, 3)
    assert [s["samples"] for s in d["subsets"]] == [4, 18, 22]
    square = d["buckets"][1]
    assert (square["images"], square["samples"], square["batches"], square["samples_in_short_batches"]) == (9, 40, 10, 0)
    assert d["batches_per_epoch"] == 11


def test_debug_dataset_through_train_network(data, tmp_path, capsys):
    out = tmp_path / "out"
    # No model is loaded: the model path does not even exist.
    argv = train_argv(str(tmp_path / "no_model"), str(data), str(out), "--debug_dataset", "--enable_bucket",
                      "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16")
    assert train_network.main(argv) == 0
    shown = capsys.readouterr().out.splitlines()
    # 2 x 2 samples in 48x80 and 6 x 3 in 64x64, batch size 2: 2 + 9 batches.
    assert shown[0] == "debug_dataset: 11 batches per epoch of up to 2 images; the first 4 of epoch 1"
    assert sum(line.startswith("batch ") for line in shown) == 4
    assert sum(line.startswith("  ") for line in shown) == 8
    assert files_under(out) == []
