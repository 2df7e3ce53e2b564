"""Caption files and caption statistics: small pure functions.

Per-epoch caption processing (shuffle_caption, keep_tokens, dropout, prefix/suffix, wildcards)
belongs here too, as functions of (caption, options, rng), when it is built.
"""

from __future__ import annotations

import os

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
    """The caption for an image: the first line of its caption file, stripped; None without a file."""
    for path in caption_candidates(image_path, extension):
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.readlines()
        except UnicodeDecodeError:
            raise UserError(f"caption file {path} is not UTF-8 text: re-save it as UTF-8") from None
        if not lines:
            raise UserError(f"caption file {path} is empty: write a caption, or delete it to use the class token")
        return lines[0].strip()
    return None


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Count comma-separated tags, lower-cased and stripped, as kohya's ss_tag_frequency does.

    Each caption counts once per image (repeats are not counted).
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
