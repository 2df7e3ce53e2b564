"""The offline CLIP tokenizer gives CLIP-L's ids."""

from __future__ import annotations

import pytest

from library.errors import UserError
from library import tokenizers


def test_clip_l_ids():
    tok = tokenizers.clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("sks").input_ids == [49406, 48136, 49407]
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    # Case and whitespace are normalised as CLIP does.
    assert tok("A  Photo\tof a CAT").input_ids == tok("a photo of a cat").input_ids


def test_padding_with_eos_and_with_exclamation_mark():
    ids = tokenizers.clip_tokenizer()("sks", padding="max_length", max_length=6).input_ids
    assert ids == [49406, 48136, 49407, 49407, 49407, 49407]
    sd2 = tokenizers.clip_tokenizer(pad_token="!")
    assert sd2.pad_token_id == 0
    assert sd2("sks", padding="max_length", max_length=6).input_ids == [49406, 48136, 49407, 0, 0, 0]


def test_vocabulary_layout():
    vocab, merges = tokenizers._vocab_and_merges()
    assert len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["".join(merges[0])] == 512
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_missing_open_clip_is_a_user_error(monkeypatch):
    monkeypatch.setattr(tokenizers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps open-clip-torch"):
        tokenizers.vocab_path()
