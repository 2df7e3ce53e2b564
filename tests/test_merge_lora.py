"""tools/merge_lora.py and tools/svd_merge_lora.py (library/merging.py): merges are exact sums of deltas."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library import merging
from library.saving import precalculate_safetensors_hashes
from networks import lora as lora_net
from tools import merge_lora, svd_merge_lora

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    """Two random LoRA files for the tiny model: a LoCon (rank 4, alpha 2, conv 2/3) and a LoRA (rank 2, alpha 1)."""
    model = merging.load_checkpoint(tiny_model_dir)
    comps = {"text_encoder": model.text_encoder, "unet": model.unet}
    folder = tmp_path_factory.mktemp("loras")
    paths = []
    for seed, (dim, alpha, extra) in enumerate([(4, 2.0, {"conv_dim": "2", "conv_alpha": "3"}), (2, 1.0, {})]):
        net = lora_net.create_network(1.0, dim, alpha, None, comps["text_encoder"], comps["unet"], **extra)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in net.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        path = str(folder / f"net{seed}.safetensors")
        net.save_weights(path, None, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
        paths.append(path)
    return paths


def deltas(path: str) -> dict[str, torch.Tensor]:
    return merging.lora_deltas(load_file(path))


def expected_sum(paths: list[str], ratios: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, ratio in zip(paths, ratios):
        for name, delta in deltas(path).items():
            total[name] = total.get(name, 0) + ratio * delta
    return total


def assert_deltas_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= atol, name


def test_concat_merge_is_the_exact_sum_with_negative_ratio(loras, tmp_path):
    out = str(tmp_path / "merged.safetensors")
    assert merge_lora.main(["--models", *loras, "--ratios", "0.7", "-0.3", "--save_to", out]) == 0
    sd = load_file(out)
    assert sd[f"{ATTN}.lora_down.weight"].shape == (6, 32)  # ranks 4 + 2 stacked
    assert sd[f"{ATTN}.alpha"].item() == 6.0
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv}.lora_down.weight"].shape[0] == 2  # only the LoCon file has 3x3 layers
    assert_deltas_close(deltas(out), expected_sum(loras, [0.7, -0.3]))
    with safe_open(out, framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == precalculate_safetensors_hashes(sd, meta)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.merged_from"] == "net0:0.7, net1:-0.3"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}


def test_kohya_average_adds_factors_not_deltas(loras, tmp_path):
    out = str(tmp_path / "avg.safetensors")
    first = loras[0]
    # kohya: up = (|0.3| + |0.3|) up, down = (0.3 + 0.3) down, so the delta is 0.36 delta, not 0.3 + 0.3 = 0.6
    assert merge_lora.main(["--models", first, first, "--ratios", "0.3", "0.3", "--kohya_average",
                            "--save_to", out]) == 0
    up, down, scale = merging.lora_factors(load_file(first))[ATTN]
    want = lora_net.lora_delta(up, down, scale) * 0.36
    assert (deltas(out)[ATTN] - want).abs().max().item() <= 1e-6
    assert load_file(out)[f"{ATTN}.alpha"].item() == 2.0  # the first file's alpha


def test_svd_merge_exact_at_full_rank_and_optimal_below(loras, tmp_path):
    out = str(tmp_path / "svd.safetensors")
    assert svd_merge_lora.main(["--models", *loras, "--ratios", "1", "-0.5", "--new_rank", "6",
                                "--new_conv_rank", "2", "--save_to", out]) == 0
    want = expected_sum(loras, [1.0, -0.5])
    assert_deltas_close(deltas(out), want)
    assert load_file(out)[f"{ATTN}.alpha"].item() == 6.0

    assert svd_merge_lora.main(["--models", *loras, "--ratios", "1", "-0.5", "--new_rank", "1",
                                "--save_to", out]) == 0
    singular = torch.linalg.svdvals(want[ATTN])
    residual = (deltas(out)[ATTN] - want[ATTN]).norm().item()
    assert math.isclose(residual, singular[1:].norm().item(), rel_tol=1e-4)  # Eckart-Young


def test_lbw_slots_and_block_weights(loras, tmp_path):
    assert merging.lbw_slot("lora_te_text_model_encoder_layers_0_mlp_fc1") == 0
    assert merging.lbw_slot(ATTN) == 2  # IN01
    assert merging.lbw_slot("lora_unet_down_blocks_1_downsamplers_0_conv") == 7  # IN06
    assert merging.lbw_slot("lora_unet_mid_block_attentions_0_proj_in") == 13
    assert merging.lbw_slot("lora_unet_up_blocks_1_attentions_2_proj_out") == 19  # OUT05
    out = str(tmp_path / "lbw.safetensors")
    # 17 values: BASE (text encoder) 0, IN01 0.5, the rest 1
    lbw = json.dumps([0, 0.5] + [1] * 15)
    assert svd_merge_lora.main(["--models", loras[1], "--lbws", lbw, "--new_rank", "2", "--save_to", out]) == 0
    got, src = deltas(out), deltas(loras[1])
    te = next(name for name in src if name.startswith("lora_te"))
    assert got[te].abs().max().item() == 0.0
    assert (got[ATTN] - 0.5 * src[ATTN]).abs().max().item() <= 1e-5


@torch.no_grad()
def outputs(text_encoder, unet):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49406, (1, 77), generator=gen)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    emb = text_encoder(ids)[0]
    return emb, unet(latents, torch.tensor([500]), emb).sample


def test_merge_into_single_file_equals_unmerged_network(loras, tiny_single_file, tmp_path):
    out = str(tmp_path / "model.safetensors")
    assert merge_lora.main(["--sd_model", tiny_single_file, "--models", loras[0], "--ratios", "-0.6",
                            "--save_to", out]) == 0
    base = merging.load_checkpoint(tiny_single_file)
    net, _ = lora_net.create_network_from_weights(-0.6, loras[0], None, base.text_encoder, base.unet)
    net.load_weights(loras[0])
    net.apply_to(base.text_encoder, base.unet)
    merged = merging.load_checkpoint(out)
    for got, want in zip(outputs(merged.text_encoder, merged.unet), outputs(base.text_encoder, base.unet)):
        assert (got - want).abs().max().item() <= 1e-5
    src, dst = load_file(tiny_single_file), load_file(out)
    assert sorted(src) == sorted(dst)
    vae_key = next(k for k in src if k.startswith("first_stage_model."))
    assert torch.equal(src[vae_key], dst[vae_key])


def test_merge_two_into_folder_adds_both_deltas(loras, tiny_model_dir, tmp_path):
    out = str(tmp_path / "merged_model")
    assert merge_lora.main(["--sd_model", tiny_model_dir, "--models", *loras, "--ratios", "0.7", "-0.3",
                            "--save_to", out]) == 0
    base, merged = merging.load_checkpoint(tiny_model_dir), merging.load_checkpoint(out)
    want = expected_sum(loras, [0.7, -0.3])
    before = merging.model_layers(base.text_encoder, base.unet)
    after = merging.model_layers(merged.text_encoder, merged.unet)
    for name, delta in want.items():
        assert (after[name].weight - before[name].weight - delta).abs().max().item() <= 1e-6, name
    untouched = "conv_in"
    assert torch.equal(dict(base.unet.named_parameters())[f"{untouched}.weight"],
                       dict(merged.unet.named_parameters())[f"{untouched}.weight"])


@pytest.mark.parametrize("algo", ["loha", "lokr", "ia3", "full"])
def test_merge_lycoris_into_model_equals_unmerged(tiny_model_dir, tmp_path, algo):
    from networks import lycoris_compat

    base = merging.load_checkpoint(tiny_model_dir)
    net = lycoris_compat.create_network(1.0, 4, 2, None, base.text_encoder, base.unet, algo=algo)
    net.apply_to(base.text_encoder, base.unet, True, True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    path = str(tmp_path / f"{algo}.safetensors")
    net.save_weights(path, None, {})
    out = str(tmp_path / "model.safetensors")
    assert merge_lora.main(["--sd_model", tiny_model_dir, "--models", path, "--ratios", "0.8",
                            "--save_to", out]) == 0
    net.set_multiplier(0.8)
    merged = merging.load_checkpoint(out)
    for got, want in zip(outputs(merged.text_encoder, merged.unet), outputs(base.text_encoder, base.unet)):
        assert (got - want).abs().max().item() <= 1e-5
    # LyCORIS files cannot be concatenated or SVD-merged yet: a one-line error, nothing written
    svd_out = str(tmp_path / "svd.safetensors")
    assert svd_merge_lora.main(["--models", path, "--save_to", svd_out]) == 2
    assert not os.path.exists(svd_out)


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "1", "2"], "--ratios: 2 ratios for 1 --models"),
    (["--save_to", "{model}"], "is one of the inputs"),
    (["--kohya_average", "--models", "{model}", "{other}"], "needs equal ranks"),
    (["--shuffle"], "not supported yet: --shuffle"),
])
def test_bad_input_is_one_line_error(loras, tmp_path, capsys, argv, message):
    out = str(tmp_path / "x.safetensors")
    argv = [a.format(model=loras[0], other=loras[1]) for a in argv]
    full = (["--models", loras[0]] if "--models" not in argv else []) + argv
    if "--save_to" not in argv:
        full += ["--save_to", out]
    assert merge_lora.main(full) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: ") and message in err
    assert not os.path.exists(out)


def test_wrong_files_are_refused(tiny_single_file, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert svd_merge_lora.main(["--models", tiny_single_file, "--save_to", out]) == 2
    assert "holds no network layers" in capsys.readouterr().err
    # a kohya-format LoRA written by hand whose layer is 40 wide where the tiny model's is 32
    wrong = str(tmp_path / "wrong.safetensors")
    save_file({f"{ATTN}.lora_down.weight": torch.ones(2, 40), f"{ATTN}.lora_up.weight": torch.ones(32, 2),
               f"{ATTN}.alpha": torch.tensor(2.0)}, wrong)
    assert merge_lora.main(["--sd_model", tiny_single_file, "--models", wrong, "--save_to", out]) == 2
    assert f"{ATTN} has shape (32, 40)" in capsys.readouterr().err
    assert not os.path.exists(out)
