"""The rules of thumb: each rule warns on the setup the guides warn about, and stays quiet otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from library.advice import Bucket, RunFacts, buckets_of, rule_of_thumb_warnings
from library.config import parse_args

NETWORK = ["--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8"]
BUCKETS = (Bucket((64, 64), 12, 2), Bucket((48, 80), 4, 2))


def _warnings(argv, group_lrs=None, buckets=BUCKETS, family="sd1"):
    cfg = parse_args([*NETWORK, *argv])
    return rule_of_thumb_warnings(cfg, RunFacts(group_lrs or {"unet": cfg.learning_rate}, buckets, family))


def test_a_plain_run_gets_no_warning():
    assert _warnings(["--learning_rate", "1e-4", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.05"]) == []
    assert _warnings(["--optimizer_type", "Prodigy", "--learning_rate", "1"], {"textencoder": 1.0, "unet": 1.0}) == []


def test_adaptive_optimizer_wants_rates_near_1_and_equal():
    (line,) = _warnings(["--optimizer_type", "prodigy", "--learning_rate", "1e-4"], {"unet": 1e-4})
    assert line.startswith("Prodigy picks its own step size and expects learning rates of about 1 (unet 0.0001)")
    # (Prodigy and most D-Adaptation optimizers refuse different rates outright: library.optim)
    lines = _warnings(["--optimizer_type", "DAdaptAdan", "--learning_rate", "1"], {"textencoder": 0.5, "unet": 1.0})
    assert lines == ["DAdaptAdan with different learning rates per group (textencoder 0.5, unet 1): it estimates one "
                     "step size for all of them, and the guides use the same rate (1) for the text encoder and the U-Net"]
    # Adafactor's relative step has no rate at all: nothing to say
    assert _warnings(["--optimizer_type", "Adafactor"], {"unet": None}) == []


@pytest.mark.parametrize("argv, expected", [
    (["--network_alpha", "16"], ["--network_alpha 16 is above --network_dim 8: updates are scaled by 2"]),
    (["--network_args", "conv_dim=4", "conv_alpha=8"], ["--conv_alpha 8 is above --conv_dim 4: updates are scaled by 2"]),
    (["--network_alpha", "8"], []),
])
def test_alpha_above_dim(argv, expected):
    lines = _warnings(argv)
    assert len(lines) == len(expected) and all(line.startswith(e) for line, e in zip(lines, expected)), lines


def test_warmup_with_rex_or_an_adaptive_optimizer():
    assert _warnings(["--lr_scheduler", "rex", "--lr_warmup_steps", "10"]) == [
        "--lr_scheduler rex with a warmup: REX is meant to start at the peak rate; set --lr_warmup_steps 0"]
    (line,) = _warnings(["--optimizer_type", "Prodigy", "--learning_rate", "1", "--lr_scheduler", "cosine",
                         "--lr_warmup_steps", "0.1"], {"unet": 1.0})
    assert line.endswith("pass safeguard_warmup=True in --optimizer_args")
    assert _warnings(["--optimizer_type", "Prodigy", "--learning_rate", "1", "--lr_scheduler", "cosine",
                      "--lr_warmup_steps", "0.1", "--optimizer_args", "safeguard_warmup=True"], {"unet": 1.0}) == []


def test_schedule_free_ignores_the_schedule():
    assert _warnings(["--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine", "--lr_warmup_steps", "5"]) == [
        "AdamWScheduleFree runs without a schedule, so --lr_scheduler cosine and --lr_warmup_steps 5 are ignored; "
        "its own warmup is the warmup_steps optimizer argument"]


def test_buckets_smaller_than_batch_times_accumulation():
    assert _warnings(["--train_batch_size", "2", "--gradient_accumulation_steps", "2"]) == []  # 4 <= 4
    (line,) = _warnings(["--train_batch_size", "2", "--gradient_accumulation_steps", "4"])
    assert line.startswith("1 bucket(s) hold fewer images (repeats included) than the batch x accumulation of 8: "
                           "48x80 (4); those images train in smaller batches")


def test_buckets_of_a_dataset_and_of_a_group():
    one = SimpleNamespace(batch_size=2, bucket_counts=lambda: {(64, 64): 12, (48, 80): 4})
    other = SimpleNamespace(batch_size=4, bucket_counts=lambda: {(64, 64): 3})
    assert buckets_of(one) == BUCKETS
    assert buckets_of(SimpleNamespace(datasets=[one, other])) == (*BUCKETS, Bucket((64, 64), 3, 4))


def test_fp16_nan_prone_setups():
    fp16 = ["--mixed_precision", "fp16"]
    (line,) = _warnings(fp16, family="sdxl")
    assert line.startswith("SDXL's VAE overflows in fp16 (NaN latents, black samples): add --no_half_vae")
    assert _warnings([*fp16, "--no_half_vae"], family="sdxl") == []
    assert _warnings(fp16, family="sd1") == []
    assert _warnings(["--mixed_precision", "bf16"], family="sdxl") == []
    cfg = parse_args([*NETWORK, *fp16])
    cfg.full_fp16 = True  # set directly: the option row may still be refused while the feature is built
    assert rule_of_thumb_warnings(cfg, RunFacts({"unet": 1e-4}, BUCKETS, "sd1")) == [
        "--full_fp16 keeps gradients in fp16, where the loss turns NaN easily: prefer --mixed_precision bf16 "
        "--full_bf16 on GPUs that have bf16"]


def test_decay_steps_outside_warmup_stable_decay():
    assert _warnings(["--lr_scheduler", "cosine", "--lr_decay_steps", "10"]) == [
        "--lr_decay_steps is read by --lr_scheduler warmup_stable_decay only; cosine ignores it"]


def test_the_trainer_hook_logs_each_warning_once(caplog):
    import logging

    import torch

    from library import optim
    from library.trainer import Run

    cfg = parse_args([*NETWORK, "--lr_scheduler", "rex", "--lr_warmup_steps", "3", "--network_alpha", "16"])
    dataset = SimpleNamespace(batch_size=2, bucket_counts=lambda: {(64, 64): 12})
    run = SimpleNamespace(cfg=cfg, accelerator=SimpleNamespace(is_main_process=True), group_names=["unet"],
                          optimizer=optim.build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))]),
                          dataset=dataset, family=SimpleNamespace(name="sd1"))
    with caplog.at_level(logging.WARNING, logger="library.trainer"):
        Run._warn_rules_of_thumb(run)
    assert [r.getMessage()[:30] for r in caplog.records] == ["--network_alpha 16 is above --", "--lr_scheduler rex with a warm"]
    caplog.clear()
    run.accelerator.is_main_process = False  # other processes stay quiet
    Run._warn_rules_of_thumb(run)
    assert caplog.records == []
