"""Learning-rate schedules: kohya's names as a table of `name -> function path, arguments`.

transformers implements kohya's schedules (kohya calls the same functions), diffusers the piecewise one;
REX (OneTrainer's reverse-exponential decay) is ours. `--lr_scheduler_type module.Class` builds any other
scheduler from `--lr_scheduler_args`. Step counts given as a ratio (0.1 or 10%) become ceil(ratio x total).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from library.errors import UserError
from library.optim import check_keys, is_schedule_free, parse_kv_args

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleRow:
    path: str  # "module:function", called as function(optimizer, **kwargs)
    args: tuple = ()  # (keyword of the function, field of Plan) pairs

    @property
    def takes_warmup(self) -> bool:
        return any(field == "warmup" for _, field in self.args)


_TF = "transformers.optimization"
_WARMUP = (("num_warmup_steps", "warmup"),)
_WARMUP_TOTAL = _WARMUP + (("num_training_steps", "total"),)

SCHEDULERS: dict[str, ScheduleRow] = {
    "constant": ScheduleRow(f"{_TF}:get_constant_schedule"),
    "constant_with_warmup": ScheduleRow(f"{_TF}:get_constant_schedule_with_warmup", _WARMUP),
    "linear": ScheduleRow(f"{_TF}:get_linear_schedule_with_warmup", _WARMUP_TOTAL),
    "cosine": ScheduleRow(f"{_TF}:get_cosine_schedule_with_warmup", _WARMUP_TOTAL),
    "cosine_with_restarts": ScheduleRow(f"{_TF}:get_cosine_with_hard_restarts_schedule_with_warmup",
                                        _WARMUP_TOTAL + (("num_cycles", "num_cycles"),)),
    "polynomial": ScheduleRow(f"{_TF}:get_polynomial_decay_schedule_with_warmup",
                              _WARMUP_TOTAL + (("power", "power"),)),
    "inverse_sqrt": ScheduleRow(f"{_TF}:get_inverse_sqrt_schedule", _WARMUP + (("timescale", "timescale"),)),
    # kohya passes half the cycles: one cycle (the default) is a half cosine, as plain cosine
    "cosine_with_min_lr": ScheduleRow(f"{_TF}:get_cosine_with_min_lr_schedule_with_warmup",
                                      _WARMUP_TOTAL + (("num_cycles", "half_cycles"), ("min_lr_rate", "min_lr_ratio"))),
    "warmup_stable_decay": ScheduleRow(f"{_TF}:get_wsd_schedule", _WARMUP + (
        ("num_stable_steps", "stable"), ("num_decay_steps", "decay"), ("num_cycles", "half_cycles"),
        ("min_lr_ratio", "min_lr_ratio"))),
    "piecewise_constant": ScheduleRow("diffusers.optimization:get_piecewise_constant_schedule"),  # step_rules=...
    "rex": ScheduleRow("library.schedulers:get_rex_schedule", _WARMUP_TOTAL + (("min_lr_ratio", "min_lr_ratio"),)),
    "adafactor": ScheduleRow(f"{_TF}:AdafactorSchedule", (("initial_lr", "initial_lr"),)),
}

# The option each Plan field comes from, for "set it with --x" messages.
FIELD_OPTIONS = {"warmup": "lr_warmup_steps", "total": "max_train_steps", "decay": "lr_decay_steps",
                 "stable": "max_train_steps, --lr_warmup_steps and --lr_decay_steps",
                 "num_cycles": "lr_scheduler_num_cycles", "half_cycles": "lr_scheduler_num_cycles",
                 "power": "lr_scheduler_power", "timescale": "lr_scheduler_timescale",
                 "min_lr_ratio": "lr_scheduler_min_lr_ratio", "initial_lr": "learning_rate"}


def steps_of(value, total_steps: int) -> int:
    """An int_or_float option as steps: an integer count, or a ratio below 1 of the run (rounded up, so a
    ratio never rounds a warmup away; kohya rounds down)."""
    value = value or 0
    if isinstance(value, float) and value < 1:
        return int(math.ceil(value * total_steps))
    return int(value)


def warmup_steps(cfg, total_steps: int) -> int:
    """`--lr_warmup_steps` as a step count."""
    return steps_of(cfg.lr_warmup_steps, total_steps)


@dataclass(frozen=True)
class Plan:
    """The numbers a schedule is built from, resolved from the options and the run's length."""

    total: int
    warmup: int
    decay: int
    num_cycles: int
    power: float
    timescale: int | None
    min_lr_ratio: float | None
    initial_lr: float

    @classmethod
    def from_cfg(cls, cfg, total_steps: int) -> "Plan":
        return cls(total_steps, warmup_steps(cfg, total_steps), steps_of(cfg.lr_decay_steps, total_steps),
                   cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power, cfg.lr_scheduler_timescale,
                   cfg.lr_scheduler_min_lr_ratio, cfg.learning_rate)

    @property
    def stable(self) -> int:
        return self.total - self.warmup - self.decay

    @property
    def half_cycles(self) -> float:
        return self.num_cycles / 2


