"""Caption files, caption statistics, and per-epoch caption processing: small pure functions.

`process_caption(text, options, epoch, rng)` applies kohya's steps in kohya's order: prefix / suffix,
whole-caption dropout, wildcards, the fixed / shuffled / fixed-suffix split with token warmup, tag
dropout and shuffling, then the secondary separator. A caption file may hold several captions, one per
line: one is drawn per sample per epoch (OneTrainer's behaviour; kohya does it only with --enable_wildcard).
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass

from library.errors import UserError


def normalize_extension(extension: str) -> str:
    """".caption" stays, "txt" becomes ".txt" (kohya adds the missing dot too)."""
    if extension and not extension.startswith("."):
        return "." + extension
    return extension


def caption_candidates(image_path: str, extension: str) -> list[str]:
    """Caption files that may belong to an image, in the order kohya tries them.

    First `<stem><ext>`; then, for names with at least five `_`-separated parts, the stem without
    its last four parts: kohya's face-crop naming (`name_cx_cy_w_h.png`) shares the caption of `name`.
    """
    stem = os.path.splitext(image_path)[0]
    candidates = [stem + extension]
    parts = stem.split("_")
    if len(parts) >= 5:
        candidates.append("_".join(parts[:-4]) + extension)
    return candidates


def read_caption(image_path: str, extension: str) -> str | None:
    """The caption text of an image: its non-empty lines, stripped, joined by newlines; None without a file."""
    for path in caption_candidates(image_path, extension):
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.readlines()
        except UnicodeDecodeError:
            raise UserError(f"caption file {path} is not UTF-8 text: re-save it as UTF-8") from None
        lines = [line.strip() for line in lines if line.strip()]
        if not lines:
            raise UserError(f"caption file {path} is empty: write a caption, or delete it to use the class token")
        return "\n".join(lines)
    return None


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Count comma-separated tags, lower-cased and stripped, as kohya's ss_tag_frequency does.

    Each caption counts once per image (repeats are not counted).
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.replace("\n", ",").split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


@dataclass(frozen=True)
class CaptionOptions:
    """kohya's caption options (the CLI / config names), read once from the resolved config."""

    prefix: str | None = None
    suffix: str | None = None
    dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    enable_wildcard: bool = False
    shuffle: bool = False
    separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0  # steps; below 1, a ratio of max_train_steps

    @classmethod
    def from_cfg(cls, cfg) -> "CaptionOptions":
        def get(name, default):
            value = getattr(cfg, name, None)
            return default if value is None else value

        if get("token_warmup_min", 1) < 0 or get("token_warmup_step", 0) < 0:
            raise UserError(f"--token_warmup_min {get('token_warmup_min', 1)} and --token_warmup_step "
                            f"{get('token_warmup_step', 0)} must not be negative")
        return cls(get("caption_prefix", None), get("caption_suffix", None), get("caption_dropout_rate", 0.0),
                   get("caption_dropout_every_n_epochs", 0), get("enable_wildcard", False),
                   get("shuffle_caption", False), get("caption_separator", ",") or ",", get("keep_tokens", 0),
                   get("keep_tokens_separator", ""), get("secondary_separator", None),
                   get("caption_tag_dropout_rate", 0.0), int(get("token_warmup_min", 1)),
                   float(get("token_warmup_step", 0.0)))


_WILDCARD = re.compile(r"\{([^{}]*)\}")


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """`{a|b|c}` -> one of a, b, c; `{{` and `}}` stand for literal braces (kohya's escape)."""
    open_mark, close_mark = "\x00", "\x01"
    text = caption.replace("{{", open_mark).replace("}}", close_mark)
    text = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    return text.replace(open_mark, "{").replace(close_mark, "}")


def _parts(text: str, separator: str) -> list[str]:
    return [part.strip() for part in text.split(separator) if part.strip()]


def warmup_steps(token_warmup_step: float, max_train_steps: int) -> int:
    """The step at which token warmup ends: the option itself, or below 1 that ratio of max_train_steps
    rounded down (kohya's rule; 0 means no warmup)."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return int(token_warmup_step)


def warmup_tag_count(num_tags: int, step: int, end_step: int, minimum: int) -> int:
    """How many of the flexible tags are kept at optimizer step `step` (kohya's token warmup): from
    `minimum` at step 0 growing linearly, rounded down, to all of them at `end_step` and after."""
    if end_step <= 0 or step >= end_step:
        return num_tags
    return max(0, math.floor(step * (num_tags - minimum) / end_step) + minimum)


def shuffle_tags(caption: str, opts: CaptionOptions, rng: random.Random, step: int = 0, end_step: int = 0) -> str:
    """kohya's tag step: fixed head, shuffled / dropped middle, fixed tail, joined with ", ".

    With keep_tokens_separator in the caption, the text before it is fixed and the text after a second
    one is a fixed tail; otherwise the first keep_tokens parts are fixed. Before warmup's `end_step`, the
    middle is cut to its first warmup_tag_count tags in file order, before shuffling, as kohya does.
    """
    tail: list[str] = []
    if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
        head_text, flex_text = caption.split(opts.keep_tokens_separator, 1)
        if opts.keep_tokens_separator in flex_text:
            flex_text, tail_text = flex_text.split(opts.keep_tokens_separator, 1)
            tail = _parts(tail_text, opts.separator)
        head, flex = _parts(head_text, opts.separator), _parts(flex_text, opts.separator)
    else:
        parts = _parts(caption, opts.separator)
        head, flex = parts[: opts.keep_tokens], parts[opts.keep_tokens:]
    flex = flex[: warmup_tag_count(len(flex), step, end_step, opts.token_warmup_min)]
    if opts.shuffle:
        rng.shuffle(flex)
    if opts.tag_dropout_rate > 0:
        flex = [tag for tag in flex if rng.random() >= opts.tag_dropout_rate]
    return ", ".join(head + flex + tail)


def process_caption(text: str, opts: CaptionOptions, epoch: int, rng: random.Random, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """The caption one sample trains with in `epoch` (0-based) at optimizer step `step`, drawn from `rng`
    (see the module doc). max_train_steps turns a token_warmup_step below 1 into steps."""
    lines = text.split("\n")
    caption = lines[0] if len(lines) == 1 else rng.choice(lines)
    if opts.prefix:
        caption = opts.prefix + " " + caption
    if opts.suffix:
        caption = caption + " " + opts.suffix
    dropped = opts.dropout_rate > 0 and rng.random() < opts.dropout_rate
    # kohya counts epochs from 1: with N, the captions of epochs N, 2N, ... are dropped
    if dropped or (opts.dropout_every_n_epochs > 0 and (epoch + 1) % opts.dropout_every_n_epochs == 0):
        return ""
    if opts.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    # kohya leaves keep_tokens_separator in the text when nothing shuffles; it never belongs in a prompt
    separator_left = bool(opts.keep_tokens_separator) and opts.keep_tokens_separator in caption
    if opts.shuffle or opts.tag_dropout_rate > 0 or opts.token_warmup_step > 0 or separator_left:
        caption = shuffle_tags(caption, opts, rng, step, warmup_steps(opts.token_warmup_step, max_train_steps))
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.separator)
    return caption

