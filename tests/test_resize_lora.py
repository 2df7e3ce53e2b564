"""library/lora_rank.py and tools/resize_lora.py: singular values from the factors equal those of the full
delta, kohya's rank rules on hand-made singular values, resized files that load and hold the best rank-k
approximation, kohya's metadata, one-line errors."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.lora_rank import choose_rank, dynamic_rank, factor_svd, resize_layer, resize_state_dict
from library.models.synthetic import build_sd1_components
from library.saving import precalculate_safetensors_hashes
from networks.lora import create_network, create_network_from_weights
from tools import resize_lora

torch.set_num_threads(1)


def exact_delta(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up @ down in float64, convs flattened to (o, i*k*k)."""
    return up.double().flatten(1) @ down.double().flatten(1)


def best_rank_k(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The best rank-k approximation of a delta (convs flattened) by full SVD, and its Frobenius fraction."""
    flat = delta.double().flatten(1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    approx = (u[:, :k] * s[:k]) @ vh[:k]
    return approx.reshape(delta.shape), float(s[:k].norm() / s.norm())


def test_factor_svd_equals_the_full_svd_and_the_layer_keeps_its_scale():
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 6, 1, 1, generator=gen), torch.randn(6, 5, 3, 3, generator=gen)
    delta = exact_delta(up, down)
    u, s, vh = factor_svd(up, down)
    full = torch.linalg.svdvals(delta)
    assert s.shape == (6,) and torch.allclose(s, full[:6], rtol=1e-10)
    assert float(full[6:].max()) < 1e-10 * float(full[0])  # kohya's further singular values are zero
    assert torch.allclose((u * s) @ vh, delta, atol=1e-10)

    layer = resize_layer("conv", up, down, alpha=3.0, cap=2)  # scale 3 / 6 = 0.5
    approx, fro = best_rank_k(delta, 2)
    assert (layer.new_rank, layer.alpha) == (2, 1.0)  # alpha / rank stays 0.5
    assert layer.up.shape == (40, 2, 1, 1) and layer.down.shape == (2, 5, 3, 3)
    assert abs(layer.fro_retained - fro) < 1e-6
    assert torch.allclose(exact_delta(layer.up, layer.down) * layer.alpha / 2, approx * 0.5, atol=1e-5)


def test_a_layer_without_alpha_has_scale_one_and_a_zero_layer_keeps_rank_one():
    gen = torch.Generator().manual_seed(1)
    sd = {"lora_unet_a.lora_down.weight": torch.randn(4, 12, generator=gen),
          "lora_unet_a.lora_up.weight": torch.randn(9, 4, generator=gen),
          "lora_unet_b.lora_down.weight": torch.randn(4, 12, generator=gen),
          "lora_unet_b.lora_up.weight": torch.zeros(9, 4), "lora_unet_b.alpha": torch.tensor(2.0)}
    out, layers = resize_state_dict(sd, 3, 3, progress=False)
    assert [(x.name, x.new_rank, x.alpha) for x in layers] == [("lora_unet_a", 3, 3.0), ("lora_unet_b", 1, 0.5)]
    assert out["lora_unet_b.lora_up.weight"].abs().sum() == 0 and out["lora_unet_a.alpha"].item() == 3.0


S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("method, param, rank", [
    # sv_ratio: values strictly above 10 / param
    ("sv_ratio", 4.0, 2), ("sv_ratio", 5.0, 2), ("sv_ratio", 5.1, 3), ("sv_ratio", 20.0, 4), ("sv_ratio", 0.5, 1),
    # sv_cumulative: sum 18.5, running fractions .541 .811 .919 .973 1
    ("sv_cumulative", 0.5, 1), ("sv_cumulative", 0.8, 2), ("sv_cumulative", 0.95, 4), ("sv_cumulative", 1.0, 5),
    # sv_fro: squares sum 130.25, running fractions .768 .960 .990 .998 1 against param ** 2
    ("sv_fro", 0.9, 2), ("sv_fro", 0.99, 3), ("sv_fro", 0.5, 1), ("sv_fro", 0.999, 4),
])
def test_dynamic_rank_follows_kohyas_rules(method, param, rank):
    assert dynamic_rank(S, method, param) == rank
    assert choose_rank(S, 8, method, param) == rank
    assert choose_rank(S, 2, method, param) == min(rank, 2)  # --new_rank caps it


def test_fixed_rank_is_capped_by_the_layer_and_a_zero_layer_gets_one():
    assert choose_rank(S, 3) == 3 and choose_rank(S, 9) == 5
    assert choose_rank(torch.zeros(4, dtype=torch.float64), 3, "sv_fro", 0.9) == 1


# ---------------------------------------------------------------------------------------------------
# Files

@pytest.fixture(scope="module")
def tiny():
    return build_sd1_components("tiny", seed=0)


@pytest.fixture(scope="module")
def locon_file(tiny, tmp_path_factory):
    """A tiny-SD1 LoCon (rank 8, conv rank 4, alphas 4 / 2) with random up weights, as networks.lora saves it."""
    net = create_network(1.0, 8, 4.0, None, tiny["text_encoder"], tiny["unet"], conv_dim="4", conv_alpha="2")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in net.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.3 if "up" in name else 1.0))
    path = str(tmp_path_factory.mktemp("resize") / "locon.safetensors")
    net.save_weights(path, None, {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_training_comment": "hello"})
    with safe_open(path, "pt") as f:
        return path, {k: f.get_tensor(k) for k in f.keys()}


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def layer_names(sd):
    return [k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")]


def test_resized_file_loads_and_holds_the_best_approximation(locon_file, tiny, tmp_path, capsys):
    src, before = locon_file
    out = str(tmp_path / "small.safetensors")
    assert resize_lora.main(["--model", src, "--save_to", out, "--new_rank", "3", "--new_conv_rank", "2",
                             "--verbose"]) == 0
    after, meta = read(out)
    names = layer_names(before)
    fractions = []
    for name in names:
        down, up, alpha = (before[f"{name}.{k}"] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
        k = 2 if down.dim() == 4 else 3
        approx, fro = best_rank_k(exact_delta(up, down), k)
        fractions.append(fro)
        new_down, new_up = after[f"{name}.lora_down.weight"], after[f"{name}.lora_up.weight"]
        assert new_down.shape[0] == k
        assert after[f"{name}.alpha"].item() == pytest.approx(alpha.item() * k / down.shape[0])
        got = exact_delta(new_up, new_down) * after[f"{name}.alpha"].item() / k
        assert torch.allclose(got, approx * alpha.item() / down.shape[0], atol=1e-4), name

    net, _ = create_network_from_weights(1.0, out, None, tiny["text_encoder"], tiny["unet"])
    net.load_weights(out)
    assert {lora.lora_name: lora.lora_dim for lora in net.unet_loras + net.text_encoder_loras} == {
        name: after[f"{name}.lora_down.weight"].shape[0] for name in names}

    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == str(after[f"{names[-1]}.alpha"].item())
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 3 (conv: 2); hello"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == precalculate_safetensors_hashes(after, meta)

    printed = capsys.readouterr().out.splitlines()
    assert sum(" | sum(S) retained: " in line for line in printed) == len(names)
    average = [line for line in printed if line.startswith("Average Frobenius norm retention:")]
    assert average == [f"Average Frobenius norm retention: {sum(fractions) / len(fractions):.2%} | "
                       f"std: {torch.tensor(fractions).std(correction=0).item():0.3f}"]


def test_reported_fractions_and_dynamic_ranks_match_the_full_delta(locon_file, tmp_path):
    from library.lora_rank import resize_file

    src, before = locon_file
    out = str(tmp_path / "dyn.safetensors")
    layers = resize_file(src, out, new_rank=6, method="sv_fro", param=0.9, save_precision="fp16")
    after, meta = read(out)
    assert {v.dtype for v in after.values()} == {torch.float16}
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"] == "Dynamic resize with sv_fro: 0.9 from 8; hello"
    for layer in layers:
        s = torch.linalg.svdvals(exact_delta(before[f"{layer.name}.lora_up.weight"],
                                             before[f"{layer.name}.lora_down.weight"]))
        kept = [float(s[:k].norm() / s.norm()) for k in range(1, len(s) + 1)]
        want = min(6, next(k for k, f in enumerate(kept, 1) if f >= 0.9))  # smallest rank reaching 90 %
        assert layer.new_rank == want and after[f"{layer.name}.lora_down.weight"].shape[0] == want
        assert abs(layer.fro_retained - kept[want - 1]) < 1e-4
    assert len({layer.new_rank for layer in layers}) > 1  # the rule gives different ranks here


def test_a_dylora_file_is_resized(locon_file, tmp_path):
    _, before = locon_file
    src = str(tmp_path / "dylora.safetensors")
    save_file(before, src, {"ss_network_module": "networks.dylora", "ss_network_args": '{"unit": "4"}'})
    out = str(tmp_path / "cut.safetensors")
    assert resize_lora.main(["--model", src, "--save_to", out, "--new_rank", "1"]) == 0
    after, _ = read(out)
    assert {v.shape[0] for k, v in after.items() if k.endswith("lora_down.weight")} == {1}


def _bad_files(tmp_path, src):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    loha = str(tmp_path / "loha.safetensors")
    save_file({"lora_unet_a.hada_w1_a": torch.ones(8, 2), "lora_unet_a.hada_w1_b": torch.ones(2, 8),
               "lora_unet_a.hada_w2_a": torch.ones(8, 2), "lora_unet_a.hada_w2_b": torch.ones(2, 8),
               "lora_unet_a.alpha": torch.tensor(1.0)}, loha)
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"pickle")
    return {"garbage": str(garbage), "loha": loha, "ckpt": str(ckpt)}


@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"),
    ("garbage", "not a readable safetensors file"),
    ("loha", "holds a loha network"),
    ("ckpt", "pickled"),
    ("same", "is the --model file"),
    ("no_param", "needs --dynamic_param"),
    ("rank0", "--new_rank 0"),
    ("bad_ext", "--save_to"),
    ("fro_above_one", "in (0, 1]"),
])
def test_bad_input_is_one_line_and_writes_nothing(locon_file, tmp_path, capsys, case, message):
    src, _ = locon_file
    files = _bad_files(tmp_path, src)
    out = str(tmp_path / "out.safetensors")
    argv = {"missing": ["--model", str(tmp_path / "nope.safetensors")],
            "garbage": ["--model", files["garbage"]], "loha": ["--model", files["loha"]],
            "ckpt": ["--model", files["ckpt"]], "same": ["--model", src, "--save_to", src],
            "no_param": ["--model", src, "--dynamic_method", "sv_fro"],
            "rank0": ["--model", src, "--new_rank", "0"], "bad_ext": ["--model", src, "--save_to", out + ".txt"],
            "fro_above_one": ["--model", src, "--dynamic_method", "sv_fro", "--dynamic_param", "1.5"]}[case]
    if "--save_to" not in argv:
        argv += ["--save_to", out]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert resize_lora.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
