"""Optimizers: a table of `name -> import path, defaults`, and kohya's `key=value` argument parsing.

Names are matched as kohya matches them (case-insensitively; `_` and `-` are ignored too, so OneTrainer's
ADAMW_8BIT is AdamW8bit). A name that is not in the table but looks like `package.module.Class` is imported
as it is, and a bare name that torch.optim has (NAdam, RAdam, ...) is taken from there: kohya's escape hatch.
The learning-rate schedules are in library/schedulers.py.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from library import fused_backward
from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerRow:
    name: str  # kohya's spelling, shown in messages
    path: str  # "module:Class"
    defaults: dict = field(default_factory=dict)  # applied under --optimizer_args
    install: str = ""  # pip package that provides it, for the missing-import message
    adaptive: bool = False  # finds its own step size (D-Adaptation, Prodigy): --learning_rate about 1
    schedule_free: bool = False  # needs train()/eval() switching; runs without an lr schedule
    adjust: Callable | None = None  # per-optimizer rule: (kwargs, param_groups, lr) -> the lr to pass


def _adafactor_rule(kwargs: dict, param_groups, lr):
    """kohya's Adafactor rules: relative_step defaults to True (and warmup_init forces it); then Adafactor
    computes its own rate, so the learning rate and the per-group rates are dropped (the `adafactor`
    schedule reports Adafactor's rate, starting from --learning_rate)."""
    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init") and not kwargs["relative_step"]:
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting it")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return lr
    dropped = [group.pop("lr") for group in param_groups if isinstance(group, dict) and "lr" in group]
    if len(set(dropped)) > 1:
        logger.warning("Adafactor with relative_step=True sets its own rates: "
                       "--unet_lr / --text_encoder_lr are ignored")
    return None


def _one_rate_rule(name: str, kwargs: dict, param_groups, lr):
    """Prodigy and most D-Adaptation optimizers stop at their first step (RuntimeError) when parameter
    groups have different non-zero rates; kohya only warns. Say so before anything runs."""
    rates = {group.get("lr", lr) for group in param_groups if isinstance(group, dict)} - {0, None}
    if len(rates) > 1:
        listed = ", ".join(f"{rate:g}" for rate in sorted(rates))
        raise UserError(f"--optimizer_type {name} takes one learning rate for every parameter group (got {listed}): "
                        "give --unet_lr and --text_encoder_lr the same value (or leave them unset), without "
                        "per-block or LoRA+ rate ratios")
    return lr


def _adaptive(name: str, path: str, install: str, one_rate: bool = True) -> OptimizerRow:
    return OptimizerRow(name, path, install=install, adaptive=True,
                        adjust=functools.partial(_one_rate_rule, name) if one_rate else None)


_BNB = "bitsandbytes"
_NESTEROV = {"momentum": 0.9, "nesterov": True}  # kohya adds momentum 0.9 when none is given


def _bnb(name: str, cls: str = "", **defaults) -> OptimizerRow:
    return OptimizerRow(name, f"bitsandbytes.optim:{cls or name}", defaults, _BNB)


_ROWS = [
    # kohya sd-scripts' names
    OptimizerRow("AdamW", "torch.optim:AdamW"),
    _bnb("AdamW8bit"), _bnb("PagedAdamW"), _bnb("PagedAdamW8bit"), _bnb("PagedAdamW32bit"),
    OptimizerRow("Lion", "lion_pytorch:Lion", install="lion-pytorch"),
    _bnb("Lion8bit"), _bnb("PagedLion8bit"), _bnb("AdEMAMix8bit"), _bnb("PagedAdEMAMix8bit"),
    OptimizerRow("SGDNesterov", "torch.optim:SGD", _NESTEROV),
    _bnb("SGDNesterov8bit", "SGD8bit", **_NESTEROV),
    _adaptive("DAdaptation", "dadaptation.experimental:DAdaptAdamPreprint", "dadaptation"),
    _adaptive("DAdaptAdamPreprint", "dadaptation.experimental:DAdaptAdamPreprint", "dadaptation"),
    *[_adaptive(name, f"dadaptation:{name}", "dadaptation") for name in ("DAdaptAdam", "DAdaptLion", "DAdaptSGD")],
    *[_adaptive(name, f"dadaptation:{name}", "dadaptation", one_rate=False)
      for name in ("DAdaptAdaGrad", "DAdaptAdan")],
    _adaptive("DAdaptAdanIP", "dadaptation.experimental:DAdaptAdanIP", "dadaptation", one_rate=False),
    _adaptive("Prodigy", "prodigyopt:Prodigy", "prodigyopt"),
    OptimizerRow("Adafactor", "transformers.optimization:Adafactor", install="transformers", adjust=_adafactor_rule),
    *[OptimizerRow(name, f"schedulefree:{name}", install="schedulefree", schedule_free=True)
      for name in ("RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree")],
    # OneTrainer's others; their 8-bit versions come from bitsandbytes, as in OneTrainer
    *[OptimizerRow(name, f"torch.optim:{name}") for name in ("Adagrad", "Adam", "RMSprop", "SGD")],
    *[_bnb(name) for name in ("Adagrad8bit", "Adam8bit", "RMSprop8bit", "LAMB", "LAMB8bit")],
    # bitsandbytes' SGD8bit and LARS refuse to run without momentum (and SGD8bit ignores nesterov)
    _bnb("SGD8bit", momentum=0.9), _bnb("LARS", momentum=0.9), _bnb("LARS8bit", momentum=0.9),
    *[OptimizerRow(name, f"pytorch_optimizer:{cls}", install="pytorch-optimizer")
      for name, cls in (("CAME", "CAME"), ("Adan", "Adan"), ("AdEMAMix", "AdEMAMix"))],
]


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


OPTIMIZERS: dict[str, OptimizerRow] = {_key(row.name): row for row in _ROWS}
_NAMES = {row.name for row in _ROWS}

_WORDS = {"true": True, "false": False, "none": None}


def _value(text: str):
    """A Python literal when the text is one (1e-3, (0.9, 0.99), 0.9,0.99, True), true/false/none in any
    case, otherwise the bare string (e.g. step_rules=1:10,0.1)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return _WORDS.get(text.lower(), text)


def _split_items(items) -> list[str]:
    """GUI wrappers may write several pairs in one string ("a=1 b=2"): split it when every word is a pair."""
    result = []
    for item in items or []:
        words = str(item).split()
        result += words if len(words) > 1 and all("=" in w for w in words) else [str(item)]
    return result


def parse_kv_args(items: list[str] | None, flag: str) -> dict:
    """Parse kohya-style `key=value` strings; values are Python literals when they parse as one.

    Only the first `=` splits, so values may hold `=`; `betas=0.9,0.99` is a tuple, as in kohya."""
    parsed = {}
    for item in _split_items(items):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--{flag}: '{item}' is not key=value")
        parsed[key.strip()] = _value(value.strip())
    return parsed


def optimizer_name(cfg) -> str:
    """The optimizer the user asked for, with kohya's legacy `--use_8bit_adam` / `--use_lion_optimizer`."""
    legacy = {flag: name for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion"))
              if getattr(cfg, flag, False)}
    given = [f"--{flag}" for flag in legacy]
    if cfg.optimizer_type:
        given.append(f"--optimizer_type {cfg.optimizer_type}")
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} both given: keep one")
    return next(iter(legacy.values()), cfg.optimizer_type or "AdamW")


