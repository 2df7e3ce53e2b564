"""Single-file checkpoints of SD 1.x, SD 2.x and SDXL: write -> read round trips, what diffusers reads from
our files, the key counts of the real architectures, and detection (with the "not a base model" messages)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError
from library.models import files, ldm_keys, single_file
from library.models.synthetic import build_sd1_components, build_sd2_components
from library.models.synthetic_sdxl import build_sdxl_components

BUILDERS = {"sd1": build_sd1_components, "sd2": build_sd2_components, "sdxl": build_sdxl_components}
REAL_SIZES = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}


def _pairs(components: dict, loaded: dict):
    encoders = single_file.text_encoders_of(components)
    assert len(encoders) == len(loaded["text_encoders"])
    return [(components["unet"], loaded["unet"]), (components["vae"], loaded["vae"]),
            *zip(encoders, loaded["text_encoders"])]


def _keys(path: str) -> set[str]:
    with safe_open(path, "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def tiny(request, tmp_path_factory):
    family = request.param
    components = BUILDERS[family]("tiny", seed=3)
    path = str(tmp_path_factory.mktemp("single") / f"{family}.safetensors")
    single_file.write_single_file(family, components, path)
    return family, components, path


def test_round_trip_is_bitwise(tiny):
    family, components, path = tiny
    loaded = single_file.load_components(family, path)
    for original, back in _pairs(components, loaded):
        want, got = original.state_dict(), back.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(p.dtype == torch.float32 for p in back.parameters())


def test_fp16_file_loads_within_the_cast(tiny, tmp_path):
    family, components, _ = tiny
    path = str(tmp_path / "half.safetensors")
    single_file.write_single_file(family, components, path, dtype=torch.float16)
    with safe_open(path, "pt") as f:
        assert f.get_slice(ldm_keys.UNET_PREFIX + "out.2.weight").get_dtype() == "F16"
    loaded = single_file.load_components(family, path)
    for original, back in _pairs(components, loaded):
        want, got = original.state_dict(), back.state_dict()
        for key, value in want.items():
            expected = value.half().float() if value.is_floating_point() else value
            assert torch.equal(got[key], expected), key


def test_sd2_file_has_kohyas_24th_block_and_openclip_extras(tiny):
    family, components, path = tiny
    if family != "sd2":
        pytest.skip("SD 2.x layout")
    layers = components["text_encoder"].config.num_hidden_layers  # 2 in the tiny model (23 in SD 2.x)
    prefix = "cond_stage_model.model."
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        block = f"{prefix}transformer.resblocks.{layers}."
        assert {k for k in keys if k.startswith(block)} and not any(
            k.startswith(f"{prefix}transformer.resblocks.{layers + 1}.") for k in keys)
        last, padded = (f.get_tensor(f"{prefix}transformer.resblocks.{i}.attn.in_proj_weight") for i in (layers - 1, layers))
        assert torch.equal(last, padded)
        hidden = components["text_encoder"].config.hidden_size
        assert torch.equal(f.get_tensor(prefix + "text_projection"), torch.ones(hidden, hidden))
        assert f.get_tensor(prefix + "logit_scale").item() == 1.0
        q = components["text_encoder"].state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
        assert torch.equal(f.get_tensor(prefix + "transformer.resblocks.0.attn.in_proj_weight")[:hidden], q)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


def test_sdxl_text_projection_is_stored_as_openclip_does(tiny):
    family, components, path = tiny
    if family != "sdxl":
        pytest.skip("SDXL layout")
    weight = components["text_encoder_2"].state_dict()["text_projection.weight"]
    with safe_open(path, "pt") as f:
        stored = f.get_tensor("conditioner.embedders.1.model.text_projection")
        assert "model.diffusion_model.label_emb.0.0.weight" in f.keys()
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in f.keys()
    # OpenCLIP computes pooled @ text_projection; transformers' Linear computes pooled @ weight.T
    assert torch.equal(stored, weight.T)
    pooled = torch.randn(3, weight.shape[1])
    assert torch.allclose(pooled @ stored, components["text_encoder_2"].text_projection(pooled), atol=1e-6)


def test_inpainting_unet_keeps_nine_channels(tmp_path):
    from diffusers import UNet2DConditionModel

    components = build_sd1_components("tiny", seed=1)
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(**dict(components["unet"].config, in_channels=9))
    path = str(tmp_path / "inpaint.safetensors")
    single_file.write_single_file("sd1", components, path)
    with safe_open(path, "pt") as f:  # a file whose stored config says 4 channels, as stock configs do
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        configs = json.loads(f.metadata()[files.CONFIG_METADATA_KEY])
    configs["unet"]["in_channels"] = 4
    save_file(tensors, path, {files.CONFIG_METADATA_KEY: json.dumps(configs)})
    unet = single_file.load_components("sd1", path)["unet"]
    assert unet.config.in_channels == 9 and unet.conv_in.weight.shape == (32, 9, 3, 3)
    assert torch.equal(unet.conv_in.weight, components["unet"].conv_in.weight)


def test_unknown_key_raises():
    components = build_sdxl_components("tiny", seed=0)
    encoder = components["text_encoder_2"]
    encoder.register_buffer("surprise", torch.zeros(1))
    with pytest.raises(ldm_keys.UnmappedKeyError, match="surprise"):
        single_file.to_ldm("sdxl", text_encoders=[components["text_encoder"], encoder])


# --- what diffusers reads from our files ---------------------------------------------------------------


@pytest.mark.parametrize("family, folder_fixture, pipeline", [
    ("sd2", "tiny_sd2_dir", "StableDiffusionPipeline"),
    ("sdxl", "tiny_sdxl_dir", "StableDiffusionXLPipeline"),
])
def test_diffusers_reads_our_file_to_the_same_weights(family, folder_fixture, pipeline, request, tmp_path):
    import diffusers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file

    folder = request.getfixturevalue(folder_fixture)
    parts = single_file.load_folder(family, folder)
    path = str(tmp_path / f"{family}.safetensors")
    single_file.write_single_file(family, parts, path)
    pipe = getattr(diffusers, pipeline).from_single_file(path, config=folder, local_files_only=True)
    ours = [parts["unet"], parts["vae"], parts["text_encoders"][0]]
    for mine, other in zip(ours, [pipe.unet, pipe.vae, pipe.text_encoder]):
        want, got = mine.state_dict(), other.state_dict()
        assert set(got) == set(want), set(got) ^ set(want)
        assert [k for k in want if got[k].is_meta or not torch.equal(got[k], want[k])] == []
    if family == "sdxl":
        # diffusers tells SDXL's two encoders apart by width, which the tiny model's 32 and 32 defeat; its
        # OpenCLIP conversion, what it runs for the real 768 / 1280 model, gives our second encoder back.
        encoder = parts["text_encoders"][1]
        back = convert_open_clip_checkpoint(encoder, load_file(path), prefix="conditioner.embedders.1.model.")
        want = encoder.state_dict()
        assert set(back) == set(want)
        assert [k for k in want if not torch.equal(back[k], want[k])] == []


# --- the real architectures (empty weights) ---------------------------------------------------------------

# Key counts of the released checkpoints: v1-5-pruned-emaonly.safetensors 1131 (UNet 686, VAE 248, CLIP-L
# 196 + position_ids); sd_xl_base_1.0.safetensors 2515 (UNet 1680, VAE 248, CLIP-L 197, OpenCLIP-bigG
# 32 * 12 + 6); SD 2.x 1228 weights (UNet 686, VAE 248, OpenCLIP-H 24 * 12 + 6) besides the LDM schedule
# buffers its files also carry.
REAL_COUNTS = {"sd1": 1131, "sd2": 1228, "sdxl": 2515}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def real(request):
    family = request.param
    return family, BUILDERS[family](REAL_SIZES[family], empty=True)


def test_real_architecture_key_counts(real):
    family, parts = real
    out = single_file.to_ldm(family, parts["unet"], parts["vae"], single_file.text_encoders_of(parts))
    assert len(out) == REAL_COUNTS[family]
    if family == "sdxl":
        assert out["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
        assert out["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
        assert "model.diffusion_model.output_blocks.2.2.conv.weight" in out  # SDXL's upsamplers sit at slot 2
        assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in out
    if family == "sd2":
        assert out["cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight"].shape == (4096, 1024)
        assert out["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)


def test_diffusers_conversion_consumes_every_unet_and_vae_key(real):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    family, parts = real
    unet = parts["unet"].state_dict()
    names = {ldm_keys.UNET_PREFIX + v: k for k, v in ldm_keys.unet_key_map(unet).items()}
    assert convert_ldm_unet_checkpoint(names, dict(parts["unet"].config)) == {k: k for k in unet}
    vae = parts["vae"].state_dict()
    out = single_file.to_ldm(family, vae=parts["vae"])
    back = convert_ldm_vae_checkpoint(out, dict(parts["vae"].config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.items()}


def test_diffusers_conversion_consumes_every_text_key(real):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    family, parts = real
    encoders = single_file.text_encoders_of(parts)
    out = single_file.to_ldm(family, text_encoders=encoders)
    for slot, encoder in zip(single_file.TEXT_SLOTS[family], encoders):
        mine = {k: v for k, v in out.items() if k.startswith(slot.prefix)}
        want = {k.removeprefix("text_model.") for k in encoder.state_dict() if not k.endswith("position_ids")}
        if slot.open_clip:
            back = convert_open_clip_checkpoint(encoder, mine, prefix=slot.prefix)
            left = set(mine) - {slot.prefix + ldm_keys.open_clip_key(k)[0] for k in encoder.state_dict()}
            padding = {"logit_scale"} | ({"text_projection"} if slot.padded_layer else set())
            assert {k[len(slot.prefix):] for k in left if ".resblocks." not in k} == padding
            assert len([k for k in left if ".resblocks." in k]) == (12 if slot.padded_layer else 0)
        else:
            back = convert_ldm_clip_checkpoint(mine)
            back.pop("text_model.embeddings.position_ids")
        assert {k.removeprefix("text_model.") for k in back} == want


# --- detection --------------------------------------------------------------------------------------------


def test_detects_files_and_folders(tiny, tiny_model_dir, tiny_sd2_dir, tiny_sdxl_dir):
    family, _, path = tiny
    assert files.detect_family(path) == family
    assert [files.detect_family(p) for p in (tiny_model_dir, tiny_sd2_dir, tiny_sdxl_dir)] == ["sd1", "sd2", "sdxl"]


def _fake(tmp_path, name: str, keys: list[str]) -> str:
    path = str(tmp_path / name)
    save_file({k: torch.zeros(2) for k in keys}, path)
    return path


@pytest.mark.parametrize("keys, message", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"],
     "is a LoRA (network) file, not a base model: pass it as --network_weights"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"], "is a LoRA (network) file"),
    (["lycoris_down_blocks_0.lokr_w1"], "is a LoRA (network) file"),
    (["encoder.conv_in.weight", "decoder.conv_in.weight"], "is a VAE, not a base model: pass it as --vae"),
    (["first_stage_model.encoder.conv_in.weight"], "is a VAE"),
    (["emb_params"], "is an embedding (textual inversion), not a base model"),
    (["string_to_param.*"], "is an embedding"),
    (["clip_l", "clip_g"], "is an embedding"),
    (["something.else"], "no Stable Diffusion UNet weights (model.diffusion_model.*); expected an SD 1.x, "
                         "SD 2.x or SDXL checkpoint"),
])
def test_not_a_base_model_says_what_it_is(tmp_path, keys, message):
    path = _fake(tmp_path, "x.safetensors", keys)
    with pytest.raises(UserError) as info:
        files.detect_family(path)
    assert message in str(info.value) and str(info.value).startswith(path)
    assert "\n" not in str(info.value)
