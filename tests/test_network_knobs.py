"""Network knobs: block-wise ranks and learning rates, max-norm, ranks from a file, base weights merged
before training, and the text encoder's epoch limit."""

from __future__ import annotations

import logging
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.config import parse_args
from library.errors import UserError
from library.methods import NetworkMethod, merge_base_weights
from library.models import load_model
from library.models.synthetic import build_sd1_components
from library.trainer import Run
from networks import blocks
from networks import lora as lora_mod
from networks.base import PluginModule, PluginNetwork
from networks.lora import LoRANetwork, create_network, lora_delta
from tests.conftest import files_under, train_argv
from tests.test_lora_network import _run_models

torch.set_num_threads(1)


@pytest.fixture()
def tiny():
    return build_sd1_components("tiny", seed=0)


# ---------------------------------------------------------------------------------------------------
# Which block a layer is in: kohya's numbering, written out from the LDM U-Net (not from our code).

@pytest.mark.parametrize("name, index", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 1),                    # IN01
    ("lora_unet_down_blocks_0_resnets_1_conv1", 2),                         # IN02
    ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),                     # IN03
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k", 8),
    ("lora_unet_down_blocks_3_resnets_0_time_emb_proj", 10),                # IN10
    ("lora_unet_mid_block_attentions_0_proj_out", 12),                      # MID
    ("lora_unet_mid_block_resnets_1_conv2", 12),
    ("lora_unet_up_blocks_0_resnets_0_conv1", 13),                          # OUT00
    ("lora_unet_up_blocks_0_upsamplers_0_conv", 15),                        # OUT02 holds the upsampler
    ("lora_unet_up_blocks_1_attentions_0_proj_in", 16),                     # OUT03
    ("lora_unet_up_blocks_2_upsamplers_0_conv", 21),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", 24),  # OUT11
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", -1),
    ("lora_unet_input_blocks_4_1_proj_in", 5),                              # SDXL names: 23 blocks
    ("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q", 11),
    ("lora_unet_output_blocks_8_0_conv1", 21),
])
def test_block_index(name, index):
    assert blocks.block_index(name) == index


def test_layout_from_names():
    assert blocks.layout_of(["lora_unet_down_blocks_0_attentions_0_proj_in"]).num_blocks == 25
    sdxl = blocks.layout_of(["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_input_blocks_4_1_proj_in"])
    assert (sdxl.num_blocks, sdxl.num_updown, sdxl.num_mid) == (23, 9, 3)


# ---------------------------------------------------------------------------------------------------
# Learning-rate weights: presets, lists, the zero threshold.

def test_presets():
    assert blocks.preset_weights("linear", 12) == [i / 11 for i in range(12)]
    assert blocks.preset_weights("reverse_linear", 12)[0] == 1.0
    assert blocks.preset_weights("zeros+0.5", 12) == [0.5] * 12
    sine = blocks.preset_weights("sine", 12)
    assert sine[0] == 0.0 and sine[11] == 1.0 and sine[3] == pytest.approx(0.415415, abs=1e-6)  # sin(3/22 pi)
    assert blocks.preset_weights("cosine", 12) == sine[::-1]
    assert blocks.preset_weights("sine+0.25", 9)[8] == 1.25
    with pytest.raises(UserError, match="one of cosine, sine, linear, reverse_linear, zeros"):
        blocks.preset_weights("tangent", 12)
    with pytest.raises(UserError, match="after '\\+' must be a number"):
        blocks.preset_weights("sine+x", 12)


