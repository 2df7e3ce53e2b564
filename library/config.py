"""Resolve options from the command line, a --config_file TOML and the defaults, into one checked Namespace.

CLI > TOML > defaults, as in kohya. Unlike kohya, every value (CLI string or TOML value) goes through the
same conversion and check, unknown keys are an error when they look like a typo, a store_true flag set in
TOML can be turned off with --flag=false, and errors are one line (library.errors.UserError).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import tomllib
from typing import Any, Sequence

from library.errors import UserError, not_supported
from library.saving import atomic_write_text
from library.options import IGNORED_KEYS, Option, defaults_of_other_scripts, int_or_float, options_for

logger = logging.getLogger(__name__)

CLI = "command line"
TRUE_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
              int_or_float: "a whole number of steps, or a ratio below 1 (or N%)"}
METAVARS = {str: "TEXT", int: "INT", float: "NUMBER", int_or_float: "STEPS"}
NEVER_WRITTEN = ("config_file", "output_config")


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors become one-line UserErrors instead of usage text and exit(2)."""

    def error(self, message: str):
        raise UserError(f"command line: {message}")


def build_parser(script: str = "train_network") -> argparse.ArgumentParser:
    """An argparse parser for `script` built from the option table.

    Every option defaults to SUPPRESS, so the parse result holds only what was given; values stay raw
    strings here and are converted by `convert`, the same function TOML values go through.
    """
    parser = _Parser(prog=f"{script}.py", argument_default=argparse.SUPPRESS,
                     usage="%(prog)s [--config_file FILE] [--option VALUE ...]",
                     description="sdtune: kohya sd-scripts compatible training. CLI > --config_file TOML > defaults.")
    groups: dict[str, Any] = {}
    for opt in options_for(script).values():
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group)
        kwargs: dict[str, Any] = {"help": _help_text(opt)}
        if opt.is_flag or opt.name == "output_config":
            kwargs.update(nargs="?", const=True, metavar="true|false" if opt.is_flag else "PATH")
        elif opt.nargs:
            kwargs.update(nargs=opt.nargs, metavar="VALUE")
        else:
            kwargs.update(metavar=METAVARS[opt.type])
        groups[opt.group].add_argument(f"--{opt.name}", **kwargs)
    return parser


def _help_text(opt: Option) -> str:
    text = opt.help
    if not opt.is_flag and opt.default not in (None, ""):
        text += f" (default: {opt.default})"
    if opt.choices:
        text += " {" + ", ".join(str(c) for c in opt.choices if c is not None) + "}"
    if opt.supported is False:
        text += " [not supported yet]"
    elif isinstance(opt.supported, tuple):
        text += " [supported: " + ", ".join(v for v in opt.supported if v) + "]"
    return text.replace("%", "%%")  # argparse formats help with %


# --- conversion: one path for CLI strings and TOML values -------------------------------------------

def _bad(source: str, name: str, raw: Any, what: str) -> UserError:
    where = f"--{name} {raw!r}" if source == CLI else f"{source}: {name} = {raw!r}"
    return UserError(f"{where}: expected {what}")


def _scalar(opt: Option, raw: Any, source: str) -> Any:
    """Convert one value to the option's type; strings are parsed the way the CLI parses them."""
    what = TYPE_WORDS[opt.type]
    if opt.type is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):  # kohya_ss GUI writes some flags as 0 / 1
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in TRUE_WORDS:
            return TRUE_WORDS[raw.strip().lower()]
        raise _bad(source, opt.name, raw, what)
    if isinstance(raw, str):
        try:
            return opt.type(raw)
        except ValueError:
            raise _bad(source, opt.name, raw, what) from None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise _bad(source, opt.name, raw, what)
    if opt.type is str:  # e.g. resolution = 512
        return str(raw)
    if opt.type is float:
        return float(raw)
    if isinstance(raw, int) or (opt.type is int_or_float and raw < 1):
        return raw
    raise _bad(source, opt.name, raw, what)  # a float for an integer option


def convert(opt: Option, raw: Any, source: str = CLI) -> Any:
    """Convert and check a raw CLI string (or list of strings) or TOML value for `opt`."""
    if raw is True and (opt.is_flag or opt.name == "output_config"):
        return True  # a bare flag (a bare --output_config is resolved to a path in parse_args)
    if opt.nargs:
        items = raw if isinstance(raw, list) else [raw]
        value = [_scalar(opt, item, source) for item in items]
        if opt.nargs == "+" and not value:
            raise _bad(source, opt.name, raw, "at least one value")
    else:
        value = _scalar(opt, raw, source)
    if opt.choices:
        for item in value if opt.nargs else [value]:
            if item not in opt.choices:
                allowed = ", ".join(str(c) for c in opt.choices if c is not None)
                raise _bad(source, opt.name, item, f"one of {allowed}")
    return value


