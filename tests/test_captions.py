"""Per-epoch caption processing (kohya's order and semantics), against hand-worked expectations."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from library.dataset.captions import CaptionOptions, expand_wildcards, process_caption, shuffle_tags

RNG = random.Random


def test_plain_caption_is_unchanged():
    assert process_caption("sks, red, square", CaptionOptions(), 0, RNG(0)) == "sks, red, square"


def test_prefix_suffix():
    opts = CaptionOptions(prefix="photo of", suffix="high quality")
    assert process_caption("sks dog", opts, 0, RNG(0)) == "photo of sks dog high quality"


def test_keep_tokens_stay_in_front_and_the_rest_is_a_permutation():
    opts = CaptionOptions(shuffle=True, keep_tokens=2)
    seen = set()
    for seed in range(30):
        parts = process_caption("sks, dog, a, b, c, d", opts, 0, RNG(seed)).split(", ")
        assert parts[:2] == ["sks", "dog"] and sorted(parts[2:]) == ["a", "b", "c", "d"]
        seen.add(tuple(parts[2:]))
    assert len(seen) > 5  # it really shuffles


def test_keep_tokens_separator_head_middle_tail():
    opts = CaptionOptions(shuffle=True, keep_tokens_separator="|||")
    for seed in range(10):
        parts = shuffle_tags("sks, style ||| a, b, c ||| best, tail", opts, RNG(seed)).split(", ")
        assert parts[:2] == ["sks", "style"] and parts[-2:] == ["best", "tail"]
        assert sorted(parts[2:5]) == ["a", "b", "c"]
    # without shuffling the separator still never reaches the prompt
    assert process_caption("sks ||| a, b", CaptionOptions(keep_tokens_separator="|||"), 0, RNG(0)) == "sks, a, b"


def test_custom_separator_and_secondary_separator():
    opts = CaptionOptions(shuffle=True, separator=";", secondary_separator=";;;", keep_tokens=1)
    out = process_caption("sks; red;;;blue; square", opts, 0, RNG(3))
    # parts: "sks" fixed, then "red", "blue" (split), "square" shuffled; joined with ", "
    head, rest = out.split(", ", 1)
    assert head == "sks" and sorted(rest.replace(";", ", ").split(", ")) == ["blue", "red", "square"]


def test_caption_dropout_rate_drops_about_that_fraction():
    opts = CaptionOptions(dropout_rate=0.25)
    dropped = sum(process_caption("sks", opts, 0, RNG(i)) == "" for i in range(2000))
    assert 400 < dropped < 600


def test_caption_dropout_every_n_epochs_counts_from_one():
    opts = CaptionOptions(dropout_every_n_epochs=2)
    # kohya's epochs 1, 2, 3, 4 are our 0, 1, 2, 3: epochs 2 and 4 drop
    assert [process_caption("sks", opts, e, RNG(0)) for e in range(4)] == ["sks", "", "sks", ""]


def test_tag_dropout_keeps_fixed_tokens():
    opts = CaptionOptions(tag_dropout_rate=0.5, keep_tokens=1)
    counts = Counter()
    for i in range(1000):
        parts = process_caption("sks, a, b", opts, 0, RNG(i)).split(", ")
        assert parts[0] == "sks"
        counts.update(parts[1:])
    assert 400 < counts["a"] < 600 and 400 < counts["b"] < 600


def test_wildcards_and_escapes():
    outs = {expand_wildcards("a {red|blue} {{literal}} {big|small} dog", RNG(i)) for i in range(40)}
    assert outs == {f"a {c} {{literal}} {s} dog" for c in ("red", "blue") for s in ("big", "small")}
    # without --enable_wildcard braces are text
    assert process_caption("{red|blue}", CaptionOptions(), 0, RNG(0)) == "{red|blue}"
    assert process_caption("{red|blue}", CaptionOptions(enable_wildcard=True), 0, RNG(0)) in ("red", "blue")


def test_one_line_of_several_per_draw():
    outs = Counter(process_caption("first\nsecond\nthird", CaptionOptions(), 0, RNG(i)) for i in range(300))
    assert set(outs) == {"first", "second", "third"} and min(outs.values()) > 60


def test_dataset_items_use_processed_captions(tmp_path):
    from PIL import Image

    from library.config import parse_args
    from library.dataset import build_dataset

    folder = tmp_path / "4_thing"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 60, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(f"sks, tag{i}a, tag{i}b, tag{i}c\nalt {i}")
    argv = ["--train_data_dir", str(tmp_path), "--resolution", "64", "--shuffle_caption", "--keep_tokens", "2",
            "--caption_prefix", "photo,", "--seed", "5", "--train_batch_size", "2"]
    dataset = build_dataset(parse_args(argv))
    first = [c for i in range(len(dataset)) for c in dataset[(0, i)]["captions"]]
    assert len(first) == 12
    for caption in first:  # as kohya, the prefix is part 1 of the caption, so keep_tokens counts it
        assert caption.startswith("photo, sks, ") or caption in ("photo, alt 0", "photo, alt 1", "photo, alt 2")
    assert any(c.startswith("photo, sks, ") for c in first) and any("alt" in c for c in first)
    # the same (seed, epoch) gives the same captions in any process; another epoch draws anew
    again = [c for i in range(len(dataset)) for c in dataset[(0, i)]["captions"]]
    later = [c for i in range(len(dataset)) for c in dataset[(1, i)]["captions"]]
    assert first == again and first != later