def test_lr_weights_lists_and_threshold(caplog):
    layout = blocks.Layout(sdxl=False)
    kwargs = {"down_lr_weight": "0,1,0.4,0.2", "mid_lr_weight": "0.5", "up_lr_weight": "sine",
              "block_lr_zero_threshold": "0.3"}
    with caplog.at_level(logging.WARNING):
        weights = blocks.block_lr_weights(kwargs, layout)
    assert "down_lr_weight: 4 values, the last 8 blocks get weight 1" in caplog.text
    s = [math.sin(math.pi / 22 * i) for i in range(12)]
    # IN00-IN11 (padded with 1), MID, OUT00-OUT11; at or under 0.3 -> 0
    assert weights == pytest.approx([0, 1, 0.4, 0] + [1] * 8 + [0.5] + [0, 0, 0] + s[3:], abs=1e-12)
    # A list that is not given stays at 1 whatever the threshold; empty entries are 0 (kohya)
    assert blocks.block_lr_weights({"mid_lr_weight": "0.5", "block_lr_zero_threshold": "2"}, layout) == \
        [1.0] * 12 + [0.0] + [1.0] * 12
    assert blocks.block_lr_weights({"up_lr_weight": "1,,1"}, layout)[13:16] == [1.0, 0.0, 1.0]
    assert blocks.block_lr_weights({}, layout) is None
    sdxl = blocks.block_lr_weights({"mid_lr_weight": "0.5,0.5,0.5"}, blocks.Layout(sdxl=True))
    assert sdxl == [1.0] * 10 + [0.5] * 3 + [1.0] * 10
    with pytest.raises(UserError, match="down_lr_weight=1,a: expected numbers separated by commas or one of"):
        blocks.block_lr_weights({"down_lr_weight": "1,a"}, layout)


def test_block_lr_weights_make_groups_and_drop_blocks(tiny):
    te, unet = tiny["text_encoder"], tiny["unet"]
    # the tiny U-Net has layers in blocks 1, 3, 4, 12, 13-17 (with LoCon); see test_lr_weights_lists_and_threshold
    net = create_network(1.0, 4, 1.0, None, te, unet, conv_dim="2", down_lr_weight="0,1,0.4,0.2",
                         mid_lr_weight="0.5", up_lr_weight="sine", block_lr_zero_threshold="0.3")
    present = sorted({blocks.block_index(lora.lora_name) for lora in net.unet_loras})
    assert present == [1, 4, 12, 16, 17]  # blocks weighted 0 get no layers, so they are not saved either
    groups, names = net.prepare_optimizer_params(5e-5, 1e-3, 1e-4)
    assert names == ["textencoder", "unet_block1", "unet_block4", "unet_block12", "unet_block16", "unet_block17"]
    sin = [math.sin(math.pi / 22 * i) for i in range(12)]
    assert [g["lr"] for g in groups] == pytest.approx([5e-5, 1e-3, 1e-3, 5e-4, 1e-3 * sin[3], 1e-3 * sin[4]])
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in net.parameters()}

    plus = create_network(1.0, 4, 1.0, None, te, unet, mid_lr_weight="0.5", loraplus_unet_lr_ratio="4")
    groups, names = plus.prepare_optimizer_params(None, None, 1e-4)
    assert names[:3] == ["textencoder", "unet_block1", "unet_block1 plus"]
    assert dict(zip(names, [g["lr"] for g in groups]))["unet_block12 plus"] == pytest.approx(2e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"block_dims": "4," * 24 + "x"}, "block_dims=.*: expected 25 integers separated by commas"),
    ({"block_alphas": "1,2"}, r"block_alphas: expected 25 comma-separated values \(IN00-IN11, MID, OUT00-OUT11\)"),
    ({"block_dims": "4," * 24 + "-1"}, "values must not be negative"),
    ({"conv_block_alphas": "1," * 24 + "1"}, "conv_block_alphas needs conv_block_dims or conv_dim"),
    ({"up_lr_weight": "sines"}, "lr weight 'sines': give 12 numbers separated by commas or one of"),
])
def test_block_args_errors(tiny, kwargs, message):
    with pytest.raises(UserError, match=message):
        create_network(1.0, 4, 1.0, None, tiny["text_encoder"], tiny["unet"], **kwargs)


# ---------------------------------------------------------------------------------------------------
# Max-norm regularisation on hand-made layers.

