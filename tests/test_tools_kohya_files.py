"""The post-training tools on a file in sd-scripts' own format (fp16, kohya's SD1 names, alphas), built here
from kohya's naming rule: merge, resize, check and convert each give the numbers the math says."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.config import parse_args
from library.models import load_model
from tests.conftest import train_argv
from tests.test_interop_diffusers import _outputs, kohya_layers, merge_by_hand, write_kohya_file
from tools import check_lora_weights, convert_lora, merge_lora, resize_lora


def _family(model: str, data: str, out: str):
    return load_model(parse_args(train_argv(model, data, out)))


@pytest.fixture(scope="module")
def kohya_file(tiny_single_file, demo_data, tmp_path_factory):
    """An sd-scripts LoCon (rank 4, conv rank 2, alphas 1..3, fp16) for the tiny model, and its tensors."""
    path = str(tmp_path_factory.mktemp("kohya") / "sd_scripts_locon.safetensors")
    fam = _family(tiny_single_file, demo_data, str(tmp_path_factory.mktemp("o")))
    layers = kohya_layers({"text_encoder": fam.text_encoders[0], "unet": fam.unet}, with_conv=True)
    conv3 = lambda m: m.weight.dim() == 4 and m.weight.shape[-1] == 3  # noqa: E731
    sd = write_kohya_file(path, layers, lambda m: 2 if conv3(m) else 4, with_alpha=True)
    return path, sd


def test_merge_into_checkpoint_equals_merging_by_hand(kohya_file, tiny_single_file, demo_data, tmp_path):
    path, sd = kohya_file
    merged = str(tmp_path / "merged.safetensors")
    assert merge_lora.main(["--sd_model", tiny_single_file, "--models", path, "--save_to", merged]) == 0
    got = _family(merged, demo_data, str(tmp_path / "o1"))
    want = _family(tiny_single_file, demo_data, str(tmp_path / "o2"))
    reference = {"text_encoder": want.text_encoders[0], "unet": want.unet}
    merge_by_hand(reference, kohya_layers(reference, with_conv=True), sd)
    for a, b in zip(_outputs(got.text_encoders[0], got.unet), _outputs(reference["text_encoder"], reference["unet"])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_resize_gives_the_best_rank_one_approximation(kohya_file, tmp_path):
    path, sd = kohya_file
    out = str(tmp_path / "rank1.safetensors")
    assert resize_lora.main(["--model", path, "--save_to", out, "--new_rank", "1", "--new_conv_rank", "1"]) == 0
    small = load_file(out)
    names = {key.rpartition(".lora_down")[0] for key in sd if key.endswith(".lora_down.weight")}
    assert {key.rpartition(".lora_down")[0] for key in small if key.endswith(".lora_down.weight")} == names
    for name in sorted(names)[::7]:  # every 7th layer: the SVDs of the full deltas are the slow part
        delta = _delta(sd, name)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = s[0] * torch.outer(u[:, 0], vh[0])
        torch.testing.assert_close(_delta(small, name), best, atol=2e-4, rtol=1e-3)


def _delta(sd: dict, name: str) -> torch.Tensor:
    up, down = sd[f"{name}.lora_up.weight"].double().flatten(1), sd[f"{name}.lora_down.weight"].double().flatten(1)
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else down.shape[0]
    return up @ down * (alpha / down.shape[0])


def test_check_finds_every_layer_trained(kohya_file, capsys):
    path, sd = kohya_file
    assert check_lora_weights.main([path]) == 0
    out = capsys.readouterr().out
    layers = sum(key.endswith(".lora_down.weight") for key in sd)
    assert f"{layers} ok" in out, out[-400:]


def test_convert_round_trip_is_exact(kohya_file, tmp_path):
    path, sd = kohya_file
    diffusers_file, back = str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors")
    assert convert_lora.main(["--src_path", path, "--dst_path", diffusers_file, "--dst", "diffusers"]) == 0
    assert convert_lora.main(["--src_path", diffusers_file, "--dst_path", back, "--dst", "kohya"]) == 0
    again = load_file(back)
    assert set(again) == set(sd)
    for key, value in sd.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key