def _import(path: str, install: str, flag_value: str):
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = install or module_name.split(".")[0]
        raise UserError(f"--optimizer_type {flag_value} needs the '{module_name}' package: "
                        f"pip install {package}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"--optimizer_type {flag_value}: {module_name} has no '{attr}'") from None


def optimizer_row(cfg) -> OptimizerRow:
    """The table row of the configured optimizer; a class path or a torch.optim name gets a row of its own."""
    name = optimizer_name(cfg)
    row = OPTIMIZERS.get(_key(name))
    if row is not None:
        return row
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        return OptimizerRow(name, f"{module_name}:{attr}")
    # kohya reads any other bare name from torch.optim (case-sensitively; here in any case)
    found = [n for n in dir(torch.optim) if n.lower() == name.lower() and inspect.isclass(getattr(torch.optim, n))]
    if found and issubclass(getattr(torch.optim, found[0]), torch.optim.Optimizer):
        return OptimizerRow(found[0], f"torch.optim:{found[0]}")
    raise UserError(f"--optimizer_type {name}: unknown optimizer; use one of {', '.join(r.name for r in _ROWS)}, "
                    "a torch.optim name, or a class path such as pytorch_optimizer.CAME")


def optimizer_class(cfg):
    """The class `--optimizer_type` names, imported (a missing package is a one-line error)."""
    row = optimizer_row(cfg)
    return _import(row.path, row.install, optimizer_name(cfg))


_OWN = ("self", "params", "lr")  # what build_optimizer passes itself


def accepted_keys(func, exclude=_OWN) -> tuple[set[str], bool]:
    """The keyword arguments `func` (a class or function) names, less `exclude`, and whether it also
    takes **kwargs."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - set(exclude), any(p.kind == p.VAR_KEYWORD for p in params)


def check_keys(kwargs: dict, func, flag: str, label: str, strict: bool, exclude=_OWN) -> None:
    """A key `func` does not name is an error listing the valid ones. One that takes **kwargs is
    trusted unless `strict` (the table's rows: pytorch-optimizer swallows unknown keys silently)."""
    valid, takes_any = accepted_keys(func, exclude)
    if takes_any and not strict:
        return
    for key in kwargs:
        if key == "lr" and flag == "optimizer_args":
            raise UserError(f"--{flag} lr=...: set the learning rate with --learning_rate "
                            "(and --unet_lr / --text_encoder_lr)")
        if key not in valid:
            raise UserError(f"--{flag}: {label} takes no '{key}'; valid keys: {', '.join(sorted(valid)) or 'none'}")


def optimizer_kwargs(cfg, row: OptimizerRow | None = None) -> dict:
    """`--optimizer_args` over the row's defaults (before the row's own rule runs)."""
    row = row or optimizer_row(cfg)
    return {**row.defaults, **parse_kv_args(cfg.optimizer_args, "optimizer_args")}


def validate(cfg) -> None:
    """Check the optimizer and schedule options without parameters or a model: names, packages, argument
    keys. Cheap enough to run before anything is loaded (build_optimizer and build_scheduler repeat it)."""
    from library.schedulers import validate as check_schedule

    check_optimizer(cfg)
    check_schedule(cfg)


def check_optimizer(cfg) -> None:
    """The optimizer's name, package and argument keys, and whether --fused_backward_pass can run with it."""
    row = optimizer_row(cfg)
    fused_backward.check(cfg, row)
    cls = optimizer_class(cfg)
    check_keys(optimizer_kwargs(cfg, row), cls, "optimizer_args", row.name, strict=row.name in _NAMES)


def build_optimizer(cfg, param_groups) -> torch.optim.Optimizer:
    """The optimizer for `param_groups`, with `--optimizer_args` applied over the row's defaults."""
    check_optimizer(cfg)
    row, cls = optimizer_row(cfg), optimizer_class(cfg)  # cheap: check_optimizer imported it already
    kwargs = optimizer_kwargs(cfg, row)
    lr = row.adjust(kwargs, param_groups, cfg.learning_rate) if row.adjust else cfg.learning_rate
    try:
        optimizer = cls(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise UserError(f"--optimizer_args for {row.name}: {exc}") from None
    logger.info("optimizer %s.%s %s", cls.__module__, cls.__name__, kwargs or "")
    train_mode(optimizer)
    return optimizer


def is_schedule_free(optimizer) -> bool:
    """Schedule-free optimizers (they have train() / eval() and keep an averaged copy of the weights)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


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


def group_lrs(optimizer, names: list[str]) -> dict[str, float | None]:
    """The peak learning rate of each named parameter group (None where the optimizer sets its own): a
    scheduler keeps it as `initial_lr` while `lr` follows the schedule (0 at the start of a warmup)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return {name: group.get("initial_lr", group.get("lr")) for name, group in zip(names, inner.param_groups)}


def adaptive_lr_logs(optimizer, names: list[str]) -> dict[str, float]:
    """kohya's `lr/d*lr/<group>` figures for D-Adaptation and Prodigy: the step size they actually use
    (their `d` estimate times the scheduled rate), which is what a user copies into a plain AdamW run."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return {f"lr/d*lr/{name}": float(group["d"]) * float(group["lr"])
            for name, group in zip(names, inner.param_groups) if "d" in group and group.get("lr") is not None}


def build_scheduler(cfg, optimizer, total_steps: int):
    """The learning-rate schedule (library/schedulers.py); kept here because the trainer asks optim for it."""
    from library.schedulers import build_scheduler as build

    return build(cfg, optimizer, total_steps)