def test_max_norm_numbers(tiny):
    net = create_network(1.0, 4, 4.0, None, tiny["text_encoder"], None)  # 12 Linear layers, scale 1
    first, second = net.loras[0], net.loras[1]
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_down.weight.zero_()
        first.lora_up.weight[0, 0], first.lora_down.weight[0, 1] = 3.0, 4.0  # delta has one entry: 12
        second.lora_up.weight[0, 0], second.lora_down.weight[0, 0] = 1.0, 2.0  # norm 2: under the bound
        down_before = second.lora_down.weight.clone()
    scaled, mean, top = net.apply_max_norm_regularization(6.0, "cpu")
    assert (scaled, top) == (1, pytest.approx(6.0)) and mean == pytest.approx((6.0 + 2.0) / 12)
    # up and down shrink alike, by sqrt(6 / 12)
    assert first.lora_up.weight[0, 0].item() == pytest.approx(3 * 0.5 ** 0.5)
    assert first.lora_down.weight[0, 1].item() == pytest.approx(4 * 0.5 ** 0.5)
    assert first.get_weight().norm().item() == pytest.approx(6.0)
    assert torch.equal(second.lora_down.weight, down_before)
    # a frozen layer is reported but left alone
    first.requires_grad_(False)
    with torch.no_grad():
        first.lora_up.weight[0, 0] = 30.0
    assert net.apply_max_norm_regularization(6.0, "cpu")[0] == 0 and first.lora_up.weight[0, 0].item() == 30.0


# ---------------------------------------------------------------------------------------------------
# --base_weights: merged into the models before training; equal to applying the networks unmerged.

def _random_lora_file(comps, path, seed, **kwargs) -> str:
    net = create_network(1.0, 4, 2.0, None, comps["text_encoder"], comps["unet"], **kwargs)
    torch.manual_seed(seed)
    for lora in net.loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.05)
    net.save_weights(str(path), None, None)
    return str(path)


def test_base_weights_merge_equals_unmerged_networks(tiny, tmp_path):
    a = _random_lora_file(tiny, tmp_path / "a.safetensors", 1, conv_dim="2")
    b = _random_lora_file(tiny, tmp_path / "b.safetensors", 2)
    merged = build_sd1_components("tiny", seed=0)
    cfg = SimpleNamespace(base_weights=[a, b], base_weights_multiplier=[0.5], network_module="networks.lora")
    family = SimpleNamespace(vae=None, unet=merged["unet"])
    merge_base_weights(PluginModule(lora_mod, "networks.lora"), cfg, family, merged["text_encoder"])

    applied = build_sd1_components("tiny", seed=0)
    for path, multiplier in ((a, 0.5), (b, 1.0)):  # the second file has no multiplier: 1
        net, _ = lora_mod.create_network_from_weights(multiplier, path, None, applied["text_encoder"],
                                                      applied["unet"])
        net.apply_to(applied["text_encoder"], applied["unet"])
        net.load_weights(path)
    emb, out = _run_models(merged)
    emb_ref, out_ref = _run_models(applied)
    assert (out - _run_models(build_sd1_components("tiny", seed=0))[1]).abs().max() > 1e-3
    torch.testing.assert_close(emb, emb_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)


