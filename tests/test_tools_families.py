"""merge_lora and extract_lora_from_models on SD 2.x and SDXL models (tiny, built in code): merging equals
W + ratio * delta by hand, extraction gives kohya's SDXL names and the exact difference at full rank, and a
--v2 / --sdxl flag that contradicts the model is a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.models import single_file
from library.models.synthetic import build_sd2_components
from library.models.synthetic_sdxl import build_sdxl_components
from networks.targets import network_layers
from tools import extract_lora_from_models, merge_lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDERS = {"sd2": build_sd2_components, "sdxl": build_sdxl_components}
RANK, ALPHA, RATIO = 2, 1.0, 0.7


def _te(parts: dict):
    encoders = single_file.text_encoders_of(parts)
    return encoders[0] if len(encoders) == 1 else encoders


def _random_lora(parts: dict, path: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA over every default layer of the model: random up / down, alpha ALPHA."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in network_layers(_te(parts), parts["unet"], with_conv=False):
        weight = layer.module.weight
        tail = (1, 1) if weight.ndim == 4 else ()
        tensors[f"{layer.name}.lora_down.weight"] = torch.randn(RANK, weight.shape[1], *tail, generator=gen) * 0.1
        tensors[f"{layer.name}.lora_up.weight"] = torch.randn(weight.shape[0], RANK, *tail, generator=gen) * 0.1
        tensors[f"{layer.name}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, path)
    return tensors


def _by_hand(tensors: dict, name: str) -> torch.Tensor:
    up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
    delta = up.flatten(1) @ down.flatten(1) * (ALPHA / RANK)
    return delta.reshape(up.shape[0], *down.shape[1:])


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def model_file(request, tmp_path_factory):
    family = request.param
    parts = BUILDERS[family]("tiny", seed=5)
    path = str(tmp_path_factory.mktemp(family) / f"{family}.safetensors")
    single_file.write_single_file(family, parts, path)
    return family, path


@pytest.mark.parametrize("as_flag", [False, True])
def test_merge_into_single_file_equals_merging_by_hand(model_file, tmp_path, as_flag):
    family, path = model_file
    base = single_file.load_components(family, path)
    lora = str(tmp_path / "lora.safetensors")
    tensors = _random_lora(base, lora)
    out = str(tmp_path / "merged.safetensors")
    flag = ({"sd2": ["--v2"], "sdxl": ["--sdxl"]}[family]) if as_flag else []
    argv = ["--sd_model", path, "--models", lora, "--ratios", str(RATIO), "--save_to", out, *flag]
    assert merge_lora.main(argv) == 0
    merged = single_file.load_components(family, out)
    want = {layer.name: layer.module.weight.detach() for layer in network_layers(_te(base), base["unet"], False)}
    got = {layer.name: layer.module.weight.detach() for layer in network_layers(_te(merged), merged["unet"], False)}
    assert set(got) == set(want) and len(got) * 3 == len(tensors)
    prefixes = {"lora_unet", "lora_te"} if family == "sd2" else {"lora_unet", "lora_te1", "lora_te2"}
    assert {name.split("_text_model")[0] if "_text_model" in name else "lora_unet" for name in got} == prefixes
    worst = max(float((got[n] - (want[n] + RATIO * _by_hand(tensors, n))).abs().max()) for n in want)
    assert worst < 1e-5
    # everything the network does not touch is written back bit for bit (VAE, SD 2's extras)
    src, dst = load_file(path), load_file(out)
    assert set(src) == set(dst)
    assert all(torch.equal(src[k], dst[k]) for k in src if k.startswith("first_stage_model."))
    for key in ("cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection",
                "conditioner.embedders.1.model.logit_scale"):
        if key in src:
            assert torch.equal(src[key], dst[key])


@pytest.mark.parametrize("family, flag, label", [("sd2", "--sdxl", "an SD 2.x"), ("sdxl", "--v2", "an SDXL")])
def test_flag_against_the_family_is_one_line(family, flag, label, model_file, tmp_path, capsys):
    if model_file[0] != family:
        pytest.skip("one case per model")
    path = model_file[1]
    lora, out = str(tmp_path / "lora.safetensors"), str(tmp_path / "out.safetensors")
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, lora)
    assert merge_lora.main(["--sd_model", path, "--models", lora, "--save_to", out, flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --sd_model") and f"is {label} model, but {flag} was given" in err
    assert "\n" not in err and not os.path.exists(out)
    argv = ["--model_org", path, "--model_tuned", path, "--save_to", out, flag]
    assert extract_lora_from_models.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"--model_org {path} is {label} model, but {flag} was given" in err and "\n" not in err
    assert not os.path.exists(out)


def test_kohya_sdxl_merge_lora_name_checks_the_family(tiny_single_file, tmp_path):
    lora, out = str(tmp_path / "lora.safetensors"), str(tmp_path / "out.safetensors")
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, lora)
    script = os.path.join(REPO, "networks", "sdxl_merge_lora.py")
    run = subprocess.run([sys.executable, script, "--sd_model", tiny_single_file, "--models", lora,
                          "--save_to", out], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert run.returncode == 2
    assert "is an SD 1.x model, but --sdxl was given" in run.stderr.strip().splitlines()[-1]


# --- extraction ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    """Two tiny SDXL files: a base and the same model with every weight moved."""
    folder = tmp_path_factory.mktemp("pair")
    parts = build_sdxl_components("tiny", seed=1)
    org = str(folder / "org.safetensors")
    single_file.write_single_file("sdxl", parts, org)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in (parts["unet"], parts["text_encoder"], parts["text_encoder_2"]):
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    tuned = str(folder / "tuned.safetensors")
    single_file.write_single_file("sdxl", parts, tuned)
    return org, tuned


def test_extract_sdxl_gives_kohya_names_and_the_exact_difference(sdxl_pair, tmp_path):
    org, tuned = sdxl_pair
    out = str(tmp_path / "extracted.safetensors")
    argv = ["--model_org", org, "--model_tuned", tuned, "--save_to", out, "--sdxl", "--dim", "4096",
            "--clamp_quantile", "1"]
    assert extract_lora_from_models.main(argv) == 0
    tensors = load_file(out)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-xl-v1-base")
    names = {k.split(".")[0] for k in tensors}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names
    assert any(n.startswith("lora_unet_middle_block_1_") for n in names)
    assert any(n.startswith("lora_unet_output_blocks_0_1_") for n in names)
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_")) for n in names)
    base, moved = (single_file.load_components("sdxl", p) for p in (org, tuned))
    w0 = {layer.name: layer.module.weight.detach() for layer in network_layers(_te(base), base["unet"], False)}
    w1 = {layer.name: layer.module.weight.detach() for layer in network_layers(_te(moved), moved["unet"], False)}
    assert set(w0) == names
    worst = 0.0
    for name in names:
        up, down = tensors[f"{name}.lora_up.weight"].float(), tensors[f"{name}.lora_down.weight"].float()
        assert float(tensors[f"{name}.alpha"]) == down.shape[0]  # alpha = rank: scale 1
        rebuilt = (up.flatten(1) @ down.flatten(1)).reshape(w0[name].shape)
        worst = max(worst, float((rebuilt - (w1[name] - w0[name])).abs().max()))
    assert worst < 1e-5


def test_extract_sd2_is_marked_v2(tmp_path):
    parts = build_sd2_components("tiny", seed=1)
    org, tuned = str(tmp_path / "org.safetensors"), str(tmp_path / "tuned.safetensors")
    single_file.write_single_file("sd2", parts, org)
    with torch.no_grad():
        for param in parts["unet"].parameters():
            param.add_(0.05)
    single_file.write_single_file("sd2", parts, tuned)
    out = str(tmp_path / "lora.safetensors")
    argv = ["--model_org", org, "--model_tuned", tuned, "--save_to", out, "--v2", "--v_parameterization"]
    assert extract_lora_from_models.main(argv) == 0
    with safe_open(out, "pt") as f:
        meta, names = f.metadata(), {k.split(".")[0] for k in f.keys()}
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("True", "sd_v2_v")
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v2-768-v")
    # the text encoder did not move: U-Net only, under diffusers names as kohya's SD 2 LoRAs
    assert names and all(n.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"))
                         for n in names)


@pytest.mark.parametrize("folder_fixture, family", [("tiny_sd2_dir", "sd2"), ("tiny_sdxl_dir", "sdxl")])
def test_merge_into_folder_writes_folder_and_single_file(folder_fixture, family, request, tmp_path):
    folder = request.getfixturevalue(folder_fixture)
    base = single_file.load_folder(family, folder)
    lora = str(tmp_path / "lora.safetensors")
    tensors = _random_lora(base, lora, seed=4)
    as_folder, as_file = str(tmp_path / "merged"), str(tmp_path / "merged.safetensors")
    for target in (as_folder, as_file):
        assert merge_lora.main(["--sd_model", folder, "--models", lora, "--ratios", "-0.5", "--save_to", target]) == 0
    want = {layer.name: layer.module.weight.detach() + -0.5 * _by_hand(tensors, layer.name)
            for layer in network_layers(_te(base), base["unet"], False)}
    for merged in (single_file.load_folder(family, as_folder), single_file.load_components(family, as_file)):
        got = {layer.name: layer.module.weight.detach() for layer in network_layers(_te(merged), merged["unet"], False)}
        assert set(got) == set(want)
        assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-5
    assert sorted(os.listdir(as_folder)) == sorted(os.listdir(folder))
