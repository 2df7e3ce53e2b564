"""--weighted_captions: A1111 attention syntax, token weights, and the encoder states they give."""

from __future__ import annotations

import pytest
import torch

from library.models import load_model
from library.models.sd1 import SD1Family
from library.prompt_weights import apply_token_weights, parse_weighted

W11, W09 = 1.1, 1 / 1.1


@pytest.mark.parametrize("text,expected", [
    ("plain caption", [("plain caption", 1.0)]),
    ("a (red:1.5) dog", [("a ", 1.0), ("red", 1.5), (" dog", 1.0)]),
    ("a (big) [small] cat", [("a ", 1.0), ("big", W11), (" ", 1.0), ("small", W09), (" cat", 1.0)]),
    ("((very))", [("very", W11 * W11)]),
    ("((deep:2) outer)", [("deep", 2 * W11), (" outer", W11)]),
    (r"a \(literal\) \[x\]", [("a (literal) [x]", 1.0)]),
    ("(unclosed", [("unclosed", W11)]),
    ("ratio a:b", [("ratio a:b", 1.0)]),
])
def test_parse_weighted(text, expected):
    got = parse_weighted(text)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_apply_token_weights_keeps_the_mean_and_scales_relatively():
    states = torch.rand(2, 5, 3) + 0.5
    weights = torch.tensor([[1, 1, 2, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float32)
    out = apply_token_weights(states, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), states.mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(out[1], states[1])  # all-ones weights change nothing
    ratio = (out[0] / states[0])
    assert torch.allclose(ratio[2], 2 * ratio[0], atol=1e-5)


@pytest.fixture(scope="module")
def family(tiny_model_dir) -> SD1Family:
    import argparse

    cfg = argparse.Namespace(pretrained_model_name_or_path=tiny_model_dir, vae=None, max_token_length=None,
                             clip_skip=None, v_parameterization=False, unsafe_load_ckpt=False,
                             weighted_captions=True)
    return load_model(cfg)


@pytest.mark.parametrize("max_token_length", [None, 150])
def test_unweighted_caption_encodes_as_without_the_option(family, max_token_length):
    fam = SD1Family(family.unet, family.vae, family.text_encoders[0], family.tokenizers[0], model_path="m",
                    max_token_length=max_token_length, weighted_captions=True)
    captions = ["a photo of a red square", "shapes"]
    ids, weights = fam.tokenize_weighted(captions)
    assert torch.equal(ids, fam.tokenize(captions)) and torch.all(weights == 1)
    with torch.no_grad():
        assert torch.allclose(fam.encode_captions(captions), fam.encode_text(fam.tokenize(captions)), atol=1e-6)


def test_weighted_caption_scales_its_tokens(family):
    with torch.no_grad():
        plain = family.encode_text(family.tokenize(["a red dog"]))
        weighted = family.encode_captions(["a (red:1.5) dog"])
    ids, weights = family.tokenize_weighted(["a (red:1.5) dog"])
    assert torch.equal(ids, family.tokenize(["a red dog"]))  # same tokens, only weights differ
    assert weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1.0, 1.0])  # BOS a red dog EOS
    assert torch.allclose(weighted, apply_token_weights(plain, weights), atol=1e-6)
    assert not torch.allclose(weighted, plain)