def test_run_merges_base_weights_and_takes_dims_from_weights(tiny_model_dir, demo_data, tmp_path, tiny):
    base = _random_lora_file(tiny, tmp_path / "base.safetensors", 1)
    start = _random_lora_file(tiny, tmp_path / "start.safetensors", 2, conv_dim="3", conv_alpha="1.5")
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, demo_data, str(out), "--base_weights", base, "--base_weights_multiplier",
                      "0.5", "--dim_from_weights", "--network_weights", start, "--network_dim", "16")
    run = Run(parse_args(argv), NetworkMethod)

    # ranks and alphas per layer from the file, not --network_dim; its weights loaded
    network = run.method.module
    want = load_file(start)
    got = network.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert network.lora_unet_down_blocks_0_resnets_0_conv1.lora_dim == 3
    assert network.lora_unet_down_blocks_0_attentions_0_proj_in.lora_dim == 4

    # the base model holds W + 0.5 * up @ down * alpha / rank
    plain = load_model(parse_args(train_argv(tiny_model_dir, demo_data, str(out))))
    sd = load_file(base)
    name, path = "lora_unet_down_blocks_0_attentions_0_proj_in", "down_blocks.0.attentions.0.proj_in.weight"
    delta = lora_delta(sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"], 0.5 * 2.0 / 4)
    torch.testing.assert_close(run.family.unet.state_dict()[path], plain.unet.state_dict()[path] + delta,
                               atol=1e-6, rtol=0)
    assert not files_under(out)


@pytest.mark.parametrize("extra, message", [
    (["--base_weights", "missing.safetensors"], "missing.safetensors: network weights file not found"),
    (["--dim_from_weights"], "--dim_from_weights needs --network_weights"),
    (["--scale_weight_norms", "-1"], "--scale_weight_norms -1.0: must be positive"),
    (["--text_encoder_train_epochs", "0"], "--text_encoder_train_epochs 0: must be at least 1"),
])
def test_knob_errors_write_nothing(tiny_model_dir, demo_data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert train_network.main(train_argv(tiny_model_dir, demo_data, str(out), *extra)) == 2
    assert message in capsys.readouterr().err
    assert not files_under(out)


def test_network_without_max_norm_is_refused(tiny, monkeypatch):
    monkeypatch.delattr(LoRANetwork, "apply_max_norm_regularization")
    cfg = SimpleNamespace(scale_weight_norms=1.0, network_module="my.net", text_encoder_train_epochs=None)
    method = NetworkMethod.__new__(NetworkMethod)
    method.cfg = cfg
    method.network = PluginNetwork(create_network(1.0, 4, 1.0, None, tiny["text_encoder"], None), "my.net")
    with pytest.raises(UserError, match="--network_module my.net has no apply_max_norm_regularization"):
        method._check_network_options()


# ---------------------------------------------------------------------------------------------------
# --text_encoder_train_epochs with --scale_weight_norms, end to end.

def test_text_encoder_stops_after_its_epochs(tiny_model_dir, demo_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data" / "1_shapes"
    data.mkdir(parents=True)
    for stem in ("shape_00", "shape_01"):  # two 64x64 images: 2 steps per epoch at batch 1
        for ext in (".png", ".caption"):
            shutil.copy(os.path.join(demo_data, "10_shapes", stem + ext), data)
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = train_argv(tiny_model_dir, str(data.parent), str(out), "--train_batch_size", "1",
                      "--max_train_epochs", "3", "--save_every_n_epochs", "1", "--text_encoder_train_epochs", "1",
                      "--optimizer_args", "weight_decay=0.5", "--scale_weight_norms", "0.02",
                      "--logging_dir", str(logs))
    assert train_network.main(argv) == 0
    files = [load_file(out / name) for name in ("lora-000001.safetensors", "lora-000002.safetensors",
                                                "lora.safetensors")]
    te_keys = [k for k in files[0] if k.startswith("lora_te_")]
    unet_up = [k for k in files[0] if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert te_keys and unet_up
    assert any(files[0][k].abs().sum() > 0 for k in te_keys if k.endswith("lora_up.weight"))  # it did train
    for k in te_keys:  # frozen after epoch 1: bit for bit, despite weight decay and max-norm
        assert torch.equal(files[0][k], files[1][k]) and torch.equal(files[1][k], files[2][k]), k
    for before, after in zip(files, files[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in unet_up)

    (run_dir,) = os.listdir(logs)
    acc = EventAccumulator(str(logs / run_dir / "network_train"))
    acc.Reload()
    scaled = [e.value for e in acc.Scalars("max_norm/keys_scaled")]
    top = [e.value for e in acc.Scalars("max_norm/max_key_norm")]
    assert len(scaled) == 6 and max(scaled) > 0 and max(top) == pytest.approx(0.02, rel=1e-4)
    assert all(v <= 0.02 * (1 + 1e-4) for v in (e.value for e in acc.Scalars("max_norm/average_key_norm")))
