"""A1111-style prompt weighting for `--weighted_captions`: "(word)", "[word]", "(word:1.3)".

`(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:w)` multiplies it by w;
groups nest; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; an unclosed group ends with the caption.
The caption's tokens get the weight of the text they come from; the encoder states are then scaled
per token and rescaled to keep their overall mean (as kohya and A1111 do).
"""

from __future__ import annotations

import re

import torch

UP, DOWN = 1.1, 1 / 1.1
_TOKEN = re.compile(r"\\[\\()\[\]]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:|\\")


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """Split `text` into (piece, weight) runs; adjacent pieces of equal weight are joined."""
    pieces: list[list] = []  # [text, weight] in order
    open_groups: list[tuple[int, float]] = []  # (index of the group's first piece, its multiplier)

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token in ("(", "["):
            open_groups.append((len(pieces), UP if token == "(" else DOWN))
        elif weight is not None and open_groups and open_groups[-1][1] == UP:
            start, _ = open_groups.pop()
            scale(start, float(weight))
        elif token in (")", "]") and open_groups and open_groups[-1][1] == (UP if token == ")" else DOWN):
            start, factor = open_groups.pop()
            scale(start, factor)
        else:
            literal = token[1:] if token.startswith("\\") and len(token) == 2 else token
            pieces.append([literal, 1.0])
    for start, factor in reversed(open_groups):  # unclosed groups end with the caption
        scale(start, factor)
    merged: list[tuple[str, float]] = []
    for piece, weight in pieces:
        if merged and abs(merged[-1][1] - weight) < 1e-9:
            merged[-1] = (merged[-1][0] + piece, weight)
        elif piece:
            merged.append((piece, weight))
    return merged


def weighted_token_ids(tokenizer, caption: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """Token ids (no BOS/EOS) of a weighted caption and each token's weight, cut to `max_tokens`."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_weighted(caption):
        piece_ids = tokenizer(piece, add_special_tokens=False).input_ids
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return ids[:max_tokens], weights[:max_tokens]


def apply_token_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale (B, L, D) encoder states by (B, L) weights, then restore each sample's mean (kohya's rule).

    A mean near zero relative to the states' size (a final layer norm without bias, as in freshly built
    models) makes the ratio meaningless or 0/0: such a sample is left unrescaled instead.
    """
    previous = states.float().mean(dim=(-2, -1))
    weighted = states * weights.to(states.dtype).unsqueeze(-1)
    current = weighted.float().mean(dim=(-2, -1))
    size = weighted.float().abs().mean(dim=(-2, -1))
    usable = current.abs() > 1e-4 * size
    ratio = torch.where(usable, previous / torch.where(usable, current, torch.ones_like(current)), 1.0)
    return weighted * ratio.to(states.dtype)[:, None, None]
