"""networks.lora / networks.base: kohya names and shapes, numerics of the LoRA layer, file round trips,
diffusers interop, optimizer groups, the plug-in loader."""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
from safetensors import safe_open

from library.errors import UserError
from library.models.synthetic import build_sd1_components
from networks import lora as lora_mod
from networks.base import load_network_module, parse_network_args
from networks.lora import LoRAModule, create_network, create_network_from_weights

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------
# Expected SD1.5 module names and shapes, written out from the architecture (not from our code):
# block_out_channels (320, 640, 1280, 1280), 2 layers per block, cross-attention 768, CLIP-L 12 x 768.

SD15_CH = (320, 640, 1280, 1280)
SD15_CROSS = 768
SD15_TIME = 4 * SD15_CH[0]


def _lin(r, i, o):
    return (r, i), (o, r)


def _conv(r, i, o, k):
    return (r, i, k, k), (o, r, 1, 1)


def sd15_transformer_blocks() -> list[tuple[str, int]]:
    """(diffusers path, channels) of all 16 Transformer2DModel blocks of SD1.5."""
    blocks = [(f"down_blocks.{i}.attentions.{j}", SD15_CH[i]) for i in range(3) for j in range(2)]
    blocks.append(("mid_block.attentions.0", SD15_CH[3]))
    rev = tuple(reversed(SD15_CH))
    blocks += [(f"up_blocks.{i}.attentions.{j}", rev[i]) for i in range(1, 4) for j in range(3)]
    return blocks


def sd15_expected(rank: int, conv_rank: int | None = None) -> dict[str, tuple[tuple, tuple]]:
    """kohya LoRA name -> (lora_down shape, lora_up shape) for SD1.5 with this rank (and LoCon rank)."""
    out: dict[str, tuple] = {}
    for path, c in sd15_transformer_blocks():
        p = "lora_unet_" + path.replace(".", "_")
        out[p + "_proj_in"] = _conv(rank, c, c, 1)
        out[p + "_proj_out"] = _conv(rank, c, c, 1)
        t = p + "_transformer_blocks_0_"
        for attn in ("attn1", "attn2"):
            kv_in = c if attn == "attn1" else SD15_CROSS
            out[t + attn + "_to_q"] = _lin(rank, c, c)
            out[t + attn + "_to_k"] = _lin(rank, kv_in, c)
            out[t + attn + "_to_v"] = _lin(rank, kv_in, c)
            out[t + attn + "_to_out_0"] = _lin(rank, c, c)
        out[t + "ff_net_0_proj"] = _lin(rank, c, 8 * c)  # GEGLU: two halves of 4c
        out[t + "ff_net_2"] = _lin(rank, 4 * c, c)
    for layer in range(12):
        p = f"lora_te_text_model_encoder_layers_{layer}_"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + "self_attn_" + proj] = _lin(rank, 768, 768)
        out[p + "mlp_fc1"] = _lin(rank, 768, 3072)
        out[p + "mlp_fc2"] = _lin(rank, 3072, 768)
    if conv_rank:
        out.update(sd15_locon_expected(rank, conv_rank))
    return out


def sd15_resnets() -> list[tuple[str, int, int]]:
    """(path, in channels, out channels) of SD1.5's 22 resnets."""
    res = []
    for i, c in enumerate(SD15_CH):
        for j in range(2):
            res.append((f"down_blocks.{i}.resnets.{j}", SD15_CH[i - 1] if (i > 0 and j == 0) else c, c))
    res += [(f"mid_block.resnets.{j}", SD15_CH[3], SD15_CH[3]) for j in range(2)]
    rev = tuple(reversed(SD15_CH))
    for i, c in enumerate(rev):
        prev = rev[max(i - 1, 0)]
        skip_last = rev[min(i + 1, 3)]
        for j in range(3):
            res_in = prev if j == 0 else c
            skip = skip_last if j == 2 else c
            res.append((f"up_blocks.{i}.resnets.{j}", res_in + skip, c))
    return res


