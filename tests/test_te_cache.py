"""--cache_text_encoder_outputs(_to_disk): each caption encoded once, batches carry the outputs, kohya's
`_te_outputs.npz` files reused, the options that change captions refused, and the same training losses."""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import pytest
import torch

import train_network
from library import caching
from library.config import parse_args
from library.dataset import build_dataset, loader
from library.errors import UserError
from library.methods import METHODS
from library.trainer import Run
from tests.conftest import files_under, train_argv
from tests.test_dataset import fake_encode, make_cfg, write_image, write_text


class Config(dict):
    """A diffusers-style config: a dict with attribute access."""

    __getattr__ = dict.__getitem__


def fake_encoder(hidden: int, projection: int | None = None) -> torch.nn.Module:
    encoder = torch.nn.Linear(2, 2)
    with torch.no_grad():  # the same weights in every instance: the file fingerprints them
        encoder.weight.copy_(torch.arange(4.0).reshape(2, 2) / hidden)
        encoder.bias.zero_()
    encoder.config = Config(hidden_size=hidden, **({} if projection is None else {"projection_dim": projection}))
    return encoder


class FakeFamily:
    """encode_conditioning with kohya's keys: a value per caption (from its characters), counted calls."""

    def __init__(self, name: str = "sdxl"):
        self.name = name
        self.text_encoders = [fake_encoder(8), fake_encoder(16, 4)] if name == "sdxl" else [fake_encoder(8)]
        self.calls: list[list[str]] = []

    def encode_conditioning(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls.append(list(captions))
        codes = torch.tensor([sum(map(ord, c)) % 101 + len(c) / 10 for c in captions])
        ramp = torch.arange(77.0)[None, :, None] / 77
        if self.name != "sdxl":
            return {"hidden_state": codes[:, None, None] + ramp + torch.zeros(1, 1, 8)}
        return {"hidden_state1": codes[:, None, None] + ramp + torch.zeros(1, 1, 8),
                "hidden_state2": -codes[:, None, None] - ramp + torch.zeros(1, 1, 16),
                "pool2": codes[:, None] * torch.ones(1, 4)}


@pytest.fixture
def data(tmp_path):
    """3_shape: four captioned images (two share a caption) and one without (class token "shape")."""
    root = tmp_path / "data"
    captions = ["red, square", "blue, circle", "red, square", "green, star"]
    for i, caption in enumerate(captions):
        write_image(str(root / "3_shape" / f"s{i}.png"), (64, 64), value=20 * i)
        write_text(str(root / "3_shape" / f"s{i}.caption"), caption)
    write_image(str(root / "3_shape" / "plain.png"), (64, 96), value=200)
    return root


def cache_cfg(root, **overrides) -> argparse.Namespace:
    values = dict(cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=False,
                  network_train_unet_only=True, vae_batch_size=1, max_token_length=None, clip_skip=None)
    values.update(overrides)
    cfg = make_cfg(root, train_batch_size=2, **values)
    caching.resolve_cache_options(cfg)
    return cfg


def cached_dataset(root, family, **overrides):
    cfg = cache_cfg(root, **overrides)
    dataset = build_dataset(cfg)
    caching.check_text_cache_options(cfg, dataset)
    caching.cache_text_encoder_outputs(dataset, family, cfg, "cpu")
    return dataset


def assert_batches_match_encoder(dataset, family) -> int:
    seen = 0
    for index in range(len(dataset)):
        batch = dataset[index]
        expected = FakeFamily(family.name).encode_conditioning(batch["captions"])
        assert batch["text_outputs"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(batch["text_outputs"][key], value), key
        seen += len(batch["captions"])
    return seen


def test_memory_cache_encodes_each_caption_once(data):
    family = FakeFamily()
    dataset = cached_dataset(data, family)
    # 4 distinct captions ("red, square" twice, "shape" for the uncaptioned image), batches of 2, sorted
    assert family.calls == [["blue, circle", "green, star"], ["red, square", "shape"]]
    assert assert_batches_match_encoder(dataset, family) == 15  # 5 images x 3 repeats


def test_disk_files_have_kohyas_names_and_keys(data):
    family = FakeFamily()
    dataset = cached_dataset(data, family, cache_text_encoder_outputs_to_disk=True)
    names = sorted(n for n in os.listdir(data / "3_shape") if n.endswith(".npz"))
    assert names == ["plain_te_outputs.npz", "s0_te_outputs.npz", "s1_te_outputs.npz", "s2_te_outputs.npz",
                     "s3_te_outputs.npz"]
    with np.load(data / "3_shape" / "s1_te_outputs.npz") as npz:
        assert sorted(npz.files) == ["hidden_state1", "hidden_state2", "pool2", "sdtune_fingerprint"]
        assert (npz["hidden_state1"].shape, npz["hidden_state2"].shape, npz["pool2"].shape) == ((77, 8), (77, 16), (4,))
        assert npz["hidden_state1"].dtype == np.float32
        # "blue, circle": character sum 1126 % 101 = 15, plus 12 characters / 10
        assert npz["pool2"].tolist() == pytest.approx([16.2] * 4)
        fingerprint = json.loads(str(npz["sdtune_fingerprint"]))
    assert fingerprint["caption"] == "blue, circle" and fingerprint["producer"]["family"] == "sdxl"
    assert fingerprint["producer"]["max_token_length"] == 75 and len(fingerprint["producer"]["encoders"]) == 2
    assert len(family.calls) == 2
    assert assert_batches_match_encoder(dataset, family) == 15


def test_sd1_files_hold_hidden_state(data):
    cached_dataset(data, FakeFamily("sd1"), cache_text_encoder_outputs_to_disk=True)
    with np.load(data / "3_shape" / "s0_te_outputs.npz") as npz:
        assert sorted(npz.files) == ["hidden_state", "sdtune_fingerprint"] and npz["hidden_state"].shape == (77, 8)


def test_second_run_reuses_files_without_encoding_or_decoding(data, monkeypatch):
    cached_dataset(data, FakeFamily(), cache_text_encoder_outputs_to_disk=True)
    mtimes = {n: os.stat(data / "3_shape" / n).st_mtime_ns for n in os.listdir(data / "3_shape") if n.endswith(".npz")}
    family = FakeFamily()
    dataset = cached_dataset(data, family, cache_text_encoder_outputs_to_disk=True)
    assert family.calls == [] and dataset.text_cache.counts["valid"] == 5
    dataset.cache_latents(fake_encode([]), batch_size=2)

    def no_decoding(*args, **kwargs):
        raise AssertionError("no image is decoded with both caches on")

    monkeypatch.setattr(loader, "load_pixels", no_decoding)
    assert assert_batches_match_encoder(dataset, family) == 15
    assert mtimes == {n: os.stat(data / "3_shape" / n).st_mtime_ns for n in mtimes}


def test_changed_caption_and_wrong_shapes_are_encoded_again(data):
    cached_dataset(data, FakeFamily(), cache_text_encoder_outputs_to_disk=True)
    write_text(str(data / "3_shape" / "s3.caption"), "green, moon")
    with np.load(data / "3_shape" / "s1_te_outputs.npz") as npz:
        arrays = dict(npz)
    arrays["hidden_state2"] = arrays["hidden_state2"][:, :8]  # another model's width
    np.savez(data / "3_shape" / "s1_te_outputs.npz", **arrays)
    family = FakeFamily()
    dataset = cached_dataset(data, family, cache_text_encoder_outputs_to_disk=True)
    assert family.calls == [["blue, circle", "green, moon"]] and dataset.text_cache.counts["stale"] == 2
    assert assert_batches_match_encoder(dataset, family) == 15


def test_kohya_file_without_fingerprint_is_reused(data, caplog):
    cached_dataset(data, FakeFamily(), cache_text_encoder_outputs_to_disk=True)
    with np.load(data / "3_shape" / "s0_te_outputs.npz") as npz:
        kohya = {k: npz[k] for k in ("hidden_state1", "hidden_state2", "pool2")}
    np.savez(data / "3_shape" / "s0_te_outputs.npz", **kohya)  # what kohya writes: the three arrays only
    family = FakeFamily()
    with caplog.at_level(logging.WARNING):
        dataset = cached_dataset(data, family, cache_text_encoder_outputs_to_disk=True)
    assert family.calls == [] and dataset.text_cache.counts["foreign"] == 1
    assert "reusing 1 text-encoder cache files written without an sdtune fingerprint" in caplog.text


def test_another_encoder_makes_every_file_stale(data):
    cached_dataset(data, FakeFamily(), cache_text_encoder_outputs_to_disk=True)
    family = FakeFamily()
    with torch.no_grad():
        family.text_encoders[1].bias.fill_(0.5)  # a fine-tuned text encoder 2, same config
    dataset = cached_dataset(data, family, cache_text_encoder_outputs_to_disk=True)
    assert len(family.calls) == 2 and dataset.text_cache.counts["stale"] == 5


def two_dataset_config(tmp_path, data) -> argparse.Namespace:
    """The same folder in two datasets, the second with a caption prefix."""
    path = tmp_path / "ds.toml"
    subset = f'[[datasets.subsets]]\nimage_dir = "{data / "3_shape"}"\ncaption_extension = ".caption"\n'
    path.write_text("[[datasets]]\nresolution = 64\nbatch_size = 2\n" + subset
                    + "[[datasets]]\nresolution = 64\nbatch_size = 1\n" + subset + 'caption_prefix = "photo of"\n')
    cfg = parse_args(["--dataset_config", str(path), "--seed", "3", "--cache_text_encoder_outputs", UNET_ONLY])
    caching.resolve_cache_options(cfg)
    return cfg


def test_dataset_group_batches_carry_outputs(tmp_path, data):
    cfg = two_dataset_config(tmp_path, data)
    group = build_dataset(cfg)
    caching.check_text_cache_options(cfg, group)
    family = FakeFamily()
    caching.cache_text_encoder_outputs(group, family, cfg, "cpu")
    assert sum(len(c) for c in family.calls) == 8  # 4 captions, and the same 4 with the prefix
    assert "photo of red, square" in family.calls[-1] or "photo of red, square" in family.calls[-2]
    assert assert_batches_match_encoder(group, family) == 10  # 5 images, once in each dataset
    cfg.cache_text_encoder_outputs_to_disk = True  # one file per image cannot hold two captions
    with pytest.raises(UserError, match=r"plain.png trains with two captions \('' and 'photo of '\) in different datasets"):
        caching.cache_text_encoder_outputs(group, FakeFamily(), cfg, "cpu")


def test_to_disk_turns_the_cache_on():
    cfg = argparse.Namespace(cache_text_encoder_outputs=False, cache_text_encoder_outputs_to_disk=True)
    caching.resolve_cache_options(cfg)
    assert cfg.cache_text_encoder_outputs is True


# --- refusals, through train_network.main ---------------------------------------------------------

UNET_ONLY = "--network_train_unet_only"
REFUSALS = [
    ([], "--cache_text_encoder_outputs needs --network_train_unet_only"),
    ([UNET_ONLY, "--shuffle_caption"], "needs captions that never change, but --shuffle_caption is on"),
    ([UNET_ONLY, "--caption_dropout_rate", "0.1"], "--caption_dropout_rate is on"),
    ([UNET_ONLY, "--caption_dropout_every_n_epochs", "2"], "--caption_dropout_every_n_epochs is on"),
    ([UNET_ONLY, "--caption_tag_dropout_rate", "0.1"], "--caption_tag_dropout_rate is on"),
    ([UNET_ONLY, "--token_warmup_step", "2"], "--token_warmup_step is on"),
    ([UNET_ONLY, "--enable_wildcard"], "--enable_wildcard is on"),
]


@pytest.mark.parametrize("extra, expected", REFUSALS)
def test_incompatible_options_are_one_line(extra, expected, tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, str(data), str(out), "--cache_text_encoder_outputs_to_disk", *extra)
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert files_under(out) == [] and not [n for n in os.listdir(data / "3_shape") if n.endswith(".npz")]


def test_subset_option_and_multiline_caption_are_refused(tiny_model_dir, data, tmp_path, capsys):
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{data / "3_shape"}"\n'
                      'caption_extension = ".caption"\nshuffle_caption = true\n')
    base = train_argv(tiny_model_dir, str(data), str(tmp_path / "out"), "--cache_text_encoder_outputs", UNET_ONLY)
    at = base.index("--train_data_dir")
    assert train_network.main(base[:at] + base[at + 2:] + ["--dataset_config", str(config)]) == 2
    assert f"--shuffle_caption is on for {data / '3_shape'}: turn one of them off" in capsys.readouterr().err
    write_text(str(data / "3_shape" / "s2.caption"), "red, square\nred, box")
    assert train_network.main(base) == 2
    err = capsys.readouterr().err
    assert f"the caption file of {data / '3_shape' / 's2.png'} has 2 lines" in err


# --- training ---------------------------------------------------------------------------------------

def test_cached_outputs_train_the_same_losses(tiny_model_dir, demo_data, tmp_path):
    losses = []
    for extra in ([], ["--cache_text_encoder_outputs"]):
        argv = train_argv(tiny_model_dir, demo_data, str(tmp_path / f"out{len(losses)}"), UNET_ONLY,
                          "--max_train_steps", "6", *extra)
        run = Run(parse_args(argv), METHODS["network"])
        losses.append(run.train())
        if extra:
            assert run.dataset.text_cache is not None and len(run.dataset.text_cache) == 9
    assert len(losses[0]) == 6
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