# --- REX --------------------------------------------------------------------------------------------

def rex_factor(step: int, warmup: int, total: int, min_lr_ratio: float | None = 0.0) -> float:
    """REX (reverse exponential, arXiv 2107.04197, OneTrainer's REX): the share of the peak rate at `step`.

    A linear warmup from 0, then r(p) = (1 - p) / (1 - 0.9 p) for the progress p in [0, 1] over the
    remaining steps: it stays high longer than linear decay and drops to 0 at the end. With a minimum
    ratio m the rate is m + (1 - m) r(p), so it ends at m x the peak.
    """
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr_ratio or 0.0
    return floor + (1 - floor) * (1 - progress) / (1 - 0.9 * progress)


def get_rex_schedule(optimizer, num_warmup_steps: int, num_training_steps: int, min_lr_ratio: float | None = 0.0,
                     last_epoch: int = -1) -> LambdaLR:
    """REX as a LambdaLR (a partial, so the scheduler's state_dict saves and loads)."""
    factor = functools.partial(rex_factor, warmup=num_warmup_steps, total=num_training_steps, min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, factor, last_epoch)


# --- building -------------------------------------------------------------------------------------

def _import(path: str, flag: str):
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ImportError:
        raise UserError(f"{flag} needs the '{module_name}' package: pip install {module_name.split('.')[0]}") from None
    except AttributeError:
        raise UserError(f"{flag}: {module_name} has no '{attr}'") from None


def scheduler_name(cfg) -> str:
    name = (cfg.lr_scheduler or "constant").lower()
    if name not in SCHEDULERS:
        raise UserError(f"--lr_scheduler {cfg.lr_scheduler}: unknown schedule; use one of {', '.join(SCHEDULERS)}, "
                        "or --lr_scheduler_type module.Class")
    return name


def custom_class(cfg):
    """`--lr_scheduler_type`: a torch.optim.lr_scheduler name (any case) or a `module.Class` path."""
    name = cfg.lr_scheduler_type
    flag = f"--lr_scheduler_type {name}"
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        return _import(f"{module_name}:{attr}", flag)
    module = torch.optim.lr_scheduler
    found = [n for n in dir(module) if n.lower() == name.lower() and inspect.isclass(getattr(module, n))]
    if not found:
        raise UserError(f"{flag}: torch.optim.lr_scheduler has no such class; give module.Class for another package")
    return getattr(module, found[0])


def _check_ratio(cfg) -> None:
    ratio = cfg.lr_scheduler_min_lr_ratio
    if ratio is not None and not 0 <= ratio <= 1:
        raise UserError(f"--lr_scheduler_min_lr_ratio {ratio}: must be between 0 and 1")


def validate(cfg) -> None:
    """The checks that need no optimizer and no step count: names, argument keys, ranges."""
    _check_ratio(cfg)
    extra = parse_kv_args(cfg.lr_scheduler_args, "lr_scheduler_args")
    if cfg.lr_scheduler_type:
        check_keys(extra, custom_class(cfg), "lr_scheduler_args", cfg.lr_scheduler_type, strict=False,
                   exclude=("self", "optimizer"))
        return
    row = SCHEDULERS[scheduler_name(cfg)]
    _check_row_args(row, _import(row.path, f"--lr_scheduler {cfg.lr_scheduler}"), extra, cfg.lr_scheduler)


