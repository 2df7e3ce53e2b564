"""library/extract.py and tools/extract_lora_from_models.py: a known low-rank change to every LoRA layer of
the tiny model is recovered exactly, loads in networks.lora and reproduces the tuned model; kohya's clamp,
min_diff and metadata; bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.extract import clamp_factors, low_rank
from library.models.sd1 import SD1Family
from library.models.synthetic import write_sd1_single_file
from library.saving import precalculate_safetensors_hashes
from networks.lora import create_network_from_weights, lora_delta
from networks.targets import network_layers
from tools import extract_lora_from_models as tool

torch.set_num_threads(1)
RANK = 2  # rank of the change made to every layer


def _load(path):
    unet, vae, text_encoder, _ = SD1Family.load_folder_components(path)
    return unet, vae, text_encoder


def _add_low_rank_changes(text_encoder, unet, te_scale: float, seed: int = 5) -> dict[str, torch.Tensor]:
    """Add a rank-2 change to every LoRA / LoCon layer's weight (text encoder ones times te_scale)."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for layer in network_layers(text_encoder, unet, with_conv=True):
        weight = layer.module.weight
        rows, cols = weight.shape[0], weight[0].numel()
        delta = (torch.randn(rows, RANK, generator=gen) @ torch.randn(RANK, cols, generator=gen)) * 0.05
        delta = delta.reshape(weight.shape) * (1.0 if layer.is_unet else te_scale)
        with torch.no_grad():
            weight += delta
        deltas[layer.name] = delta
    return deltas


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tmp_path_factory):
    """(tuned single file, {layer: the change added}) with the text encoder changed too."""
    unet, vae, text_encoder = _load(tiny_model_dir)
    deltas = _add_low_rank_changes(text_encoder, unet, te_scale=1.0)
    path = str(tmp_path_factory.mktemp("tuned") / "tuned.safetensors")
    write_sd1_single_file(dict(unet=unet, vae=vae, text_encoder=text_encoder), path)
    return path, deltas


def _run(org, tuned_path, out, *extra) -> int:
    return tool.main(["--model_org", org, "--model_tuned", tuned_path, "--save_to", str(out), *extra])


def _file_deltas(path) -> dict[str, torch.Tensor]:
    sd = load_file(path)
    names = {k.split(".")[0] for k in sd}
    return {n: lora_delta(sd[n + ".lora_up.weight"], sd[n + ".lora_down.weight"],
                          float(sd[n + ".alpha"]) / sd[n + ".lora_down.weight"].shape[0]) for n in names}


@pytest.fixture(scope="module")
def locon_file(tiny_model_dir, tuned, tmp_path_factory):
    out = tmp_path_factory.mktemp("extracted") / "locon.safetensors"
    assert _run(tiny_model_dir, tuned[0], out, "--dim", "4", "--conv_dim", "3", "--clamp_quantile", "1") == 0
    return str(out)


def test_locon_extraction_recovers_every_change(tuned, locon_file):
    got = _file_deltas(locon_file)
    deltas = tuned[1]
    assert set(got) == set(deltas)
    for name, delta in deltas.items():
        assert torch.allclose(got[name], delta, atol=1e-4), name
    sd = load_file(locon_file)
    conv = next(n for n in deltas if deltas[n].dim() == 4 and deltas[n].shape[-1] == 3)
    assert sd[conv + ".lora_down.weight"].shape[0] == 3 and float(sd[conv + ".alpha"]) == 3.0
    assert float(sd["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 4.0
    with safe_open(locon_file, "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3.0"}
    assert meta["modelspec.title"] == "locon" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == precalculate_safetensors_hashes(sd, meta)


def test_extracted_lora_on_the_original_gives_the_tuned_outputs(tiny_model_dir, locon_file):
    unet, _, text_encoder = _load(tiny_model_dir)
    t_unet, _, t_text = _load(tiny_model_dir)
    _add_low_rank_changes(t_text, t_unet, te_scale=1.0)  # the same seeded changes as the tuned file
    network, sd = create_network_from_weights(1.0, locon_file, None, text_encoder, unet)
    network.apply_to(text_encoder, unet)
    network.load_state_dict(sd)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 77), generator=gen)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
    with torch.no_grad():
        states, t_states = text_encoder(ids)[0], t_text(ids)[0]
        assert torch.allclose(states, t_states, atol=1e-4)
        out = unet(latents, 10, states).sample
        t_out = t_unet(latents, 10, t_states).sample
    assert (out - t_out).abs().max() < 1e-4
    untouched = _load(tiny_model_dir)[0](latents, 10, t_states).sample.detach()
    assert (untouched - t_out).abs().max() > 1e-2  # the change is large enough for the check to mean something


