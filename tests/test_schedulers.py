"""Learning-rate schedules: the rate at known steps against hand-computed values (peak rate 1, so the
values are the schedule's factors), step options as ints or ratios, and one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from library import optim, schedulers
from library.config import default_config, parse_args
from library.errors import UserError
from library.options import options_for


def _cfg(**kw):
    cfg = default_config()
    cfg.learning_rate = 1.0
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def _lrs(cfg, total: int, steps: int | None = None) -> list[float]:
    """The rate of each step 0 .. steps-1, as the trainer logs it (read before the scheduler steps)."""
    opt = optim.build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": cfg.learning_rate}])
    sched = optim.build_scheduler(cfg, opt, total)
    values = []
    for _ in range(steps or total):
        values.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return values


C4 = math.cos(math.pi / 4)


@pytest.mark.parametrize("kw, total, expected", [
    (dict(lr_scheduler="constant"), 3, [1, 1, 1]),
    (dict(lr_scheduler="constant_with_warmup", lr_warmup_steps=2), 4, [0, 0.5, 1, 1]),
    (dict(lr_scheduler="linear"), 4, [1, 0.75, 0.5, 0.25]),
    (dict(lr_scheduler="linear", lr_warmup_steps=2), 6, [0, 0.5, 1, 0.75, 0.5, 0.25]),
    (dict(lr_scheduler="cosine"), 4, [1, (1 + C4) / 2, 0.5, (1 - C4) / 2]),
    # hard restarts, as kohya: two cycles over 4 steps restart at step 2
    (dict(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2), 4, [1, 0.5, 1, 0.5]),
    # (1 - 1e-7) x (1 - t/4)^2 + 1e-7: transformers ends polynomial decay at 1e-7
    (dict(lr_scheduler="polynomial", lr_scheduler_power=2.0), 4, [1, 0.5625, 0.25, 0.0625]),
    # warmup 2 is also the timescale: 1 / sqrt(step / 2) after it
    (dict(lr_scheduler="inverse_sqrt", lr_warmup_steps=2), 9, [0, 0.5, 1, 1 / math.sqrt(1.5), 1 / math.sqrt(2),
                                                               1 / math.sqrt(2.5), 1 / math.sqrt(3),
                                                               1 / math.sqrt(3.5), 0.5]),
    # no warmup, timescale 4: 1 / sqrt((step + 4) / 4)
    (dict(lr_scheduler="inverse_sqrt", lr_scheduler_timescale=4), 6, [1, 1 / math.sqrt(1.25), 1 / math.sqrt(1.5),
                                                                       1 / math.sqrt(1.75), 1 / math.sqrt(2),
                                                                       2 / 3]),
    # 0.1 + 0.9 x (1 + cos(pi t / 4)) / 2
    (dict(lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.1), 4,
     [1, 0.1 + 0.9 * (1 + C4) / 2, 0.55, 0.1 + 0.9 * (1 - C4) / 2]),
    # warmup 2, stable 4, cosine decay over 4 steps down to 0
    (dict(lr_scheduler="warmup_stable_decay", lr_warmup_steps=2, lr_decay_steps=4), 10,
     [0, 0.5, 1, 1, 1, 1, 1, (1 + C4) / 2, 0.5, (1 - C4) / 2]),
    # the same with the steps as ratios of the run, and a floor of 0.2 (the warmup starts there too)
    (dict(lr_scheduler="warmup_stable_decay", lr_warmup_steps=0.2, lr_decay_steps=0.4, lr_scheduler_min_lr_ratio=0.2),
     10, [0.2, 0.6, 1, 1, 1, 1, 1, 0.2 + 0.8 * (1 + C4) / 2, 0.6, 0.2 + 0.8 * (1 - C4) / 2]),
    (dict(lr_scheduler="piecewise_constant", lr_scheduler_args=["step_rules=1:2,0.1:4,0.01"]), 5, [1, 1, 0.1, 0.1, 0.01]),
    # REX: (1 - p) / (1 - 0.9 p), p = step / 5
    (dict(lr_scheduler="rex"), 5, [1, 0.8 / 0.82, 0.6 / 0.64, 0.4 / 0.46, 0.2 / 0.28]),
    (dict(lr_scheduler="REX", lr_warmup_steps=2, lr_scheduler_min_lr_ratio=0.1), 12,
     [0, 0.5, 1, 0.1 + 0.9 * 0.9 / 0.91, 0.1 + 0.9 * 0.8 / 0.82]),
    # custom classes with their own arguments
    (dict(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2", "gamma=0.5"]), 5, [1, 1, 0.5, 0.5, 0.25]),
    (dict(lr_scheduler_type="torch.optim.lr_scheduler.ExponentialLR", lr_scheduler_args=["gamma=0.5"]), 3,
     [1, 0.5, 0.25]),
    # schedule-free optimizers run at their rate whatever the schedule (as kohya)
    (dict(optimizer_type="AdamWScheduleFree", lr_scheduler="cosine"), 3, [1, 1, 1]),
])
def test_rates_at_known_steps(kw, total, expected):
    steps = len(expected)
    assert _lrs(_cfg(**kw), total, steps) == pytest.approx(expected, abs=1e-6)


def test_rex_factor_by_hand():
    assert schedulers.rex_factor(0, 0, 10) == 1.0
    assert schedulers.rex_factor(5, 0, 10) == pytest.approx(0.5 / 0.55)  # 0.90909: higher than linear's 0.5
    assert schedulers.rex_factor(9, 0, 10) == pytest.approx(0.1 / 0.19)
    assert schedulers.rex_factor(10, 0, 10) == 0.0 and schedulers.rex_factor(12, 0, 10) == 0.0
    assert schedulers.rex_factor(10, 0, 10, min_lr_ratio=0.25) == 0.25
    assert schedulers.rex_factor(1, 4, 10) == 0.25  # linear warmup


def test_rex_state_round_trips():
    cfg = _cfg(lr_scheduler="rex", lr_scheduler_min_lr_ratio=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = optim.build_optimizer(cfg, [{"params": [param], "lr": 1.0}])
    sched = optim.build_scheduler(cfg, opt, 10)
    for _ in range(4):
        opt.step()
        sched.step()
    again = optim.build_scheduler(cfg, opt, 10)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == 4 and again.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("value, total, steps", [(7, 100, 7), (0.1, 100, 10), (0.05, 30, 2), (0, 30, 0), (0.999, 3, 3)])
def test_step_options_as_counts_or_ratios(value, total, steps):
    assert schedulers.steps_of(value, total) == steps  # ratios round up: ceil(0.05 x 30) = 2
    assert schedulers.warmup_steps(_cfg(lr_warmup_steps=value), total) == steps


def test_percent_and_ratio_reach_the_plan():
    cfg = parse_args(["--lr_warmup_steps", "10%", "--lr_decay_steps", "0.25", "--lr_scheduler", "warmup_stable_decay"])
    plan = schedulers.Plan.from_cfg(cfg, 40)
    assert (plan.warmup, plan.decay, plan.stable) == (4, 10, 26)


@pytest.mark.parametrize("kw, message", [
    (dict(lr_scheduler="constant", lr_warmup_steps=3),
     "--lr_warmup_steps has no effect with --lr_scheduler constant: use constant_with_warmup"),
    (dict(lr_scheduler="piecewise_constant", lr_warmup_steps=3, lr_scheduler_args=["step_rules=1"]),
     "--lr_warmup_steps has no effect with --lr_scheduler piecewise_constant: set it to 0"),
    (dict(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2"], lr_warmup_steps=1),
     "--lr_warmup_steps has no effect with --lr_scheduler_type StepLR"),
    (dict(lr_scheduler="warmup_stable_decay", lr_warmup_steps=6, lr_decay_steps=5),
     "--lr_warmup_steps (6) + --lr_decay_steps (5) exceed the 10 training steps"),
    (dict(lr_scheduler="rex", lr_scheduler_min_lr_ratio=1.5), "--lr_scheduler_min_lr_ratio 1.5: must be between 0 and 1"),
    (dict(lr_scheduler="cosine_with_min_lr"), "--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio"),
    (dict(lr_scheduler="nope"), "--lr_scheduler nope: unknown schedule; use one of constant, constant_with_warmup,"),
    (dict(lr_scheduler="cosine", lr_scheduler_args=["num_training_steps=5"]),
     "--lr_scheduler_args num_training_steps: cosine takes it from --max_train_steps"),
    (dict(lr_scheduler="cosine", lr_scheduler_args=["cycles=2"]),
     "--lr_scheduler_args: cosine takes no 'cycles'; valid keys: num_cycles"),
    (dict(lr_scheduler="adafactor"), "--lr_scheduler adafactor works with --optimizer_type Adafactor only"),
    (dict(lr_scheduler_type="NoSuchLR"), "--lr_scheduler_type NoSuchLR: torch.optim.lr_scheduler has no such class"),
    (dict(lr_scheduler_type="StepLR", lr_scheduler_args=["stepsize=2"]),
     "--lr_scheduler_args: StepLR takes no 'stepsize'; valid keys: gamma, last_epoch, step_size"),
    (dict(lr_scheduler="polynomial", lr_scheduler_args=["lr_end=2.0"]), "--lr_scheduler polynomial: lr_end (2.0) must be"),
])
def test_schedule_errors(kw, message):
    with pytest.raises(UserError) as info:
        _lrs(_cfg(**kw), 10, 1)
    assert str(info.value).startswith(message), str(info.value)


def test_option_row_lists_every_schedule():
    assert options_for("train_network")["lr_scheduler"].supported == tuple(schedulers.SCHEDULERS)


# --- tools/plot_lr_schedule.py ----------------------------------------------------------------------

def test_plot_lr_schedule_draws_the_schedule(tmp_path, capsys):
    from PIL import Image

    from tools import plot_lr_schedule

    config = tmp_path / "my_lora.toml"
    config.write_text('[optimizer]\nlearning_rate = 1e-3\nunet_lr = 2e-3\nlr_scheduler = "rex"\n'
                      'lr_scheduler_min_lr_ratio = 0.1\n[training]\nmax_train_steps = 9\n')
    out = tmp_path / "lr.png"
    assert plot_lr_schedule.main([str(config), "--out", str(out)]) == 0
    expected = [0.1 + 0.9 * schedulers.rex_factor(step, 0, 9) for step in range(9)]
    values = plot_lr_schedule.plot(str(config), str(tmp_path / "again.png"))
    assert values["unet"] == pytest.approx([2e-3 * f for f in expected], rel=1e-12)
    assert values["textencoder"] == pytest.approx([1e-3 * f for f in expected], rel=1e-12)
    assert Image.open(out).size == plot_lr_schedule.SIZE
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["step", "1", "3", "5", "7", "9"]
    assert printed[2].split() == ["unet", *[f"{values['unet'][s - 1]:.4g}" for s in (1, 3, 5, 7, 9)]]


def test_plot_lr_schedule_needs_steps_for_an_epoch_config(tmp_path, capsys):
    from tools import plot_lr_schedule

    config = tmp_path / "epochs.toml"
    config.write_text("max_train_epochs = 10\n")
    assert plot_lr_schedule.main([str(config)]) == 2
    assert "sets max_train_epochs = 10: the step count depends on the data set; give --steps N" in capsys.readouterr().err
    assert plot_lr_schedule.main([str(config), "--steps", "3", "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()


def test_plot_lr_schedule_counts_the_steps_of_an_epoch_config(demo_data, tmp_path):
    from tools import plot_lr_schedule

    config = tmp_path / "epochs.toml"
    # 9 images x 10 repeats at batch 8: 12 batches per epoch (as test_train_e2e counts them)
    config.write_text(f'train_data_dir = "{demo_data}"\nresolution = 64\ntrain_batch_size = 8\nmax_train_epochs = 2\n'
                      'lr_scheduler = "linear"\nlearning_rate = 1.0\n')
    values = plot_lr_schedule.plot(str(config), str(tmp_path / "x.png"))
    assert values["unet"] == pytest.approx([1 - step / 24 for step in range(24)])
