"""kohya's LoRA key names on the real SD 1.5, SD 2.x and SDXL architectures (built with empty weights).

kohya names SD 1.x / 2.x U-Net layers by their diffusers path and SDXL's by the original (LDM) layout it
trains SDXL in; every part of sdtune that creates, loads, merges or inspects networks uses the same names.

Counts with the default targets: SD1 72 text-encoder + 192 U-Net layers, SD2 138 + 192, SDXL 72 (lora_te1_)
+ 192 (lora_te2_) + 722 U-Net. With LoCon (conv_dim) kohya also wraps the resnets' convs, their
time-embedding Linear and 1x1 shortcuts, and the samplers: SD1 86 more (22 resnets x 3 + 14 shortcuts + 6
samplers = 278 U-Net layers); SDXL 66 more (17 resnets x 3 + 11 shortcuts + 4 samplers = 788).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from library.lora_convert import diffusers_to_ldm_path, kohya_layer_to_path, ldm_to_diffusers_path
from networks import blocks, detect, dylora, lora, lycoris_compat
from networks.targets import is_sdxl_unet, network_layers, unet_paths

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def real(family: str) -> dict:
    """The real architecture of `family`, empty (meta) weights: {"unet", "text_encoders"}."""
    if family == "sd1":
        from library.models.synthetic import build_sd1_components

        comps = build_sd1_components("sd15", empty=True)
        return {"unet": comps["unet"], "text_encoders": [comps["text_encoder"]]}
    if family == "sd2":
        from library.models.synthetic import build_sd2_components

        comps = build_sd2_components("sd2", empty=True)
        return {"unet": comps["unet"], "text_encoders": [comps["text_encoder"]]}
    from library.models.synthetic_sdxl import build_sdxl_components

    comps = build_sdxl_components("sdxl", empty=True)
    return {"unet": comps["unet"], "text_encoders": [comps["text_encoder"], comps["text_encoder_2"]]}


def _te(models: dict):
    encoders = models["text_encoders"]
    return encoders[0] if len(encoders) == 1 else encoders


def _counts(names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        prefix = re.match(r"lora_(unet|te\d?)_", name).group(1)
        counts[prefix] = counts.get(prefix, 0) + 1
    return counts


@pytest.mark.parametrize("family, want", [
    ("sd1", {"te": 72, "unet": 192}),
    ("sd2", {"te": 138, "unet": 192}),
    ("sdxl", {"te1": 72, "te2": 192, "unet": 722}),
])
def test_default_targets_count_as_kohya(family, want):
    models = real(family)
    network = lora.create_network(1.0, 1, 1, None, _te(models), models["unet"])
    names = [m.lora_name for m in network.loras]
    assert _counts(names) == want
    # the saved keys: three per layer, under kohya's suffixes
    keys = set(network.state_dict())
    assert keys == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert is_sdxl_unet(models["unet"]) == (family == "sdxl")


@pytest.mark.parametrize("family, unet", [("sd1", 278), ("sd2", 278), ("sdxl", 788)])
def test_locon_counts(family, unet):
    models = real(family)
    layers = network_layers(_te(models), models["unet"], with_conv=True)
    assert sum(layer.is_unet for layer in layers) == unet
    spatial = sum(layer.is_spatial_conv for layer in layers)
    # SD1 / SD2: 22 resnets x 2 3x3 convs + 6 samplers; SDXL: 17 x 2 + 4
    assert spatial == {"sd1": 50, "sd2": 50, "sdxl": 38}[family]


SDXL_NAMES = (
    "lora_te1_text_model_encoder_layers_11_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_31_mlp_fc2",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
    "lora_unet_output_blocks_0_1_proj_in",
    "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
)
SDXL_CONV_NAMES = (
    "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_input_blocks_1_0_emb_layers_1",
    "lora_unet_input_blocks_4_0_skip_connection",
    "lora_unet_input_blocks_3_0_op",
    "lora_unet_input_blocks_6_0_op",
    "lora_unet_middle_block_2_out_layers_3",
    "lora_unet_output_blocks_2_2_conv",
    "lora_unet_output_blocks_5_2_conv",
    "lora_unet_output_blocks_8_0_skip_connection",
)


def test_sdxl_names_are_kohyas():
    models = real("sdxl")
    plain = {layer.name for layer in network_layers(models["text_encoders"], models["unet"], with_conv=False)}
    locon = {layer.name for layer in network_layers(models["text_encoders"], models["unet"], with_conv=True)}
    assert set(SDXL_NAMES) <= plain and not set(SDXL_CONV_NAMES) & plain
    assert set(SDXL_NAMES) | set(SDXL_CONV_NAMES) <= locon
    # no diffusers path is left in an SDXL U-Net name
    unet = [n for n in locon if n.startswith("lora_unet_")]
    assert not [n for n in unet if re.search(r"down_blocks|up_blocks|mid_block|resnets|attentions|samplers", n)]
    assert len(unet) == len(set(unet)) == 788
    # the two SDXL upsamplers sit in slot 2 (after an attention), no sampler in slot 1
    assert sorted(n for n in unet if n.endswith("_conv") and "output_blocks" in n) == [
        "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv"]


def test_sd2_names_stay_diffusers_paths():
    models = real("sd2")
    names = {layer.name for layer in network_layers(_te(models), models["unet"], with_conv=True)}
    assert "lora_te_text_model_encoder_layers_22_mlp_fc2" in names
    assert "lora_te_text_model_encoder_layers_23_mlp_fc2" not in names
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names  # a Linear in SD2 (linear projection)
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_down_blocks_2_downsamplers_0_conv" in names
    assert unet_paths(models["unet"]) == {}


def test_dylora_uses_the_same_names():
    models = real("sdxl")
    ours = [m.lora_name for m in lora.create_network(1.0, 2, 1, None, models["text_encoders"], models["unet"],
                                                       conv_dim=2).loras]
    theirs = [m.lora_name for m in dylora.create_network(1.0, 2, 1, None, models["text_encoders"], models["unet"],
                                                           unit=1, conv_dim=2).loras]
    assert theirs == ours and len(ours) == 72 + 192 + 788


def test_lycoris_locon_uses_the_same_names():
    models = real("sdxl")
    ours = {m.lora_name for m in lora.create_network(1.0, 1, 1, None, models["text_encoders"], models["unet"],
                                                       conv_dim=1).loras}
    network = lycoris_compat.create_network(1.0, 1, 1, None, models["text_encoders"], models["unet"], algo="locon",
                                            conv_dim=1, preset="unet-convblock-only")
    theirs_conv = {m.lora_name for m in network.unet_loras}
    network = lycoris_compat.create_network(1.0, 1, 1, None, models["text_encoders"], models["unet"], algo="locon",
                                            preset="attn-mlp")
    theirs = {m.lora_name for m in network.text_encoder_loras + network.unet_loras} | theirs_conv
    # lycoris' presets also wrap conv_in / conv_out and the time / size embeddings (TimestepEmbedding):
    # named by the original layout too, as diffusers' kohya loader expects
    assert theirs - ours == {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0",
                             "lora_unet_time_embed_2", "lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2"}
    assert ours - theirs == set()
    assert len(theirs) == 72 + 192 + 788 + 6


def test_block_dims_and_lr_weights_on_a_real_sdxl_lora():
    models = real("sdxl")
    dims = ",".join(str(1 + i % 4) for i in range(23))
    network = lora.create_network(1.0, 4, 1, None, models["text_encoders"], models["unet"], block_dims=dims,
                                  down_lr_weight="1,1,1,1,0.5,0.5,0.5,0.5,0", mid_lr_weight="2,2,2",
                                  up_lr_weight="0,0,0,1,1,1,1,1,1")
    ranks = {m.lora_name: m.lora_dim for m in network.unet_loras}
    # input_blocks_4 is block 5, middle_block_1 block 11, output_blocks_5 block 18
    assert ranks["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == 1 + 5 % 4
    assert ranks["lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"] == 1 + 11 % 4
    assert ranks["lora_unet_output_blocks_5_1_proj_in"] == 1 + 18 % 4
    # weight 0 for output_blocks 0-2 and input_blocks_8: those layers are not created at all (kohya's rule)
    assert not [n for n in ranks if re.match(r"lora_unet_(output_blocks_[012]|input_blocks_8)_", n)]
    assert len(ranks) == 722 - 4 * (10 * 10 + 2)
    groups, names = network.prepare_optimizer_params(None, 1.0, 1.0)
    lrs = dict(zip(names, (g["lr"] for g in groups)))
    assert lrs == {"textencoder": 1.0, "unet_block5": 0.5, "unet_block6": 0.5, "unet_block8": 0.5,
                   "unet_block11": 2.0, "unet_block16": 1.0, "unet_block17": 1.0, "unet_block18": 1.0}
    assert blocks.layout_of(ranks).sdxl
    # kohya's numbering of the layers around the blocks (LyCORIS' presets wrap them)
    assert [blocks.block_index(f"lora_unet_{n}") for n in ("time_embed_0", "label_emb_0_2", "input_blocks_0_0",
                                                           "middle_block_2_in_layers_2", "out_2")] == [0, 0, 1, 12, 22]


def test_detect_reads_an_sdxl_locon():
    models = real("sdxl")
    network = lora.create_network(1.0, 2, 1, None, models["text_encoders"], models["unet"], conv_dim=1)
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    found = detect.detect_algorithm(shapes)
    assert (found.algo, found.text_encoder_layers, found.unet_layers) == ("locon", 264, 788)
    assert (found.ranks, found.conv_ranks) == ((2,), (1,))


@pytest.mark.parametrize("size", ["tiny", "sdxl"])
def test_sdxl_names_convert_to_diffusers_paths_and_back(size):
    from library.models.synthetic_sdxl import build_sdxl_components

    unet = build_sdxl_components(size, empty=True)["unet"]
    per_block = unet.config.layers_per_block
    up_attention = tuple(i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind)
    paths = unet_paths(unet)
    layers = network_layers(None, unet, with_conv=True)
    module_path = {id(m): p for p, m in unet.named_modules()}
    assert layers
    for layer in layers:
        path = module_path[id(layer.module)]
        assert layer.name == "lora_unet_" + paths[path].replace(".", "_")
        assert kohya_layer_to_path(layer.name, per_block) == ("unet", path)
        assert ldm_to_diffusers_path(paths[path], per_block) == path
        assert diffusers_to_ldm_path(path, per_block, up_attention) == paths[path]
