"""Optimizers and learning-rate schedulers: tables of `name -> import path, defaults`.

A name that is not in the table but looks like `package.module.Class` is imported as it is, like
kohya's escape hatch; a known name whose row is not built yet stops with `not supported yet`.
"""

from __future__ import annotations

import ast
import importlib
import math
from dataclasses import dataclass, field

import torch

from library.errors import UserError, not_supported


@dataclass(frozen=True)
class OptimizerRow:
    path: str  # "module:Class"
    defaults: dict = field(default_factory=dict)
    install: str = ""  # pip package that provides it, for the missing-import message


OPTIMIZERS = {
    "adamw": OptimizerRow("torch.optim:AdamW"),
    "adamw8bit": OptimizerRow("bitsandbytes.optim:AdamW8bit", install="bitsandbytes"),
}

# Schedulers diffusers' get_scheduler builds; kohya's names map onto them one to one.
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


def parse_kv_args(items: list[str] | None, flag: str) -> dict:
    """Parse kohya-style `key=value` strings; values are Python literals when they parse as one."""
    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--{flag}: '{item}' is not key=value")
        try:
            parsed[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed[key.strip()] = value.strip()
    return parsed


def optimizer_name(cfg) -> str:
    """The optimizer the user asked for, with kohya's legacy `--use_8bit_adam` folded in."""
    if getattr(cfg, "use_8bit_adam", False):
        return "AdamW8bit"
    return cfg.optimizer_type or "AdamW"


def _import(path: str, install: str, flag_value: str):
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        hint = f": pip install {install}" if install else ""
        raise UserError(f"--optimizer_type {flag_value} needs the '{module_name}' package{hint}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"--optimizer_type {flag_value}: {module_name} has no '{attr}'") from None


def build_optimizer(cfg, param_groups) -> torch.optim.Optimizer:
    """The optimizer for `param_groups`, with `--optimizer_args` applied over the row's defaults."""
    name = optimizer_name(cfg)
    row = OPTIMIZERS.get(name.lower())
    if row is None:
        if "." not in name:
            raise not_supported(f"optimizer_type {name}")
        module_name, _, attr = name.rpartition(".")
        row = OptimizerRow(f"{module_name}:{attr}")
    cls = _import(row.path, row.install, name)
    kwargs = {**row.defaults, **parse_kv_args(cfg.optimizer_args, "optimizer_args")}
    try:
        return cls(param_groups, lr=cfg.learning_rate, **kwargs)
    except TypeError as exc:
        raise UserError(f"--optimizer_args for {name}: {exc}") from None


def train_mode(optimizer) -> None:
    """Schedule-free optimizers keep two sets of weights and must be told when training resumes."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if callable(getattr(inner, "train", None)):
        inner.train()


def eval_mode(optimizer) -> None:
    """Before sampling or saving: a schedule-free optimizer swaps in its averaged weights."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if callable(getattr(inner, "eval", None)):
        inner.eval()


def warmup_steps(cfg, total_steps: int) -> int:
    """`--lr_warmup_steps` as a step count: an integer, or a float below 1 meaning a ratio of the run."""
    value = cfg.lr_warmup_steps or 0
    if isinstance(value, float) and value < 1:
        return int(math.ceil(value * total_steps))
    return int(value)


def build_scheduler(cfg, optimizer, total_steps: int):
    """kohya's schedulers by name (diffusers implements them); warmup as `warmup_steps` reads it."""
    from diffusers.optimization import get_scheduler

    name = cfg.lr_scheduler or "constant"
    if name not in SCHEDULERS:
        raise not_supported(f"lr_scheduler {name}")
    warmup = warmup_steps(cfg, total_steps)
    if warmup and name == "constant":
        # kohya refuses this too: the warmup would silently do nothing.
        raise UserError("--lr_warmup_steps has no effect with --lr_scheduler constant: use constant_with_warmup")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