def sd15_locon_expected(rank: int, conv_rank: int) -> dict[str, tuple[tuple, tuple]]:
    out = {}
    for path, cin, cout in sd15_resnets():
        p = "lora_unet_" + path.replace(".", "_")
        out[p + "_conv1"] = _conv(conv_rank, cin, cout, 3)
        out[p + "_conv2"] = _conv(conv_rank, cout, cout, 3)
        out[p + "_time_emb_proj"] = _lin(rank, SD15_TIME, cout)
        if cin != cout:
            out[p + "_conv_shortcut"] = _conv(rank, cin, cout, 1)
    for i in range(3):
        out[f"lora_unet_down_blocks_{i}_downsamplers_0_conv"] = _conv(conv_rank, SD15_CH[i], SD15_CH[i], 3)
        c = tuple(reversed(SD15_CH))[i]
        out[f"lora_unet_up_blocks_{i}_upsamplers_0_conv"] = _conv(conv_rank, c, c, 3)
    return out


@pytest.fixture(scope="module")
def sd15():
    return build_sd1_components("sd15", empty=True)


@pytest.fixture()
def tiny():
    return build_sd1_components("tiny", seed=0)


def file_shapes(path: str) -> dict[str, tuple]:
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def expected_keys(expected: dict[str, tuple[tuple, tuple]]) -> dict[str, tuple]:
    keys = {}
    for name, (down, up) in expected.items():
        keys[name + ".lora_down.weight"] = down
        keys[name + ".lora_up.weight"] = up
        keys[name + ".alpha"] = ()
    return keys


def test_sd15_lora_names_and_shapes(sd15, tmp_path):
    expected = sd15_expected(rank=4)
    assert len(expected) == 264
    assert sum(k.startswith("lora_unet_") for k in expected) == 192
    net = create_network(1.0, 4, 1.0, sd15["vae"], sd15["text_encoder"], sd15["unet"], conv_dim="0")
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == (192, 72)
    net.apply_to(sd15["text_encoder"], sd15["unet"])
    path = str(tmp_path / "sd15.safetensors")
    net.save_weights(path, torch.float16, {"ss_network_dim": "4"})
    shapes = file_shapes(path)
    assert shapes == expected_keys(expected)
    assert shapes["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] == (4, 320, 1, 1)
    assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] == (4, 768)
    assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] == (3072, 4)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        alpha = f.get_tensor("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha")
    assert alpha.dtype == torch.float16 and alpha.item() == 1.0
    assert meta["ss_network_dim"] == "4" and len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8