def _check_row_args(row: ScheduleRow, func, extra: dict, name: str) -> None:
    """--lr_scheduler_args may add keywords the function takes, but not those the options set."""
    for keyword, field in row.args:
        if keyword in extra:
            raise UserError(f"--lr_scheduler_args {keyword}: {name} takes it from --{FIELD_OPTIONS[field]}")
    check_keys(extra, func, "lr_scheduler_args", name, strict=True, exclude=("self", "optimizer", "last_epoch"))


def _relative_step_adafactor(optimizer) -> bool:
    """kohya: Adafactor with relative_step=True computes its own rate, so the `adafactor` schedule is used."""
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def _effective_name(cfg, optimizer) -> str:
    name = scheduler_name(cfg)
    if _relative_step_adafactor(optimizer):
        if name != "adafactor":
            logger.info("Adafactor with relative_step=True: using the adafactor schedule instead of %s", name)
        return "adafactor"
    if name == "adafactor" and type(optimizer).__name__ != "Adafactor":
        raise UserError("--lr_scheduler adafactor works with --optimizer_type Adafactor only")
    return name


def _check_plan(name: str, row: ScheduleRow, plan: Plan, optimizer) -> None:
    if plan.warmup and not row.takes_warmup:
        if _relative_step_adafactor(optimizer):
            raise UserError("--lr_warmup_steps: Adafactor with relative_step=True sets its own rate; set it to 0 "
                            "(optimizer_args warmup_init=True warms up) or pass relative_step=False")
        if name == "constant":  # kohya refuses this too: the warmup would silently do nothing
            raise UserError("--lr_warmup_steps has no effect with --lr_scheduler constant: use constant_with_warmup")
        raise UserError(f"--lr_warmup_steps has no effect with --lr_scheduler {name}: set it to 0")
    if name == "warmup_stable_decay" and plan.stable < 0:
        raise UserError(f"--lr_warmup_steps ({plan.warmup}) + --lr_decay_steps ({plan.decay}) exceed the "
                        f"{plan.total} training steps")


def build_scheduler(cfg, optimizer, total_steps: int):
    """The schedule for `optimizer` over `total_steps` optimizer steps (times the number of processes)."""
    validate(cfg)
    inner = getattr(optimizer, "optimizer", optimizer)
    extra = parse_kv_args(cfg.lr_scheduler_args, "lr_scheduler_args")
    plan = Plan.from_cfg(cfg, total_steps)
    if is_schedule_free(inner):
        # kohya too: a schedule-free optimizer runs at its rate (library.advice warns about a schedule given)
        return LambdaLR(optimizer, _constant)
    if cfg.lr_scheduler_type:
        if plan.warmup:
            raise UserError(f"--lr_warmup_steps has no effect with --lr_scheduler_type {cfg.lr_scheduler_type}: "
                            "set it to 0 (or pass the class its own warmup argument)")
        return _call(custom_class(cfg), optimizer, extra, cfg.lr_scheduler_type)
    name = _effective_name(cfg, inner)
    row = SCHEDULERS[name]
    _check_plan(name, row, plan, inner)
    if name == "cosine_with_min_lr" and plan.min_lr_ratio is None and "min_lr" not in extra:
        raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (the final rate as a "
                        "share of the peak)")
    func = _import(row.path, f"--lr_scheduler {name}")
    _check_row_args(row, func, extra, name)
    kwargs = {keyword: getattr(plan, field) for keyword, field in row.args}
    if "min_lr_ratio" in kwargs and kwargs["min_lr_ratio"] is None:
        kwargs["min_lr_ratio"] = 0.0
    return _call(func, optimizer, {**kwargs, **extra}, name)


def _constant(step: int) -> float:
    return 1.0


def _call(func, optimizer, kwargs: dict, label: str):
    try:
        return func(optimizer, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--lr_scheduler {label}: {exc}") from None