# --- unknown names ----------------------------------------------------------------------------------

def _distance(a: str, b: str) -> int:
    """Levenshtein edit distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def suggest(name: str, known: Sequence[str]) -> str | None:
    """The known option a typo most likely meant: at most 2 edits, and at most a quarter of the name."""
    name = name.lower().replace("-", "_")
    best = min(known, key=lambda k: _distance(name, k), default=None)
    if best is None or len(name) < 3:
        return None
    dist = _distance(name, best)
    return best if dist <= 2 and dist <= max(1, len(name) // 4) else None


def _reject_cli_extras(extras: list[str], known: Sequence[str]) -> None:
    if not extras:
        return
    flag = next((e for e in extras if e.startswith("-")), None)
    if flag is None:
        raise UserError(f"command line: unexpected argument {extras[0]!r}")
    name = flag.lstrip("-").split("=", 1)[0]
    hint = suggest(name, known)
    tail = f": did you mean --{hint}?" if hint else " (see --help)"
    raise UserError(f"command line: unknown option --{name}{tail}")


# --- TOML ---------------------------------------------------------------------------------------------

def config_file_path(path: str) -> str:
    """kohya appends .toml to a --config_file given without it."""
    return path if path.endswith(".toml") else path + ".toml"


def read_toml(path: str) -> dict:
    """Read a TOML file; a missing or broken file is a UserError naming the file (and the line)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid TOML: the file is not UTF-8 text") from None


def read_json(path: str, label: str, expected: str) -> dict:
    """Read a JSON object; a missing, broken or non-object file is one line starting with `label`
    (how the user named the file, e.g. "--dataset_config x.json"), `expected` saying what belongs in it."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{label}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {expected}")
    return data


def flatten_sections(data: dict, path: str) -> dict:
    """kohya's rule: every top-level table is merged one level up, section names ignored, later wins."""
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            raise UserError(f"{path}: [[{key}]] is a dataset-config table; pass dataset files with --dataset_config")
        if not isinstance(value, dict):
            flat[key] = value
            continue
        for inner, inner_value in value.items():
            if isinstance(inner_value, dict):
                raise UserError(f"{path}: [{key}.{inner}] is nested too deeply: "
                                "options go at the top level or in one level of [section]")
            flat[inner] = inner_value
    return flat


def load_config_file(path: str, options: dict[str, Option]) -> dict[str, Any]:
    """Read --config_file: flat or sectioned, converted and checked like CLI values."""
    flat = flatten_sections(read_toml(path), path)
    values, ignored = {}, []
    for key, raw in flat.items():
        if key in NEVER_WRITTEN:
            ignored.append(key)
        elif key in options:
            values[key] = convert(options[key], raw, path)
        elif key in IGNORED_KEYS:
            ignored.append(key)
        elif (hint := suggest(key, list(options))) is not None:
            raise UserError(f"{path}: unknown option {key!r}: did you mean --{hint}?")
        else:
            ignored.append(key)
    if ignored:
        logger.warning("%s: ignoring keys sdtune (like sd-scripts) does not use: %s", path, ", ".join(ignored))
    return values


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string, once DEL (which JSON leaves raw) is escaped too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_output_config(cfg: argparse.Namespace, path: str, script: str = "train_network") -> None:
    """Write the options that differ from their defaults as flat TOML; never overwrites a file."""
    if os.path.exists(path):
        raise UserError(f"{path}: already exists; --output_config does not overwrite files")
    lines = [f"# written by sdtune {script} --output_config; read it back with --config_file"]
    for opt in options_for(script).values():
        value = getattr(cfg, opt.name, opt.default)
        if opt.name in NEVER_WRITTEN or value is None or _is_default(value, opt.default):
            continue
        lines.append(f"{opt.name} = {_toml_value(value)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: folder {folder} does not exist")
    atomic_write_text(path, "\n".join(lines) + "\n")


# --- resolving and checking ------------------------------------------------------------------------

def _is_default(value: Any, default: Any) -> bool:
    if value == [] and default is None:  # an empty nargs list means the same as not giving it
        return True
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def default_config(script: str = "train_network") -> argparse.Namespace:
    """Every option at its default: those of `script`, and those of other scripts too, which shared code
    (the loop, precision, metadata) then reads as left at their defaults."""
    values = defaults_of_other_scripts(script)
    values.update({name: opt.default for name, opt in options_for(script).items()})
    return argparse.Namespace(**{name: copy.copy(value) for name, value in values.items()})