def test_sd15_locon_names_and_shapes(sd15):
    expected = sd15_expected(rank=8, conv_rank=4)
    locon = sd15_locon_expected(8, 4)
    # 22 resnets x (conv1, conv2, time_emb_proj) + 14 1x1 shortcuts (2 down; all 12 up resnets, which take
    # a skip concatenation) + 3 downsamplers + 3 upsamplers; kohya logs 192 + 86 = 278 U-Net modules.
    assert len(locon) == 22 * 3 + 14 + 6 == 86
    net = create_network(1.0, 8, 4.0, sd15["vae"], sd15["text_encoder"], sd15["unet"], conv_dim="4", conv_alpha="2")
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == expected_keys(expected)
    alphas = {lora.lora_name: lora.alpha.item() for lora in net.loras}
    assert alphas["lora_unet_down_blocks_1_resnets_0_conv1"] == 2.0
    assert alphas["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == 4.0
    assert alphas["lora_unet_up_blocks_0_upsamplers_0_conv"] == 2.0


# ---------------------------------------------------------------------------------------------------
# Block-wise ranks on the SD1.5 architecture (which block holds what: networks/blocks.py).

SD15_TRANSFORMER_BLOCKS = {  # diffusers path -> kohya block
    "down_blocks_0_attentions_0": 1, "down_blocks_0_attentions_1": 2, "down_blocks_1_attentions_0": 4,
    "down_blocks_1_attentions_1": 5, "down_blocks_2_attentions_0": 7, "down_blocks_2_attentions_1": 8,
    "mid_block_attentions_0": 12,
    "up_blocks_1_attentions_0": 16, "up_blocks_1_attentions_1": 17, "up_blocks_1_attentions_2": 18,
    "up_blocks_2_attentions_0": 19, "up_blocks_2_attentions_1": 20, "up_blocks_2_attentions_2": 21,
    "up_blocks_3_attentions_0": 22, "up_blocks_3_attentions_1": 23, "up_blocks_3_attentions_2": 24,
}


def test_sd15_block_dims_alphas_and_conv_block_dims(sd15):
    dims = ",".join(str(i) for i in range(25))  # block i gets rank i (IN00: rank 0, nothing to wrap anyway)
    alphas = ",".join(str(i / 2) for i in range(25))
    conv = ",".join("2" if i in (4, 12, 18) else "0" for i in range(25))
    net = create_network(1.0, 8, 3.0, None, sd15["text_encoder"], sd15["unet"], block_dims=dims,
                         block_alphas=alphas, conv_block_dims=conv)
    got = {lora.lora_name: (lora.lora_dim, lora.alpha.item()) for lora in net.loras}
    for path, block in SD15_TRANSFORMER_BLOCKS.items():
        assert got[f"lora_unet_{path}_proj_in"] == (block, block / 2), path
        assert got[f"lora_unet_{path}_transformer_blocks_0_attn2_to_k"] == (block, block / 2), path
    assert {v for k, v in got.items() if k.startswith("lora_te_")} == {(8, 3.0)}
    # LoCon only where conv_block_dims is not 0 (alpha defaults to 1); the resnets' Linear and 1x1
    # layers follow block_dims in every block.
    assert got["lora_unet_down_blocks_1_resnets_0_conv1"] == (2, 1.0)
    assert got["lora_unet_mid_block_resnets_1_conv2"] == (2, 1.0)
    assert got["lora_unet_up_blocks_1_upsamplers_0_conv"] == (2, 1.0)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" not in got
    assert got["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == (1, 0.5)
    assert got["lora_unet_up_blocks_3_resnets_2_conv_shortcut"] == (24, 12.0)
    # IN04: one resnet's conv1 and conv2; MID: two resnets; OUT05: a resnet and the upsampler
    assert sum(k.endswith(("_conv1", "_conv2", "samplers_0_conv")) for k in got) == 2 + 4 + 3


# ---------------------------------------------------------------------------------------------------
# The LoRA layer's numbers, per layer kind.

LAYERS = {
    "linear": (lambda: torch.nn.Linear(6, 5), (3, 7, 6)),
    "conv1x1": (lambda: torch.nn.Conv2d(6, 5, 1), (2, 6, 4, 4)),
    "conv3x3": (lambda: torch.nn.Conv2d(6, 5, 3, padding=1), (2, 6, 5, 5)),
    "conv3x3_stride2": (lambda: torch.nn.Conv2d(6, 5, 3, stride=2, padding=1), (2, 6, 6, 6)),
}


def independent_delta(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    if down.dim() == 2:
        return up @ down
    return torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_zero_up_then_merged_equals_unmerged(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    base = layer(x)
    merged_layer = copy.deepcopy(layer)
    lora = LoRAModule("lora_x", layer, multiplier=0.7, lora_dim=3, alpha=2.0)
    lora.apply_to()
    assert torch.equal(layer(x), base)  # a fresh LoRA (up = 0) changes nothing
    torch.nn.init.normal_(lora.lora_up.weight)
    with torch.no_grad():
        merged_layer.weight += independent_delta(lora.lora_up.weight, lora.lora_down.weight) * 0.7 * 2.0 / 3
    out = layer(x)
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, merged_layer(x), atol=1e-5, rtol=0)


def _randomize(net, seed=1, std=0.1):
    torch.manual_seed(seed)
    for lora in net.loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=std)


def _run_models(comps, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb = comps["text_encoder"](ids)[0]
        return emb, comps["unet"](latents, torch.tensor([10, 500]), emb).sample


def test_network_forward_equals_merge_from_file(tiny, tmp_path):
    merged = copy.deepcopy(tiny)
    base_emb, base_out = _run_models(tiny)
    net = create_network(1.0, 4, 2.0, None, tiny["text_encoder"], tiny["unet"], conv_dim="2", conv_alpha="3")
    net.apply_to(tiny["text_encoder"], tiny["unet"])
    emb, out = _run_models(tiny)
    assert torch.equal(emb, base_emb) and torch.equal(out, base_out)
    _randomize(net)
    path = str(tmp_path / "locon.safetensors")
    net.save_weights(path, None, None)
    emb, out = _run_models(tiny)
    assert (out - base_out).abs().max() > 1e-3

    net2, sd = create_network_from_weights(1.0, path, None, merged["text_encoder"], merged["unet"],
                                           for_inference=True)
    assert net2.is_mergeable()
    net2.merge_to(merged["text_encoder"], merged["unet"], sd, None, "cpu")
    emb_m, out_m = _run_models(merged)
    torch.testing.assert_close(emb_m, emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_m, out, atol=1e-5, rtol=0)


def test_multiplier_scales_the_change(tiny):
    _, base = _run_models(tiny)
    net = create_network(1.0, 4, 4.0, None, tiny["text_encoder"], tiny["unet"])
    net.apply_to(tiny["text_encoder"], tiny["unet"], apply_text_encoder=False)
    _randomize(net, std=0.01)
    _, full = _run_models(tiny)
    net.set_multiplier(0.0)
    _, off = _run_models(tiny)
    assert (full - base).abs().max() > 1e-4 and torch.equal(off, base)


# ---------------------------------------------------------------------------------------------------
# Files: round trip, shapes inferred from a file, errors.

def test_save_load_round_trip_and_dims_from_file(tiny, tmp_path):
    net = create_network(1.0, 4, 2.0, None, tiny["text_encoder"], tiny["unet"], conv_dim="2", conv_alpha="0.5")
    net.apply_to(tiny["text_encoder"], tiny["unet"])
    _randomize(net)
    path = str(tmp_path / "a.safetensors")
    net.save_weights(path, None, {"ss_note": "x"})

    fresh = build_sd1_components("tiny", seed=0)
    again = create_network(1.0, 4, 2.0, None, fresh["text_encoder"], fresh["unet"], conv_dim="2", conv_alpha="0.5")
    again.apply_to(fresh["text_encoder"], fresh["unet"])
    again.load_weights(path)
    a, b = net.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    shaped, _ = create_network_from_weights(1.0, path, None, fresh["text_encoder"], fresh["unet"])
    want = {lora.lora_name: (lora.lora_dim, lora.alpha.item(), lora.scale) for lora in net.loras}
    got = {lora.lora_name: (lora.lora_dim, lora.alpha.item(), lora.scale) for lora in shaped.loras}
    assert got == want
    assert got["lora_unet_down_blocks_0_resnets_0_conv1"] == (2, 0.5, 0.25)
    assert got["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == (4, 2.0, 0.5)


def test_load_updates_scale_from_file_alpha(tiny, tmp_path):
    net = create_network(1.0, 4, 8.0, None, tiny["text_encoder"], tiny["unet"])
    path = str(tmp_path / "a.safetensors")
    net.save_weights(path, torch.bfloat16, None)
    other = create_network(1.0, 4, 1.0, None, tiny["text_encoder"], tiny["unet"])
    other.load_weights(path)
    assert {lora.scale for lora in other.loras} == {2.0}


def test_load_shape_mismatch_names_the_key(tiny, tmp_path):
    net = create_network(1.0, 4, 1.0, None, tiny["text_encoder"], tiny["unet"])
    path = str(tmp_path / "r4.safetensors")
    net.save_weights(path, None, None)
    other = create_network(1.0, 8, 1.0, None, tiny["text_encoder"], tiny["unet"])
    mismatch = r"lora_te_text_model_encoder_layers_0_\w+\.lora_down\.weight has shape \(4, 32\)"
    with pytest.raises(UserError, match=mismatch):
        other.load_weights(path)
    with pytest.raises(UserError, match="not found"):
        other.load_weights(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        other.load_weights(str(bad))


def test_apply_one_half_only(tiny):
    net = create_network(1.0, 4, 1.0, None, tiny["text_encoder"], tiny["unet"])
    net.apply_to(tiny["text_encoder"], tiny["unet"], apply_text_encoder=False)
    keys = net.state_dict().keys()
    assert len(keys) == 48 * 3 and all(k.startswith("lora_unet_") for k in keys)
    groups, names = net.prepare_optimizer_params(None, None, 1e-4)
    assert names == ["unet"] and groups[0]["lr"] == 1e-4 and len(groups[0]["params"]) == 96


# ---------------------------------------------------------------------------------------------------
# diffusers interop: load_lora_weights takes every key, fuse_lora gives W + up @ down * alpha / dim.

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture()
def diffusers_log():
    """Warnings diffusers logs (its logger does not propagate, so caplog cannot see them)."""
    handler = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def _kohya_name(prefix: str, path: str) -> str:
    if prefix == "lora_te" and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{prefix}_{path}".replace(".", "_")


@pytest.mark.parametrize("conv_dim", [None, "2"])
def test_diffusers_load_and_fuse(tmp_path, diffusers_log, capfd, conv_dim):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from library.tokenizers import clip_tokenizer

    comps = build_sd1_components("tiny", seed=0)
    kwargs = {"conv_dim": conv_dim, "conv_alpha": "3"} if conv_dim else {}
    net = create_network(1.0, 4, 2.0, None, comps["text_encoder"], comps["unet"], **kwargs)
    _randomize(net)
    path = str(tmp_path / "lora.safetensors")
    net.save_weights(path, None, None)
    saved = {lora.lora_name: (lora.lora_up.weight.detach(), lora.lora_down.weight.detach(), lora.scale)
             for lora in net.loras}

    fresh = build_sd1_components("tiny", seed=0)
    roots = {"lora_te": fresh["text_encoder"], "lora_unet": fresh["unet"]}
    base = {prefix: {k: v.clone() for k, v in root.state_dict().items()} for prefix, root in roots.items()}
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=fresh["vae"], text_encoder=fresh["text_encoder"], tokenizer=clip_tokenizer(),
                                   unet=fresh["unet"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    capfd.readouterr()
    pipe.load_lora_weights(path)
    # transformers prints a key report for the text encoder; diffusers logs its own for the UNet.
    assert "UNEXPECTED" not in capfd.readouterr().err
    assert not [r for r in diffusers_log if "unexpected" in r.getMessage().lower()]
    adapted = {_kohya_name(prefix, path): path for prefix, root in roots.items()
               for path, module in root.named_modules() if hasattr(module, "lora_A")}
    assert set(adapted) == set(saved)
    assert len(saved) == (91 if conv_dim else 60)

    pipe.fuse_lora()
    for name, (up, down, scale) in saved.items():
        prefix = "lora_unet" if name.startswith("lora_unet_") else "lora_te"
        module_path = adapted[name]
        weight = roots[prefix].get_submodule(module_path).base_layer.weight
        base_key = module_path.replace("text_model.", "", 1) if prefix == "lora_te" else module_path
        want = base[prefix][base_key + ".weight"] + independent_delta(up, down) * scale
        torch.testing.assert_close(weight.detach(), want, atol=1e-5, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------
# Dropout knobs act only in training mode.

def _single_lora(**kwargs):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    twin = copy.deepcopy(layer)
    lora = LoRAModule("lora_x", layer, 1.0, 4, 4.0, **kwargs)
    torch.nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    plain = LoRAModule("lora_y", twin, 1.0, 4, 4.0)
    plain.load_state_dict(lora.state_dict())
    plain.apply_to()
    return lora, layer, plain


@pytest.mark.parametrize("knob", ["dropout", "rank_dropout", "module_dropout"])
def test_dropout_only_in_training(knob):
    lora, layer, plain = _single_lora(**{knob: 0.5})
    x = torch.randn(16, 8)
    clean = plain.forward(x)
    lora.eval()
    assert torch.equal(layer(x), clean)
    lora.train()
    torch.manual_seed(5)
    outs = [layer(x) for _ in range(8)]
    assert any((o - clean).abs().max() > 1e-3 for o in outs)
    if knob == "module_dropout":  # each call is either the base layer or the full LoRA
        base = lora.org_forward(x)
        assert all(torch.equal(o, base) or torch.equal(o, clean) for o in outs)
        assert any(torch.equal(o, base) for o in outs)


def test_rank_dropout_numbers():
    lora, layer, _ = _single_lora(rank_dropout=0.25)
    x = torch.randn(16, 8)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    mask = (torch.rand(16, 4) > 0.25).float()
    want = lora.org_forward(x) + lora.lora_up(lora.lora_down(x) * mask) * (1.0 / (1 - 0.25))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Optimizer groups, max-norm, arguments, the plug-in loader.

def test_optimizer_groups(tiny):
    net = create_network(1.0, 4, 1.0, None, tiny["text_encoder"], tiny["unet"])
    net.apply_to(tiny["text_encoder"], tiny["unet"])
    groups, names = net.prepare_optimizer_params(5e-5, None, 1e-4)
    assert names == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [5e-5, 1e-4] and [len(g["params"]) for g in groups] == [24, 96]
    groups, names = net.prepare_optimizer_params(0, 2e-4, 1e-4)  # lr 0: the text encoder is left out
    assert names == ["unet"] and groups[0]["lr"] == 2e-4

    plus = create_network(1.0, 4, 1.0, None, tiny["text_encoder"], tiny["unet"], loraplus_lr_ratio="16")
    groups, names = plus.prepare_optimizer_params(None, None, 1e-4)
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-4, 1.6e-3, 1e-4, 1.6e-3]
    assert [len(g["params"]) for g in groups] == [12, 12, 48, 48]


def test_max_norm_regularization(tiny):
    net = create_network(1.0, 4, 4.0, None, tiny["text_encoder"], None)
    _randomize(net, std=1.0)
    before = [lora.get_weight().norm().item() for lora in net.loras]
    scaled, mean, top = net.apply_max_norm_regularization(1.0, "cpu")
    after = [lora.get_weight().norm().item() for lora in net.loras]
    assert scaled == sum(b > 1.0 for b in before) == 12
    assert max(after) == pytest.approx(1.0, abs=1e-5) and top == pytest.approx(1.0, abs=1e-5)


def test_network_args_errors(tiny):
    assert parse_network_args(["conv_dim=4", " conv_alpha = 1 ", "x=a=b"]) == {
        "conv_dim": "4", "conv_alpha": "1", "x": "a=b"}
    assert parse_network_args(None) == {}
    with pytest.raises(UserError, match="'conv_dim' is not of the form key=value"):
        parse_network_args(["conv_dim"])
    te, unet = tiny["text_encoder"], tiny["unet"]
    with pytest.raises(UserError, match=r"unknown key 'conv_dims' \(did you mean conv_dim\?\); valid keys: "
                                        r"conv_dim, conv_alpha, block_dims, .*, block_lr_zero_threshold$"):
        create_network(1.0, 4, 1.0, None, te, unet, conv_dims="4")
    with pytest.raises(UserError, match="conv_dim=four: expected an integer"):
        create_network(1.0, 4, 1.0, None, te, unet, conv_dim="four")
    with pytest.raises(UserError, match=r"rank_dropout=1.5: expected a probability"):
        create_network(1.0, 4, 1.0, None, te, unet, rank_dropout="1.5")
    with pytest.raises(UserError, match=r"block_dims: expected 25 comma-separated values \(IN00-IN11, MID, "
                                        r"OUT00-OUT11\), got 2"):
        create_network(1.0, 4, 1.0, None, te, unet, block_dims="2,2")


def test_load_network_module(monkeypatch):
    assert load_network_module("networks.lora") is lora_mod
    for name in ("lycoris", "lycoris.kohya"):  # another test may have imported it already
        monkeypatch.setitem(sys.modules, name, None)
    hint = r"^--network_module lycoris.kohya: module not found \(pip install lycoris-lora\?\)$"
    with pytest.raises(UserError, match=hint):
        load_network_module("lycoris.kohya")
    with pytest.raises(UserError, match="no_such_module_xyz: module not found"):
        load_network_module("no_such_module_xyz")
    with pytest.raises(UserError, match="json: the module has no create_network"):
        load_network_module("json")