def test_text_encoder_left_out_below_min_diff(tiny_single_file, tiny_model_dir, tmp_path):
    unet, vae, text_encoder = _load(tiny_model_dir)
    deltas = _add_low_rank_changes(text_encoder, unet, te_scale=0.01)
    te_max = max(float(d.abs().max()) for n, d in deltas.items() if n.startswith("lora_te"))
    assert 0.001 < te_max < 0.01
    tuned_path = str(tmp_path / "tuned_te_small.safetensors")
    write_sd1_single_file(dict(unet=unet, vae=vae, text_encoder=text_encoder), tuned_path)
    out = tmp_path / "unet_only.safetensors"
    assert _run(tiny_single_file, tuned_path, out, "--dim", "2", "--save_precision", "fp16") == 0
    sd = load_file(out)
    assert sd and not any(k.startswith("lora_te") for k in sd)
    assert all(v.dtype == torch.float16 for v in sd.values())
    # plain LoRA: the transformer layers only, no resnet layers
    assert {k.split(".")[0] for k in sd} == {n for n in deltas if "attentions" in n}
    out2 = tmp_path / "with_te.safetensors"
    assert _run(tiny_single_file, tuned_path, out2, "--dim", "2", "--min_diff", "0.001",
                "--clamp_quantile", "1") == 0
    got = _file_deltas(out2)
    name = "lora_te_text_model_encoder_layers_1_self_attn_k_proj"
    assert torch.allclose(got[name], deltas[name], atol=1e-5)


def test_clamp_is_kohyas_signed_quantile():
    up = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    down = torch.tensor([[5.0, -6.0, 7.0], [-8.0, 9.0, 10.0]])
    # joined values sorted: -8 -6 -4 -2 1 3 5 7 9 10; the 0.5 quantile is (1 + 3) / 2 = 2
    c_up, c_down = clamp_factors(up, down, 0.5)
    assert torch.equal(c_up, torch.tensor([[1.0, -2.0], [2.0, -2.0]]))
    assert torch.equal(c_down, torch.tensor([[2.0, -2.0, 2.0], [-2.0, 2.0, 2.0]]))
    assert clamp_factors(up, down, 1.0) == (up, down)


def test_randomized_svd_recovers_low_rank_and_is_near_optimal():
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(300, 3, generator=gen) @ torch.randn(3, 200, generator=gen)
    up, down = low_rank(exact, 4)
    assert up.shape == (300, 4) and down.shape == (4, 200)
    assert torch.allclose(up @ down, exact, atol=1e-4)
    # a decaying spectrum: the sketch's rank-8 error is within 1% of the optimal (full SVD) one
    u, _ = torch.linalg.qr(torch.randn(300, 100, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(200, 100, generator=gen))
    mat = u * 0.8 ** torch.arange(100.0) @ v.T
    err = torch.linalg.norm(mat - torch.matmul(*low_rank(mat, 8)))
    best = torch.linalg.norm(mat - torch.matmul(*low_rank(mat, 8, full_svd=True)))
    assert best > 0.1 and err <= 1.01 * best
    assert torch.equal(torch.matmul(*low_rank(mat, 8)), torch.matmul(*low_rank(mat, 8)))  # seeded


@pytest.mark.parametrize("extra, message", [
    (["--v2"], "is an SD 1.x model, but --v2 was given"),
    (["--sdxl"], "is an SD 1.x model, but --sdxl was given"),
    (["--dim", "0"], "--dim 0"),
    (["--clamp_quantile", "0"], "--clamp_quantile 0"),
    (["--save_to", "x.ckpt"], ".safetensors"),
])
def test_bad_flags_are_one_line_errors(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out.safetensors"
    argv = ["--model_org", tiny_model_dir, "--model_tuned", tiny_model_dir, "--save_to", str(out), *extra]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not os.listdir(tmp_path)


def test_bad_files_are_one_line_errors(tiny_single_file, tmp_path, capsys):
    lora = tmp_path / "a_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3)}, str(lora))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(open(tiny_single_file, "rb").read())
    before = copy.read_bytes()
    cases = [(str(lora), str(tmp_path / "o1.safetensors"), str(lora)),
             (str(junk), str(tmp_path / "o2.safetensors"), str(junk)),
             (str(tmp_path / "missing"), str(tmp_path / "o3.safetensors"), "missing"),
             (str(copy), str(copy), "--save_to")]
    for model, out, message in cases:
        assert _run(tiny_single_file, model, out) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
        assert not os.path.exists(out) or out == str(copy)
    assert copy.read_bytes() == before