def _is_off(value: Any) -> bool:
    """kohya switches its features on with `if args.x:`, and GUI wrappers write "", 0 or [] for a
    feature that is off: such values leave a feature unused, so they are not refused."""
    return value is None or value is False or (not isinstance(value, bool) and value in ("", 0, []))


def check_supported(cfg: argparse.Namespace, options: dict[str, Option]) -> None:
    """Refuse options sdtune has not built yet, when given a value that would switch them on."""
    refused = []
    for name, opt in options.items():
        value = getattr(cfg, name)
        if opt.supported is True or _is_default(value, opt.default):
            continue
        if opt.supported is False:
            if not _is_off(value):
                refused.append(name)
            continue
        allowed = [v.lower() if isinstance(v, str) else v for v in opt.supported]
        if (value.lower() if isinstance(value, str) else value) not in allowed:
            raise UserError(f"not supported yet: --{name} {value} (supported: {', '.join(v for v in opt.supported if v)})")
    if len(refused) == 1:
        raise not_supported(refused[0])
    if refused:
        raise UserError("not supported yet: " + ", ".join(f"--{n}" for n in refused))


def parse_resolution(text: str) -> tuple[int, int]:
    """kohya's --resolution: "512" -> (512, 512), "512,768" -> (width 512, height 768)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise UserError(f"--resolution {text!r}: expected SIZE or WIDTH,HEIGHT in pixels, e.g. 512 or 512,768")
    return (sizes[0], sizes[-1])


def _at_least(cfg, name: str, low: float, optional: bool = True) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if value < low:
        raise UserError(f"--{name} {value}: must be at least {low}")


def cross_check(cfg: argparse.Namespace) -> None:
    """The light consistency checks kohya makes (or crashes on) later, made up front."""
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if cfg.use_8bit_adam and cfg.optimizer_type:
        raise UserError(f"--use_8bit_adam and --optimizer_type {cfg.optimizer_type} both given: keep one")
    if cfg.resolution is not None:
        from library.dataset.buckets import is_multires, parse_resolutions

        parse_resolutions(cfg.resolution) if is_multires(cfg.resolution) else parse_resolution(cfg.resolution)
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "bucket_reso_steps",
                 "vae_batch_size"):
        _at_least(cfg, name, 1, optional=False)
    for name in ("max_train_epochs", "save_every_n_epochs", "clip_skip", "network_dim"):
        _at_least(cfg, name, 1)
    _at_least(cfg, "max_data_loader_n_workers", 0, optional=False)
    _at_least(cfg, "lr_warmup_steps", 0, optional=False)
    if cfg.min_bucket_reso > cfg.max_bucket_reso:
        raise UserError(f"--min_bucket_reso {cfg.min_bucket_reso} is above --max_bucket_reso {cfg.max_bucket_reso}")
    if cfg.network_dropout is not None and not 0 <= cfg.network_dropout <= 1:
        raise UserError(f"--network_dropout {cfg.network_dropout}: must be between 0 and 1")


def _resolve_output_config(cli: dict) -> None:
    """kohya's bare --output_config writes to --config_file's path (which is then not read)."""
    if cli.get("output_config") is not True:
        return
    if not cli.get("config_file"):
        raise UserError("--output_config needs a PATH, or --config_file naming the file to write")
    cli["output_config"] = config_file_path(cli.pop("config_file"))


def parse_args(argv: Sequence[str] | None = None, script: str = "train_network") -> argparse.Namespace:
    """Resolve CLI > --config_file TOML > defaults into a checked Namespace with every option of `script`."""
    options = options_for(script)
    argv = sys.argv[1:] if argv is None else list(argv)
    given, extras = build_parser(script).parse_known_args(argv)
    _reject_cli_extras(extras, list(options))
    cli = {name: convert(options[name], raw, CLI) for name, raw in vars(given).items()}
    _resolve_output_config(cli)
    values = vars(default_config(script))
    if cli.get("config_file"):
        cli["config_file"] = config_file_path(cli["config_file"])
        values.update(load_config_file(cli["config_file"], options))
    values.update(cli)
    if values["caption_extention"] is not None:  # kohya's old misspelt flag wins, as it does there
        values["caption_extension"] = values["caption_extention"]
    cfg = argparse.Namespace(**values)
    check_supported(cfg, options)
    cross_check(cfg)
    return cfg


def text_encoder_lr(value, num_encoders: int = 1):
    """kohya v0.10 takes one --text_encoder_lr per text encoder (nargs="*"). One encoder gets the first
    value (None when none was given); several get a list, the last value repeated as needed."""
    if not isinstance(value, (list, tuple)):
        return value
    if not value:
        return None
    if num_encoders == 1:
        return value[0]
    return [value[min(i, len(value) - 1)] for i in range(num_encoders)]
