"""tools/convert_lora.py: kohya <-> diffusers (peft) keys, bit-exact both ways, alphas kept, loadable by diffusers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.lora_convert import kohya_layer_to_path, path_to_kohya_layer
from library.models.synthetic import build_sd1_components
from library.saving import add_model_hashes, save_safetensors
from networks import lora
from tools import convert_lora

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory) -> tuple[str, dict]:
    """A LoCon (linear rank 4, conv rank 2) with random weights and an alpha per layer in 1, 2, 3, written as
    networks.lora writes it (fp32, sshs hashes)."""
    comps = build_sd1_components("tiny", seed=0)
    network = lora.create_network(1.0, 4, 1, None, comps["text_encoder"], comps["unet"], conv_dim=2, conv_alpha=1)
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for i, (key, value) in enumerate(sorted(network.state_dict().items())):
        sd[key] = (torch.tensor(float(1 + i % 3)) if key.endswith(".alpha")
                   else torch.randn(value.shape, generator=gen) * 0.1)
    path = str(tmp_path_factory.mktemp("kohya") / "lora.safetensors")
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_output_name": "lora"}
    save_safetensors(sd, path, add_model_hashes(sd, meta))
    return path, sd


def _convert(src, dst, to, *extra):
    return convert_lora.main(["--src_path", str(src), "--dst_path", str(dst), "--dst", to, *extra])


def test_names_map_both_ways():
    for layer, want in [
        ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0",
         ("unet", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0")),
        ("lora_unet_up_blocks_1_resnets_2_time_emb_proj", ("unet", "up_blocks.1.resnets.2.time_emb_proj")),
        ("lora_unet_mid_block_resnets_0_conv_shortcut", ("unet", "mid_block.resnets.0.conv_shortcut")),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
         ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj")),
        ("lora_te_text_model_encoder_layers_11_self_attn_out_proj",
         ("text_encoder", "text_model.encoder.layers.11.self_attn.out_proj")),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc2", ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc2")),
    ]:
        assert kohya_layer_to_path(layer) == want
        assert path_to_kohya_layer(*want, sdxl=layer.startswith("lora_te2")) == layer


def test_round_trip_is_bit_exact(kohya_file, tmp_path):
    src, sd = kohya_file
    diffusers_path, back = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    assert _convert(src, diffusers_path, "diffusers") == 0
    converted = load_file(diffusers_path)
    assert len(converted) == len(sd) - len([k for k in sd if k.endswith(".alpha")])
    assert all(k.startswith(("unet.", "text_encoder.text_model.")) and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in converted)
    assert _convert(diffusers_path, back, "kohya") == 0
    again = load_file(back)
    assert again.keys() == sd.keys()
    for key, value in sd.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key
    with safe_open(src, "pt") as a, safe_open(str(back), "pt") as b:
        # same tensors, same ss_* metadata: the recomputed hashes equal the original ones
        assert b.metadata() == a.metadata() | {"format": "pt"}


def test_diffusers_loads_the_converted_file_exactly(kohya_file, tiny_model_dir, tmp_path, capfd):
    from diffusers import StableDiffusionPipeline

    src, sd = kohya_file
    path = tmp_path / "d.safetensors"
    assert _convert(src, path, "diffusers") == 0
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (config["unet.r"], config["text_encoder.r"]) == (4, 4)
    assert set(config["unet.rank_pattern"].values()) == {2}  # the LoCon layers

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    base = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path))
    assert not [str(w.message) for w in caught if "did not match" in str(w.message)]
    assert "UNEXPECTED" not in capfd.readouterr().err
    adapted = {(name, p) for name, m in models.items() for p, sub in m.named_modules() if hasattr(sub, "lora_A")}
    layers = {k.partition(".")[0] for k in sd}
    assert len(adapted) == len(layers)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for layer in layers:
        name, module = kohya_layer_to_path(layer)
        module = module.removeprefix("text_model.") if name == "text_encoder" else module
        down, up = sd[f"{layer}.lora_down.weight"], sd[f"{layer}.lora_up.weight"]
        scale = sd[f"{layer}.alpha"].item() / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale
        fused = models[name].state_dict()[f"{module}.weight"]
        torch.testing.assert_close(fused, base[name][f"{module}.weight"] + delta, atol=2e-6, rtol=0, msg=layer)


def test_diffusers_file_without_config_gets_alpha_equal_rank(tmp_path):
    src = tmp_path / "peft.safetensors"
    save_file({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(3, 8, dtype=torch.float16),
               "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(8, 3, dtype=torch.float16)}, str(src))
    assert _convert(src, tmp_path / "k.safetensors", "kohya") == 0
    out = load_file(tmp_path / "k.safetensors")
    alpha = out["lora_unet_mid_block_attentions_0_proj_in.alpha"]
    assert alpha.dtype == torch.float16 and alpha.item() == 3.0


def test_refusals_write_nothing(kohya_file, tmp_path, capsys):
    src, _ = kohya_file
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.ones(2, 2)}, str(loha))
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep")
    cases = [((loha, tmp_path / "o.safetensors", "diffusers"), "LoHa, LoKr"),
             ((src, src, "diffusers"), "is the input file"),
             ((src, taken, "diffusers"), "already exists"),
             ((src, tmp_path / "o.safetensors", "kohya"), "already in kohya format"),
             ((src, tmp_path / "o.ckpt", "diffusers"), "ending in .safetensors")]
    for args, message in cases:
        assert _convert(*args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loha.safetensors", "taken.safetensors"]
    assert taken.read_bytes() == b"keep"
