"""CLIP tokenizers built offline from the BPE vocabulary that ships inside the open-clip-torch package.

The file `open_clip/bpe_simple_vocab_16e6.txt.gz` is located with importlib without importing open_clip
(which needs torchvision). From it we rebuild exactly the vocabulary OpenAI's CLIP uses: the 256
byte-level symbols, the same with the end-of-word marker `</w>`, one entry per merge, then the two
special tokens — 49,408 ids in all, identical to CLIP-L's.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

from library.errors import UserError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 48,894 merges (49,408 ids - 512 byte symbols - 2 special tokens); line 0 is a header.
NUM_MERGES = 49408 - 256 * 2 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for the bytes 0..255, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def vocab_path() -> str:
    """Path of open_clip's BPE vocabulary file; UserError when the package is not installed."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, VOCAB_FILE)
        if os.path.isfile(path):
            return path
    raise UserError(
        f"the CLIP tokenizer vocabulary ({VOCAB_FILE}) was not found: "
        "install it with `pip install --no-deps open-clip-torch`"
    )


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token -> id table and its BPE merges, read once per process."""
    with gzip.open(vocab_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS):
    """A transformers CLIPTokenizer with CLIP-L's ids, built without the hub.

    `pad_token` is "<|endoftext|>" for SD 1.x (and SDXL's first encoder) and "!" (id 0) for SD 2.x
    and SDXL's second encoder.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH
    )
