"""Regularisation images: kohya's balancing against train images, --prior_loss_weight, ss_* metadata."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch
from safetensors import safe_open

import train_network
from library import losses
from library.config import parse_args
from library.dataset import build_dataset
from library.dataset.loader import ImageRecord, balance_reg_records
from library.errors import UserError
from library.methods import NetworkMethod
from library.trainer import Run
from tests.conftest import files_under, train_argv
from tests.test_dataset import make_cfg, write_image


def reg_records(*repeats: int) -> list[ImageRecord]:
    return [ImageRecord(f"r{i}.png", "person", n, True, (64, 64)) for i, n in enumerate(repeats)]


def used_repeats(num_train: int, *repeats: int) -> list[tuple[str, int]]:
    return [(r.path, r.num_repeats) for r in balance_reg_records(num_train, reg_records(*repeats))]


# ---- balancing: hand-traced through kohya's loop ----

def test_fewer_reg_images_get_more_repeats_in_turn():
    # 1 + 1 + 2 = 4 on the first pass; 6 more: two more rounds of +1 each -> 3, 3, 4 (sum 10).
    assert used_repeats(10, 1, 1, 2) == [("r0.png", 3), ("r1.png", 3), ("r2.png", 4)]
    # 5 more after the first pass: one full round, then r0 and r1 once more -> 3, 3, 3 (sum 9).
    assert used_repeats(9, 1, 1, 2) == [("r0.png", 3), ("r1.png", 3), ("r2.png", 3)]


def test_more_reg_images_are_cut_where_the_count_is_reached():
    # 2 + 2 + 2 = 6 >= 5: r2 is kept whole (kohya overshoots), r3 is never seen.
    assert used_repeats(5, 2, 2, 2, 2) == [("r0.png", 2), ("r1.png", 2), ("r2.png", 2)]
    assert used_repeats(4, 2, 2, 2) == [("r0.png", 2), ("r1.png", 2)]  # exactly reached: r2 unused


def test_balancing_edge_cases_and_inputs_unchanged():
    assert used_repeats(0, 1, 1) == []
    assert balance_reg_records(7, []) == []
    records = reg_records(1, 1)
    balance_reg_records(6, records)
    assert [r.num_repeats for r in records] == [1, 1]


# ---- the loss weights ----

def test_prior_loss_weights_and_weighted_mean():
    is_reg = torch.tensor([False, True, True, False])
    weights = losses.prior_loss_weights(is_reg, 0.25)
    assert weights.tolist() == [1.0, 0.25, 0.25, 1.0] and weights.dtype == torch.float32
    per_sample = torch.tensor([2.0, 4.0, 8.0, 1.0])
    # (2 + 1 + 2 + 1) / 4: a plain mean over samples, not divided by the sum of the weights (kohya).
    assert losses.weighted_mean(per_sample, weights).item() == pytest.approx(1.5)
    assert losses.prior_loss_weights(torch.tensor([True]), 0.0).tolist() == [0.0]


def test_step_loss_weights_reg_samples(tiny_model_dir, demo_data, tmp_path, monkeypatch):
    argv = train_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--prior_loss_weight", "0.5")
    run = Run(parse_args(argv), NetworkMethod)
    run.prepare()
    run.dataset.set_epoch(0)
    batch = dict(run.dataset[0], is_reg=torch.tensor([True, False]))
    seen = []
    original = losses.diffusion_loss

    def recording_loss(*args):  # keeps the per-sample losses for the hand computation
        seen.append(original(*args))
        return seen[-1]

    monkeypatch.setattr(losses, "diffusion_loss", recording_loss)
    with torch.no_grad():
        loss = run.step_loss(batch).item()
    per_sample = seen[0].tolist()
    assert loss == pytest.approx((0.5 * per_sample[0] + per_sample[1]) / 2, rel=1e-6)


# ---- the dataset ----

@pytest.fixture
def train_and_reg(tmp_path):
    """train/2_square: five 64x64 images (10 with repeats); reg/1_person: three, reg/x_skip: one (skipped)."""
    for i in range(5):
        write_image(str(tmp_path / "train" / "2_square" / f"s{i}.png"), (64, 64), value=10 * i)
    for i in range(3):
        write_image(str(tmp_path / "reg" / "1_person" / f"p{i}.png"), (64, 64), value=200 + i)
    write_image(str(tmp_path / "reg" / "x_skip" / "q.png"), (64, 64))
    return tmp_path


def test_dataset_balances_reg_images_and_mixes_batches(train_and_reg):
    cfg = make_cfg(train_and_reg / "train", reg_data_dir=str(train_and_reg / "reg"), enable_bucket=False)
    dataset = build_dataset(cfg)
    info = dataset.info
    assert info["num_train_images"] == 10 and info["num_reg_images"] == 3
    assert info["reg_dataset_dirs"] == {"1_person": {"n_repeats": 1, "img_count": 3}}
    assert info["dataset_dirs"] == {"2_square": {"n_repeats": 2, "img_count": 5}}
    assert len(dataset) == 5  # (10 train + 10 reg) / batch 4
    batches = [dataset[i] for i in range(len(dataset))]
    seen = Counter(p.rsplit("/", 1)[-1] for b in batches for p, reg in zip(b["image_paths"], b["is_reg"]) if reg)
    assert seen == {"p0.png": 4, "p1.png": 3, "p2.png": 3}  # 3 on the first pass, 7 more: +3, +2, +2
    for b in batches:
        assert b["is_reg"].tolist() == ["/reg/" in p for p in b["image_paths"]]
    assert any(0 < int(b["is_reg"].sum()) < len(b["is_reg"]) for b in batches)  # one bucket: mixed batches


def test_more_reg_than_train_warns_and_leaves_some_out(train_and_reg, caplog):
    (train_and_reg / "reg" / "1_person").rename(train_and_reg / "reg" / "5_person")
    cfg = make_cfg(train_and_reg / "train", reg_data_dir=str(train_and_reg / "reg"), enable_bucket=False)
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(cfg)
    assert "15 regularization images (repeats included) for 10 train images" in caplog.text
    assert dataset.info["num_reg_images"] == 15  # kohya's ss_num_reg_images: before balancing
    assert [(r.path.rsplit("/", 1)[-1], r.num_repeats) for r in dataset.records if r.is_reg] == [
        ("p0.png", 5), ("p1.png", 5)]
    assert len(dataset) == 5


def test_empty_reg_folder_warns_and_trains_without(train_and_reg, caplog):
    empty = train_and_reg / "empty_reg"
    empty.mkdir()
    cfg = make_cfg(train_and_reg / "train", reg_data_dir=str(empty), enable_bucket=False)
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(cfg)
    assert "no regularization images found in" in caplog.text
    assert dataset.info["num_reg_images"] == 0 and len(dataset) == 3  # 10 train / 4


def test_missing_reg_data_dir_is_one_line_error(demo_data, tiny_model_dir, tmp_path):
    missing = str(tmp_path / "no_such_reg")
    with pytest.raises(UserError) as info:
        build_dataset(make_cfg(demo_data, reg_data_dir=missing))
    assert str(info.value).startswith(f"--reg_data_dir {missing}: folder not found") and "\n" not in str(info.value)
    out = tmp_path / "out"
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(out), "--reg_data_dir", missing)) == 2
    assert files_under(out) == []


def test_e2e_reg_run_writes_kohya_metadata(tiny_model_dir, demo_data, tmp_path):
    for i in range(2):
        write_image(str(tmp_path / "reg" / "1_person" / f"p{i}.png"), (64, 64), value=50 * i)
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--reg_data_dir", str(tmp_path / "reg"),
                      "--prior_loss_weight", "0.5")
    assert train_network.main(argv) == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    # 9 images x 10 repeats = 90 train; the 2 reg images get 45 repeats each; (90 + 90) / batch 2 = 90.
    assert meta["ss_num_train_images"] == "90" and meta["ss_num_reg_images"] == "2"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 2}}
    assert meta["ss_num_batches_per_epoch"] == "90"
    assert meta["ss_prior_loss_weight"] == "0.5"
