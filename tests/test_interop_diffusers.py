"""Interop with the loaders people use, offline: diffusers reads every LoRA / LoCon / DyLoRA file that
train_network.py writes, and sdtune reads files in sd-scripts' own format."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

import train_network
from library.config import parse_args
from library.methods import NetworkMethod
from library.models import load_model
from library.models.synthetic import build_sd1_components
from library.trainer import Run
from networks import dylora, lora
from tests.conftest import load_fuse_and_compare, train_argv

torch.set_num_threads(1)

TRAINED = {
    "lora": ("--network_module", "networks.lora"),
    "locon": ("--network_module", "networks.lora", "--network_args", "conv_dim=2", "conv_alpha=1"),
    "dylora": ("--network_module", "networks.dylora", "--network_dim", "6", "--network_args", "unit=2",
               "conv_dim=4", "conv_alpha=3"),
}
MODULES = {"networks.lora": lora, "networks.dylora": dylora}


@pytest.fixture(scope="module")
def trained_files(tiny_model_dir, demo_data, tmp_path_factory) -> dict[str, str]:
    """One file per network kind, trained 2 steps with the text encoder."""
    files = {}
    for kind, args in TRAINED.items():
        out = tmp_path_factory.mktemp(kind)
        argv = train_argv(tiny_model_dir, demo_data, str(out), "--max_train_steps", "2", *args)
        assert train_network.main(argv) == 0
        files[kind] = str(out / "lora.safetensors")
    return files


def _sdtune_deltas(kind: str, path: str) -> dict[tuple[str, str], torch.Tensor]:
    """(model, module path) -> the weight change sdtune's own network applies for this file."""
    module = MODULES[TRAINED[kind][1]]
    comps = build_sd1_components("tiny", seed=0)
    network, _ = module.create_network_from_weights(1.0, path, None, comps["text_encoder"], comps["unet"])
    network.load_weights(path)
    paths = {id(m): (model, p) for model in ("text_encoder", "unet") for p, m in comps[model].named_modules()}
    return {paths[id(layer.org_module)]: layer.get_weight(1.0).detach() for layer in network.loras}


@pytest.mark.parametrize("kind", sorted(TRAINED))
def test_diffusers_consumes_every_key_and_fuses_our_delta(kind, trained_files, tiny_model_dir, capfd):
    from diffusers import StableDiffusionPipeline

    path = trained_files[kind]
    deltas = _sdtune_deltas(kind, path)
    assert len(deltas) == {"lora": 60, "locon": 91, "dylora": 91}[kind]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    load_fuse_and_compare(pipe, path, deltas, capfd)


# --- files in sd-scripts' format, written here from kohya's naming rule -------------------------------

def kohya_layers(comps, with_conv: bool) -> dict[str, torch.nn.Module]:
    """kohya's SD1 names, as sd-scripts writes them: `lora_unet_` + the diffusers path of each Linear / Conv2d
    inside a Transformer2DModel (LoCon: also inside resnets and samplers), `lora_te_text_model_` + the CLIP
    path of each Linear of the attention and MLP blocks, with dots as underscores."""
    layers = {}
    for path, module in comps["unet"].named_modules():
        inside = ".attentions." in path or (with_conv and (".resnets." in path or "samplers." in path))
        if inside and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            layers["lora_unet_" + path.replace(".", "_")] = module
    for path, module in comps["text_encoder"].named_modules():
        if isinstance(module, torch.nn.Linear) and (".self_attn." in path or ".mlp." in path):
            layers["lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")] = module
    return layers


def write_kohya_file(path: str, layers: dict[str, torch.nn.Module], rank_of, with_alpha: bool) -> dict:
    """Random weights in kohya's shapes and dtype (fp16, as --save_precision fp16 writes); returns them."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    for i, (name, module) in enumerate(sorted(layers.items())):
        rank = rank_of(module)
        out_ch, in_ch, *kernel = module.weight.shape
        ones = [1] * len(kernel)
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_ch, *kernel, generator=g).half() * 0.2
        sd[f"{name}.lora_up.weight"] = torch.randn(out_ch, rank, *ones, generator=g).half() * 0.2
        if with_alpha:
            sd[f"{name}.alpha"] = torch.tensor(float(1 + i % 3), dtype=torch.float16)
    save_file(sd, path, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return sd


def merge_by_hand(comps, layers: dict[str, torch.nn.Module], sd: dict) -> None:
    """W += up @ down * alpha / rank, in float32 (alpha = rank when the file has none)."""
    paths = {id(m): (model, p) for model in ("text_encoder", "unet") for p, m in comps[model].named_modules()}
    for name, module in layers.items():
        up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
        rank = down.shape[0]
        alpha = float(sd.get(f"{name}.alpha", torch.tensor(float(rank))))
        delta = torch.einsum("or,ri...->oi...", up.flatten(1), down) * (alpha / rank)
        model, path = paths[id(module)]
        target = comps[model].get_submodule(path)
        with torch.no_grad():
            target.weight += delta.reshape(target.weight.shape)


def _outputs(text_encoder, unet):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb = text_encoder(ids)[0]
        return emb, unet(latents, torch.tensor([10, 500]), emb).sample


@pytest.mark.parametrize("case", ["locon_fp16", "mixed_ranks_no_alpha"])
def test_sdtune_loads_sd_scripts_files(case, tiny_model_dir, demo_data, tmp_path):
    comps = build_sd1_components("tiny", seed=0)
    layers = kohya_layers(comps, with_conv=True)
    # names exactly as sd-scripts writes them for SD 1.x
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
            "lora_unet_mid_block_attentions_0_proj_in", "lora_unet_up_blocks_0_upsamplers_0_conv",
            "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_te_text_model_encoder_layers_1_mlp_fc2",
            "lora_te_text_model_encoder_layers_0_self_attn_out_proj"} <= set(layers)
    path = str(tmp_path / "kohya.safetensors")
    if case == "locon_fp16":
        sd = write_kohya_file(path, layers, lambda m: 2 if m.weight.dim() == 4 and m.weight.shape[-1] == 3 else 4,
                              with_alpha=True)
        extra = ("--network_dim", "4", "--network_args", "conv_dim=2")
    else:
        sd = write_kohya_file(path, layers, lambda m: 1 + m.weight.shape[0] % 5, with_alpha=False)
        extra = ("--dim_from_weights",)
    argv = train_argv(tiny_model_dir, demo_data, str(tmp_path / "out"), "--network_weights", path, *extra)
    run = Run(parse_args(argv), NetworkMethod)
    got = _outputs(run.family.text_encoders[0], run.family.unet)

    plain = load_model(parse_args(argv))
    reference = {"text_encoder": plain.text_encoders[0], "unet": plain.unet}
    merge_by_hand(reference, kohya_layers(reference, with_conv=True), sd)
    want = _outputs(reference["text_encoder"], reference["unet"])
    untouched = _outputs(comps["text_encoder"], comps["unet"])
    assert min((w - u).abs().max() for w, u in zip(want, untouched)) > 1e-3  # the file changes both models
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
