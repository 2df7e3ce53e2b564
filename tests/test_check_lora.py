"""tools/check_lora_weights.py and tools/show_metadata.py: statistics, verdicts, exit codes, one-line errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from library.lora_inspect import check_file, inspect_state_dict, layer_verdict, tensor_stats
from library.models.synthetic import build_sd1_components
from library.saving import save_safetensors
from networks import dylora, lora, lycoris_compat
from tools import check_lora_weights, show_metadata

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def comps():
    return build_sd1_components("tiny", seed=0)


def _state(network, seed: int | None = 1) -> dict[str, torch.Tensor]:
    """The network's tensors, every parameter moved off its initial value unless seed is None."""
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in network.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def _lora(comps, seed=1, **kwargs):
    return _state(lora.create_network(1.0, 4, 1, None, comps["text_encoder"], comps["unet"], **kwargs), seed)


def _lycoris(comps, algo, seed=1):
    """A LyCORIS network on copies of the models (applying it patches the layers it wraps)."""
    text_encoder, unet = copy.deepcopy(comps["text_encoder"]), copy.deepcopy(comps["unet"])
    network = lycoris_compat.create_network(1.0, 4, 1, None, text_encoder, unet, algo=algo)
    network.apply_to(text_encoder, unet, True, True)
    return _state(network, seed)


def test_tensor_stats_by_hand():
    stats = tensor_stats("x", torch.tensor([0.0, -1.0, 2.0, float("nan"), 3.0], dtype=torch.float16))
    assert (stats.mean_abs, stats.min_abs, stats.zeros, stats.nonfinite, stats.numel) == (1.5, 0.0, 1, 1, 5)
    assert stats.line() == "x,(5),1.5,0,zeros=1/5,nan_inf=1"


def test_verdict_rules():
    def stats(**tensors):
        return {k.replace("_w", ".w"): tensor_stats(k, v) for k, v in tensors.items()}

    ok = stats(lora_up_weight=torch.ones(4, 2), lora_down_weight=torch.ones(2, 4))
    assert layer_verdict("a", ok).verdict == "ok"
    # alpha 0 is a scalar, not a factor: it never makes the layer untrained
    assert layer_verdict("a", {**ok, "alpha": tensor_stats("alpha", torch.tensor(0.0))}).verdict == "ok"
    up = torch.ones(4, 2)
    up[0, 0] = 0  # 1 exact zero in 16 factor values: above 1 %
    assert layer_verdict("a", stats(lora_up_weight=up, lora_down_weight=torch.ones(2, 4))).reason == \
        "1 of 16 values exactly zero"
    untrained = layer_verdict("a", stats(lora_up_weight=torch.zeros(4, 2), lora_down_weight=torch.ones(2, 4)))
    assert (untrained.verdict, untrained.reason) == ("untrained", "all zero: lora_up.weight")
    up[1, 1] = math.inf
    assert layer_verdict("a", stats(lora_up_weight=up, lora_down_weight=torch.ones(2, 4))).verdict == "broken"


@pytest.mark.parametrize("kind", ["lora", "locon", "dylora", "loha", "lokr"])
def test_fresh_networks_are_untrained_and_trained_ones_ok(comps, kind):
    def build(seed):
        if kind in ("loha", "lokr"):
            return _lycoris(comps, kind, seed)
        if kind == "dylora":
            net = dylora.create_network(1.0, 4, 1, None, comps["text_encoder"], comps["unet"], unit=2)
            return _state(net, seed)
        return _lora(comps, seed, **({"conv_dim": 2, "conv_alpha": 1} if kind == "locon" else {}))

    fresh, trained = inspect_state_dict(build(None)), inspect_state_dict(build(1))
    assert len(fresh.layers) == len(trained.layers) > 0
    assert fresh.counts["untrained"] == len(fresh.layers)
    assert trained.counts["ok"] == len(trained.layers)
    assert trained.algo == {"dylora": "lora"}.get(kind, kind)  # DyLoRA is told apart by its metadata only
    assert not trained.broken


def test_cli_reports_broken_and_underflowed_layers(comps, tmp_path, capsys):
    sd = _lora(comps)
    layers = sorted({k.partition(".")[0] for k in sd})
    sd[f"{layers[0]}.lora_down.weight"][0, 0] = float("nan")
    sd[f"{layers[1]}.lora_up.weight"] *= 2e-6  # fp16 flushes the smallest of these (below 3e-8) to zero
    half = {k: v.half() for k, v in sd.items()}
    path = str(tmp_path / "bad.safetensors")
    save_safetensors(half, path, {"ss_network_module": "networks.lora"})

    assert check_lora_weights.main([path]) == 1
    out = capsys.readouterr().out.splitlines()
    n_weights = sum(k.endswith(("lora_up.weight", "lora_down.weight")) for k in sd)
    assert out[0] == f"number of LoRA weight tensors: {n_weights}"
    assert len([line for line in out if ",(" in line]) == n_weights  # no alpha lines without -s
    assert out[-1] == f"lora network, {len(layers)} layers: 1 broken, 1 underflowed, {len(layers) - 2} ok"
    assert out[-3].startswith(f"broken: {layers[0]} (NaN/inf in lora_down.weight)")
    assert out[-2].startswith(f"underflowed: {layers[1]} (")

    assert check_lora_weights.main([path, "-s"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"number of all tensors: {len(sd)}"
    assert len([line for line in out if ",(" in line]) == len(sd)  # each tensor once (kohya lists them twice)
    assert len([line for line in out if line.startswith("ok: ")]) == len(layers) - 2


def test_clean_file_exits_zero(comps, tmp_path, capsys):
    path = str(tmp_path / "ok.safetensors")
    save_safetensors(_lycoris(comps, "loha"), path)
    assert check_lora_weights.main(["--show_all", path]) == 0  # kohya's flag abbreviated, as argparse allows
    assert check_file(path).counts["ok"] == len(check_file(path).layers)
    assert capsys.readouterr().out.splitlines()[-1].startswith("loha network, ")


@pytest.mark.parametrize("content, message", [
    (b"not a safetensors file at all", "not a readable safetensors file"),
    (None, "file not found"),
])
def test_bad_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    for tool in (check_lora_weights, show_metadata):
        assert tool.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_check_refuses_pickles_and_files_without_layers(tmp_path, capsys):
    pickled = tmp_path / "x.ckpt"
    pickled.write_bytes(b"")
    assert check_lora_weights.main([str(pickled)]) == 2
    assert "pickled" in capsys.readouterr().err
    other = str(tmp_path / "model.safetensors")
    save_safetensors({"conv.weight": torch.ones(2)}, other)
    assert check_lora_weights.main([other]) == 2
    assert "holds no network layers" in capsys.readouterr().err


def test_show_metadata_expands_json_values(tmp_path, capsys):
    tags = {"10_cat": {"cat": 3, "a photo": 1}}
    meta = {"ss_tag_frequency": json.dumps(tags), "ss_network_dim": "4", "ss_training_comment": "[not json",
            "ss_network_args": json.dumps({"conv_dim": "2"})}
    path = str(tmp_path / "m.safetensors")
    save_safetensors({"a": torch.zeros(1)}, path, meta)
    assert show_metadata.main([path]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"ss_tag_frequency": tags, "ss_network_dim": "4", "ss_training_comment": "[not json",
                     "ss_network_args": {"conv_dim": "2"}}
