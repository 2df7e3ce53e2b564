"""SD 2.x and SDXL LoRA / LoCon files: diffusers loads every key and fuses exactly our change, the
kohya <-> diffusers conversion is lossless, and sdtune loads its own SDXL files back onto every layer."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_network
from library.config import parse_args
from library.lora_convert import convert_file
from library.lora_inspect import inspect_state_dict
from library.lora_rank import resize_state_dict
from library.methods import NetworkMethod
from library.models.synthetic_sdxl import build_sdxl_components
from library.saving import save_safetensors
from library.trainer import Run
from networks import lora, lycoris_compat
from networks.targets import text_encoder_list, unet_renames
from tests.conftest import load_fuse_and_compare, pipeline_models, train_argv

torch.set_num_threads(1)

KINDS = {"lora": {}, "locon": {"conv_dim": "2", "conv_alpha": "1"}}
TRAIN_ARGS = {"lora": (), "locon": ("--network_args", "conv_dim=2", "conv_alpha=1")}
TRAINED = (("sd2", "lora"), ("sdxl", "lora"), ("sdxl", "locon"))
# Layers per tiny model: text encoder(s) 2 layers x 6 Linear each; U-Net per family (see the counts test).
COUNTS = {("sd2", "lora"): (12, 48), ("sd2", "locon"): (12, 79), ("sdxl", "lora"): (24, 88),
          ("sdxl", "locon"): (24, 119)}


def _pipeline(family: str, folder: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(folder, local_files_only=True)


def _text_encoders(models: dict):
    encoders = [models[k] for k in ("text_encoder", "text_encoder_2") if k in models]
    return encoders[0] if len(encoders) == 1 else encoders


def write_network(models: dict, kind: str, path: str, seed: int = 5) -> dict[str, torch.Tensor]:
    """A networks.lora network over `models` with random weights (up included, so it changes the models)
    and alphas 1, 2, 3 in turn, saved as train_network.py saves it; returns its state dict."""
    network = lora.create_network(1.0, 4, 2, None, _text_encoders(models), models["unet"], **KINDS[kind])
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (key, value) in enumerate(sorted(network.state_dict().items())):
        alpha = torch.tensor(float(1 + i % 3))
        sd[key] = alpha if key.endswith(".alpha") else torch.randn(value.shape, generator=g) * 0.1
    network.load_state_dict(sd)
    network.save_weights(path, None, {"ss_network_module": "networks.lora"})
    return sd


def sdtune_deltas(models: dict, path: str) -> dict[tuple[str, str], torch.Tensor]:
    """(model, module path) -> the weight change sdtune's network applies for the file at `path`
    (shaped after the file: --dim_from_weights)."""
    network, _ = lora.create_network_from_weights(1.0, path, None, _text_encoders(models), models["unet"])
    info = network.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    paths = {id(m): (name, p) for name, model in models.items() for p, m in model.named_modules()}
    return {paths[id(layer.org_module)]: layer.get_weight(1.0).detach() for layer in network.loras}


@pytest.fixture(scope="module")
def family_dirs(tiny_sd2_dir, tiny_sdxl_dir) -> dict[str, str]:
    return {"sd2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}


@pytest.fixture(scope="module")
def trained_files(family_dirs, demo_data, tmp_path_factory) -> dict[tuple[str, str], str]:
    """train_network.py, 2 steps with the text encoder(s), per (family, kind) in TRAINED."""
    files = {}
    for family, kind in TRAINED:
        out = tmp_path_factory.mktemp(f"{family}_{kind}")
        argv = train_argv(family_dirs[family], demo_data, str(out), "--max_train_steps", "2", *TRAIN_ARGS[kind])
        assert train_network.main(argv) == 0
        files[(family, kind)] = str(out / "lora.safetensors")
    return files


@pytest.mark.parametrize("family, kind", TRAINED)
def test_diffusers_loads_a_trained_file_exactly(family, kind, trained_files, family_dirs, capfd):
    pipe = _pipeline(family, family_dirs[family])
    models = pipeline_models(pipe)
    path = trained_files[(family, kind)]
    assert {key.partition(".")[0] for key in load_file(path)} == {
        m.lora_name for m in lora.create_network(1.0, 4, 2, None, _text_encoders(models), models["unet"],
                                                 **KINDS[kind]).loras}
    deltas = sdtune_deltas(models, path)
    assert len(deltas) == sum(COUNTS[(family, kind)])
    untrained = {path for (model, path), d in deltas.items() if not d.abs().max() > 0}
    # every layer trained but SDXL's CLIP-L last layer: SDXL reads its penultimate state (kohya alike)
    assert untrained == ({f"encoder.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                             "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
                         if family == "sdxl" else set())
    load_fuse_and_compare(pipe, path, deltas, capfd)


@pytest.mark.parametrize("extra", [("--network_args", "conv_dim=2", "conv_alpha=1"), ("--dim_from_weights",)])
def test_trainer_reloads_an_sdxl_file_on_every_layer(extra, trained_files, tiny_sdxl_dir, demo_data, tmp_path):
    """--network_weights (with the same dims, or --dim_from_weights): the network the trainer builds holds the
    file's values in every layer, and the U-Net gives what the file's network gives."""
    path = trained_files[("sdxl", "locon")]
    argv = train_argv(tiny_sdxl_dir, demo_data, str(tmp_path / "out"), "--network_weights", path, *extra)
    run = Run(parse_args(argv), NetworkMethod)
    saved = load_file(path)
    own = run.method.network.module.state_dict()
    assert own.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(own[key].to(value.dtype), value), key
    got = _unet_output(run.family.unet)

    pipe = _pipeline("sdxl", tiny_sdxl_dir)
    models = pipeline_models(pipe)
    network, _ = lora.create_network_from_weights(1.0, path, None, _text_encoders(models), models["unet"])
    network.apply_to(_text_encoders(models), models["unet"])
    network.load_weights(path)
    assert torch.equal(got, _unet_output(models["unet"]))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_diffusers_loads_our_file_exactly(family, kind, family_dirs, tmp_path, capfd):
    pipe = _pipeline(family, family_dirs[family])
    models = pipeline_models(pipe)
    path = str(tmp_path / "net.safetensors")
    sd = write_network(models, kind, path)
    layers = {key.partition(".")[0] for key in sd}
    te, unet = COUNTS[(family, kind)]
    assert (sum(not n.startswith("lora_unet_") for n in layers), sum(n.startswith("lora_unet_") for n in layers)) \
        == (te, unet)
    if family == "sdxl":  # kohya's SDXL names: two encoders, the U-Net in the original layout
        assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in layers
        assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in layers
        assert "lora_unet_middle_block_1_proj_out" in layers
        assert ("lora_unet_output_blocks_1_2_conv" in layers) == (kind == "locon")
        assert not [n for n in layers if "down_blocks" in n or "up_blocks" in n or "mid_block" in n]
    deltas = sdtune_deltas(models, path)
    assert len(deltas) == te + unet
    load_fuse_and_compare(pipe, path, deltas, capfd)


def test_sdxl_convert_round_trip_is_exact_and_diffusers_reads_it(tiny_sdxl_dir, tmp_path, capfd):
    pipe = _pipeline("sdxl", tiny_sdxl_dir)
    models = pipeline_models(pipe)
    src = str(tmp_path / "kohya.safetensors")
    sd = write_network(models, "locon", src)
    deltas = sdtune_deltas(models, src)
    dif, back = str(tmp_path / "diffusers.safetensors"), str(tmp_path / "back.safetensors")
    assert convert_file(src, dif, "diffusers") == "kohya"
    converted = load_file(dif)
    # layers_per_block 1 was read from the names: down_blocks.1 holds attention 0, up_blocks.0 attentions 0-1
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.lora_A.weight" in converted
    assert "unet.up_blocks.0.upsamplers.0.conv.lora_B.weight" in converted
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_A.weight" in converted
    assert len(converted) == 2 * len(deltas)
    assert convert_file(dif, back, "kohya") == "diffusers"
    again = load_file(back)
    assert again.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(again[key], value), key
    load_fuse_and_compare(pipe, dif, deltas, capfd)


def _unet_output(unet, seed: int = 3) -> torch.Tensor:
    """The tiny SDXL U-Net on fixed random inputs (text states 64 wide, pooled 32, six size numbers)."""
    g = torch.Generator().manual_seed(seed)
    latents, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    cond = {"text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [80, 48, 8, 0, 64, 64]])}
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), states, added_cond_kwargs=cond).sample


def test_sdxl_weights_load_back_on_every_layer(tiny_sdxl_dir, tmp_path):
    """--network_weights (same dims), --dim_from_weights and --base_weights on an SDXL LoCon."""
    def fresh():
        comps = build_sdxl_components("tiny", seed=0)
        return {k: comps[k] for k in ("text_encoder", "text_encoder_2", "unet")}

    trained = fresh()
    path = str(tmp_path / "locon.safetensors")
    sd = write_network(trained, "locon", path)
    network = lora.create_network(1.0, 4, 2, None, _text_encoders(trained), trained["unet"], **KINDS["locon"])
    network.load_state_dict(sd)
    network.apply_to(_text_encoders(trained), trained["unet"])
    want = _unet_output(trained["unet"])
    assert (want - _unet_output(fresh()["unet"])).abs().max() > 1e-3  # the network changes the output

    again = fresh()
    reloaded = lora.create_network(1.0, 4, 2, None, _text_encoders(again), again["unet"], **KINDS["locon"])
    reloaded.apply_to(_text_encoders(again), again["unet"])
    info = reloaded.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert torch.equal(_unet_output(again["unet"]), want)

    shaped = fresh()
    network, _ = lora.create_network_from_weights(1.0, path, None, _text_encoders(shaped), shaped["unet"])
    assert len(network.loras) == len(sd) // 3
    network.apply_to(_text_encoders(shaped), shaped["unet"])
    network.load_weights(path)
    assert torch.equal(_unet_output(shaped["unet"]), want)

    merged = fresh()
    network, weights = lora.create_network_from_weights(1.0, path, None, _text_encoders(merged), merged["unet"],
                                                        for_inference=True)
    network.merge_to(_text_encoders(merged), merged["unet"], weights)
    torch.testing.assert_close(_unet_output(merged["unet"]), want, atol=2e-5, rtol=1e-5)
    assert {m.lora_name for m in network.loras} == {k.partition(".")[0] for k in sd}
    assert len(text_encoder_list(_text_encoders(merged))) == 2


def test_resize_and_check_keep_sdxl_names(tiny_sdxl_dir, tmp_path, capfd):
    """tools/resize_lora.py and tools/check_lora_weights.py work on kohya's SDXL names; the resized file
    still loads into diffusers on every layer."""
    pipe = _pipeline("sdxl", tiny_sdxl_dir)
    models = pipeline_models(pipe)
    src = str(tmp_path / "locon.safetensors")
    sd = write_network(models, "locon", src)
    report = inspect_state_dict(sd)
    assert report.algo == "locon" and {layer.verdict for layer in report.layers} == {"ok"}
    assert len(report.layers) == 24 + 119
    resized, layers = resize_state_dict(sd, 1, 1, progress=False)
    assert resized.keys() == sd.keys() and {layer.new_rank for layer in layers} == {1}
    out = str(tmp_path / "r1.safetensors")
    save_safetensors(resized, out, {"ss_network_module": "networks.lora"})
    load_fuse_and_compare(pipe, out, sdtune_deltas(models, out), capfd)


def test_lycoris_locon_on_sdxl_uses_kohya_names_everywhere(tiny_sdxl_dir, tmp_path, capfd):
    """lycoris.kohya (through sdtune's adapter) writes SDXL files under kohya's names: sdtune reads them back
    onto every layer and diffusers loads them exactly, the time / size embeddings and conv_in / conv_out
    of lycoris' default preset included."""
    def encoders_and_unet():
        models = pipeline_models(_pipeline("sdxl", tiny_sdxl_dir))
        return models, [models["text_encoder"], models["text_encoder_2"]], models["unet"]

    models, encoders, unet = encoders_and_unet()
    network = lycoris_compat.create_network(1.0, 4, 2, None, encoders, unet, algo="locon", conv_dim="2",
                                            conv_alpha="1")
    network.apply_to(encoders, unet, True, True)
    g = torch.Generator().manual_seed(11)
    network.load_state_dict({k: v if k.endswith(".alpha") else torch.randn(v.shape, generator=g) * 0.1
                             for k, v in network.state_dict().items()})
    path = str(tmp_path / "lycoris.safetensors")
    network.save_weights(path, None, {"ss_network_module": "lycoris.kohya"})
    layers = {key.partition(".")[0] for key in load_file(path)}
    assert {"lora_unet_time_embed_0", "lora_unet_label_emb_0_2", "lora_unet_input_blocks_0_0", "lora_unet_out_2",
            "lora_unet_input_blocks_2_0_op", "lora_unet_output_blocks_1_2_conv",
            "lora_unet_input_blocks_3_1_transformer_blocks_1_ff_net_2",
            "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"} <= layers
    assert not [n for n in layers if re.search(r"down_blocks|up_blocks|mid_block|time_embedding", n)]

    models, encoders, unet = encoders_and_unet()
    base = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    rebuilt, weights = lycoris_compat.create_network_from_weights(1.0, path, None, encoders, unet)
    assert {lo.lora_name for lo in rebuilt.loras} == layers
    rebuilt.merge_to(encoders, unet, weights, None, "cpu")
    paths = {id(m): (name, p) for name, model in models.items() for p, m in model.named_modules()}
    deltas = {}
    for layer in rebuilt.loras:
        name, module_path = paths[id(layer.org_module[0])]
        key = f"{module_path}.weight"
        deltas[(name, module_path)] = models[name].state_dict()[key] - base[name][key]
    load_fuse_and_compare(_pipeline("sdxl", tiny_sdxl_dir), path, deltas, capfd)


def test_sdxl_file_named_by_diffusers_paths_loads_too(tmp_path):
    """An SDXL LoRA whose U-Net layers are named by diffusers path (as some trainers write them) loads onto the
    same layers as kohya's names, for --network_weights, --dim_from_weights and --base_weights alike."""
    comps = build_sdxl_components("tiny", seed=0)
    encoders, unet = [comps["text_encoder"], comps["text_encoder_2"]], comps["unet"]
    kohya = str(tmp_path / "kohya.safetensors")
    sd = write_network(comps, "locon", kohya)
    back = {new: old for old, new in unet_renames(unet).items()}
    renamed = {back.get(k.partition(".")[0], k.partition(".")[0]) + "." + k.partition(".")[2]: v for k, v in sd.items()}
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in renamed
    assert len([k for k in renamed if k.startswith("lora_unet_down_blocks")]) > 0
    legacy = str(tmp_path / "legacy.safetensors")
    save_file(renamed, legacy)
    network, weights = lora.create_network_from_weights(1.0, legacy, None, encoders, unet)
    assert len(network.loras) == 24 + 119 and weights.keys() == sd.keys()
    info = network.load_weights(legacy)
    assert not info.missing_keys and not info.unexpected_keys
    assert all(torch.equal(v, sd[k]) for k, v in network.state_dict().items())
    merged = build_sdxl_components("tiny", seed=0)
    fresh = lora.create_network(1.0, 4, 2, None, [merged["text_encoder"], merged["text_encoder_2"]], merged["unet"],
                                **KINDS["locon"])
    before = merged["unet"].state_dict()["down_blocks.1.attentions.0.proj_in.weight"].clone()
    fresh.merge_to(None, None, renamed)
    assert not torch.equal(merged["unet"].state_dict()["down_blocks.1.attentions.0.proj_in.weight"], before)
