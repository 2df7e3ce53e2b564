"""Model families: loading folders and single files, key mapping, detection, text/image encoding."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError
from library.models import detect_family, enable_xformers, files, ldm_keys, load_model, single_file
from library.models.sd1 import SD1Family
from library.models.synthetic import build_sd1_components, write_sd1_single_file


def _cfg(path, **kw) -> argparse.Namespace:
    return argparse.Namespace(pretrained_model_name_or_path=path, **kw)


@pytest.fixture(scope="module")
def family(tiny_model_dir) -> SD1Family:
    return load_model(_cfg(tiny_model_dir))


def _variant(fam: SD1Family, **kw) -> SD1Family:
    """The same loaded modules under other text options (no reload)."""
    return SD1Family(fam.unet, fam.vae, fam.text_encoders[0], fam.tokenizers[0], model_path=fam.model_path, **kw)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


# --- loading ----------------------------------------------------------------------------------


def test_folder_load(family, tiny_model_dir):
    assert family.name == "sd1" and family.resolution_default == 512
    assert family.model_path == tiny_model_dir and family.vae_path is None and family.v_prediction is False
    assert family.unet.config.cross_attention_dim == 32 and list(family.unet.config.block_out_channels) == [32, 64]
    assert len(family.text_encoders) == 1 and family.text_encoders[0].config.eos_token_id == 49407
    sched = family.noise_scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (sched.num_train_timesteps, sched.clip_sample, sched.prediction_type) == (1000, False, "epsilon")
    assert family.tokenizers[0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_folder_matches_the_seeded_components(family):
    built = build_sd1_components("tiny", seed=0)
    assert _max_diff(family.unet, built["unet"]) == 0.0
    assert _max_diff(family.text_encoders[0], built["text_encoder"]) == 0.0


def test_pipeline_folder_loads_in_diffusers(tiny_model_dir, family):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.tokenizer("sks").input_ids == [49406, 48136, 49407]
    assert _max_diff(pipe.unet, family.unet) == 0.0


def test_single_file_round_trip(family, tiny_single_file):
    loaded = load_model(_cfg(tiny_single_file))
    assert loaded.name == "sd1" and loaded.model_path == tiny_single_file
    assert _max_diff(loaded.unet, family.unet) == 0.0
    assert _max_diff(loaded.vae, family.vae) == 0.0
    assert _max_diff(loaded.text_encoders[0], family.text_encoders[0]) == 0.0


def test_single_file_is_read_identically_by_diffusers(family, tiny_single_file, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(tiny_single_file, config=tiny_model_dir, local_files_only=True)
    assert _max_diff(pipe.unet, family.unet) == 0.0
    assert _max_diff(pipe.vae, family.vae) == 0.0
    assert _max_diff(pipe.text_encoder, family.text_encoders[0]) == 0.0


def test_single_file_in_fp16(family, tiny_model_dir, tmp_path):
    path = str(tmp_path / "half.safetensors")
    write_sd1_single_file(tiny_model_dir, path, dtype=torch.float16)
    with safe_open(path, "pt") as f:
        assert f.get_slice("model.diffusion_model.out.2.weight").get_dtype() == "F16"
    loaded = load_model(_cfg(path))
    assert next(loaded.unet.parameters()).dtype == torch.float32
    expected = family.unet.state_dict()["conv_out.weight"].half().float()
    assert torch.equal(loaded.unet.state_dict()["conv_out.weight"], expected)
    assert 0 < _max_diff(loaded.unet, family.unet) < 1e-2


def test_single_file_ldm_names(tiny_single_file):
    with safe_open(tiny_single_file, "pt") as f:
        keys = set(f.keys())
        q = f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    # Tiny: one resnet per block, so down block 0's downsampler is input block 2, and up block 0 (no
    # attention) has its upsampler at slot 1 of output block 1.
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in keys
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert len(q) == 4 and q[2:] == [1, 1]  # LDM's VAE attention is a 1x1 conv


@pytest.fixture
def tiny_repo_configs(monkeypatch, tiny_model_dir):
    """Files without sdtune's config metadata use the repo's SD1 configs: point those at the tiny model."""
    from library.models import single_file

    monkeypatch.setitem(single_file.CONFIG_DIRS, "sd1", tiny_model_dir)


def test_pickle_needs_unsafe_load_ckpt(family, tiny_single_file, tmp_path, tiny_repo_configs):
    from safetensors.torch import load_file

    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": load_file(tiny_single_file), "global_step": 1}, path)
    with pytest.raises(UserError, match=r"model\.ckpt.*--unsafe_load_ckpt"):
        load_model(_cfg(path))
    loaded = load_model(_cfg(path, unsafe_load_ckpt=True))
    assert _max_diff(loaded.unet, family.unet) == 0.0


# --- the LDM key mapping ------------------------------------------------------------------------


def test_ldm_mapping_covers_sd15_architecture():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    parts = build_sd1_components("sd15", empty=True)
    unet, vae, text = (parts[k].state_dict() for k in ("unet", "vae", "text_encoder"))
    out = single_file.to_ldm("sd1", parts["unet"], parts["vae"], [parts["text_encoder"]])
    assert len(out) == len(unet) + len(vae) + len(text) + 1 == 1131  # + position_ids, as SD 1.5 files have
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in out
    assert "model.diffusion_model.input_blocks.9.0.op.weight" in out
    assert "first_stage_model.decoder.up.0.block.2.nin_shortcut.weight" not in out
    assert "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight" in out
    assert out["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert out["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    # diffusers' own LDM -> diffusers conversion lands every key back where it came from.
    names = {ldm_keys.UNET_PREFIX + v: k for k, v in ldm_keys.unet_key_map(unet).items()}
    assert convert_ldm_unet_checkpoint(names, dict(parts["unet"].config)) == {k: k for k in unet}
    vae_ldm = {k: v for k, v in out.items() if k.startswith(ldm_keys.VAE_PREFIX)}
    back = convert_ldm_vae_checkpoint(vae_ldm, dict(parts["vae"].config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.items()}


def test_unmapped_key_raises():
    unet = dict(build_sd1_components("tiny", empty=True)["unet"].state_dict())
    unet["class_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(ldm_keys.UnmappedKeyError, match="class_embedding"):
        ldm_keys.unet_key_map(unet)


# --- detection and bad input ---------------------------------------------------------------------


def _fake_checkpoint(path, keys: dict[str, tuple]) -> str:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return str(path)


TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.mark.parametrize("keys, expected", [
    ({TO_K: (4, 768), "cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,)}, "sd1"),
    ({TO_K: (4, 1024), "cond_stage_model.model.ln_final.weight": (4,)}, "sd2"),
    ({TO_K: (4, 1024)}, "sd2"),
    ({TO_K: (4, 2048), "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (4,)}, "sdxl"),
    ({"model.diffusion_model.label_emb.0.0.weight": (4, 4)}, "sdxl"),
])
def test_detect_family_from_header(tmp_path, keys, expected):
    assert detect_family(_fake_checkpoint(tmp_path / "m.safetensors", keys)) == expected


def test_detect_family_of_folders(tiny_model_dir, tmp_path):
    assert detect_family(tiny_model_dir) == "sd1"
    sd2 = tmp_path / "sd2"
    (sd2 / "unet").mkdir(parents=True)
    (sd2 / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024}))
    assert detect_family(str(sd2)) == "sd2"
    (sd2 / "model_index.json").write_text(json.dumps({"text_encoder_2": ["transformers", "CLIPTextModel"]}))
    assert detect_family(str(sd2)) == "sdxl"


@pytest.mark.parametrize("to_k, label", [(768, "SD 1.x"), (2048, "SDXL")])
def test_v2_flag_must_match_the_detected_family(tmp_path, to_k, label):
    path = _fake_checkpoint(tmp_path / "other.safetensors", {TO_K: (4, to_k)})
    with pytest.raises(UserError, match=rf"--v2 is given but .*other\.safetensors is an {label} checkpoint"):
        load_model(_cfg(path, v2=True))


def test_bad_model_paths(tmp_path, tiny_single_file):
    with pytest.raises(UserError, match=r"not found: .*nope\.safetensors"):
        load_model(_cfg(str(tmp_path / "nope.safetensors")))
    with pytest.raises(UserError, match=r"runwayml/stable-diffusion-v1-5.*offline.*local path"):
        load_model(_cfg("runwayml/stable-diffusion-v1-5"))
    lora = _fake_checkpoint(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": (2, 4)})
    with pytest.raises(UserError, match=r"lora\.safetensors is a LoRA \(network\) file"):
        load_model(_cfg(lora))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(UserError, match=r"junk\.safetensors: not a readable \.safetensors"):
        load_model(_cfg(str(junk)))
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"model\.txt: unsupported model file type"):
        load_model(_cfg(str(text)))
    with pytest.raises(UserError, match=r"not a diffusers model folder"):
        load_model(_cfg(str(tmp_path)))


def test_text_options_from_the_config(tiny_model_dir):
    with pytest.raises(UserError, match="--max_token_length must be 75, 150 or 225, not 100"):
        load_model(_cfg(tiny_model_dir, max_token_length=100))
    fam = load_model(_cfg(tiny_model_dir, max_token_length=150, clip_skip=2, v_parameterization=True))
    assert (fam.max_token_length, fam.clip_skip, fam.v_prediction) == (150, 2, True)
    assert fam.tokenize(["x"]).shape == (1, 154)


def test_incomplete_checkpoint_names_the_file(tmp_path, tiny_single_file, tiny_repo_configs):
    from safetensors.torch import load_file

    state = load_file(tiny_single_file)
    del state["model.diffusion_model.out.2.weight"]
    path = str(tmp_path / "cut.safetensors")
    save_file(state, path)
    with pytest.raises(UserError, match=r"cut\.safetensors: 1 UNet weights missing \(e\.g\. conv_out\.weight\)"):
        load_model(_cfg(path))


# --- --vae ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shifted_vae(family):
    """The tiny VAE with every weight + 1, so a loaded --vae is told apart from the model's own."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(family.vae.config)
    vae.load_state_dict({k: v + 1 for k, v in family.vae.state_dict().items()})
    return vae


def test_vae_from_files_and_folders(tiny_model_dir, shifted_vae, tmp_path, tiny_repo_configs):
    folder = tmp_path / "vae_folder"
    shifted_vae.save_pretrained(str(folder))
    nested = tmp_path / "nested"
    shifted_vae.save_pretrained(str(nested / "vae"))
    ldm = ldm_keys.vae_key_map(shifted_vae.state_dict())
    state = {v: ldm_keys._vae_tensor(v, shifted_vae.state_dict()[k]).contiguous() for k, v in ldm.items()}
    bare = tmp_path / "vae.safetensors"
    save_file(state, str(bare))
    prefixed = tmp_path / "vae_prefixed.safetensors"
    save_file({ldm_keys.VAE_PREFIX + k: v for k, v in state.items()}, str(prefixed))
    for vae_path in (folder, nested, bare, prefixed):
        fam = load_model(_cfg(tiny_model_dir, vae=str(vae_path)))
        assert fam.vae_path == str(vae_path)
        assert _max_diff(fam.vae, shifted_vae) == 0.0


def test_bad_vae_paths(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"VAE not found: .*missing_vae"):
        load_model(_cfg(tiny_model_dir, vae=str(tmp_path / "missing_vae")))
    with pytest.raises(UserError, match=r"not a diffusers VAE folder"):
        load_model(_cfg(tiny_model_dir, vae=str(tmp_path)))
    other = _fake_checkpoint(tmp_path / "notvae.safetensors", {"something.weight": (2,)})
    with pytest.raises(UserError, match=r"notvae\.safetensors: no VAE weights"):
        load_model(_cfg(tiny_model_dir, vae=other))


# --- text, images, prediction -------------------------------------------------------------------


def test_clip_skip_is_penultimate_layer_plus_final_norm(family):
    ids = family.tokenize(["a photo of a cat", "sks dog"])
    te = family.text_encoders[0]
    with torch.no_grad():
        manual = te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
        skipped = _variant(family, clip_skip=2).encode_text(ids)
        plain = family.encode_text(ids)
        last = _variant(family, clip_skip=1).encode_text(ids)
    assert torch.allclose(skipped, manual, atol=1e-6)
    assert torch.allclose(last, plain, atol=1e-6)  # clip_skip 1 is the normal output
    assert (skipped - plain).abs().max() > 1e-3


def test_max_token_length_150(family):
    long = " ".join(["cat"] * 100)
    captions = ["a photo of a cat", long]
    fam150 = _variant(family, max_token_length=150)
    ids = fam150.tokenize(captions)
    assert ids.shape == (2, 154)
    # Two chunks, each BOS + 75 ids + EOS; the long caption continues in the second.
    assert ids[:, 0].tolist() == ids[:, 77].tolist() == [49406, 49406]
    assert ids[:, 76].tolist() == ids[:, 153].tolist() == [49407, 49407]
    cat = family.tokenizers[0]("cat").input_ids[1]
    assert (ids[1, 1:76] == cat).all() and (ids[1, 78:103] == cat).all() and ids[1, 103] == 49407
    with torch.no_grad():
        states = fam150.encode_text(ids)
        short = family.encode_text(family.tokenize(captions))
    assert states.shape == (2, 152, 32)
    # The first chunk of the short caption is exactly its 75-token encoding (BOS .. last caption slot).
    assert torch.allclose(states[0, :76], short[0, :76], atol=1e-6)
    with torch.no_grad():
        chunk2 = family.text_encoders[0](ids[:, 77:])[0]
    assert torch.allclose(states[:, 76:151], chunk2[:, 1:76], atol=1e-6)  # chunk 2 without BOS and EOS
    assert torch.allclose(states[:, -1], chunk2[:, -1], atol=1e-6)  # the closing EOS comes from chunk 2


def test_max_token_length_225_and_invalid_values(family):
    fam225 = _variant(family, max_token_length=225)
    ids = fam225.tokenize(["x"])
    assert ids.shape == (1, 231)
    with torch.no_grad():
        assert fam225.encode_text(ids).shape == (1, 227, 32)
    assert _variant(family, max_token_length=75).tokenize(["x"]).shape == (1, 77)
    with pytest.raises(UserError, match="--max_token_length must be 75, 150 or 225, not 100"):
        _variant(family, max_token_length=100)
    with pytest.raises(UserError, match="--clip_skip must be between 1 and 2"):
        _variant(family, clip_skip=3)


def test_chunking_with_a_separate_pad_token():
    """SD 2.x-style ids (pad 0 != EOS 9): kohya's end-of-chunk and empty-chunk fixes."""
    from library.models.sd1 import chunk_input_ids

    short = torch.tensor([[8, 1, 2, 9] + [0] * 148])
    out = chunk_input_ids(short, eos=9, pad=0, max_token_length=150)
    assert out.shape == (1, 154)
    assert out[0, :5].tolist() == [8, 1, 2, 9, 0] and out[0, 76] == 0  # chunk 1 unchanged
    assert out[0, 77:80].tolist() == [8, 9, 0]  # an empty chunk starts BOS, EOS
    long = torch.tensor([[8] + [5] * 100 + [9] + [0] * 50])
    out = chunk_input_ids(long, eos=9, pad=0, max_token_length=150)
    assert out[0, 75:77].tolist() == [5, 9]  # a chunk cut inside the caption ends with EOS
    assert out[0, 77:79].tolist() == [8, 5] and out[0, 102:105].tolist() == [5, 9, 0]


def test_text_gradients_flow_when_training_the_text_encoder(family):
    te = family.text_encoders[0]
    te.requires_grad_(True)
    try:
        family.encode_text(family.tokenize(["sks"])).square().mean().backward()
        grad = te.embeddings.token_embedding.weight.grad
        assert grad is not None and grad[48136].abs().sum() > 0 and grad[100].abs().sum() == 0
    finally:
        te.zero_grad(set_to_none=True)
        te.requires_grad_(False)


def test_encode_images_and_predict(family):
    pixels = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    torch.manual_seed(3)
    latents = family.encode_images(pixels)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = family.vae.encode(pixels).latent_dist.sample() * 0.18215
    assert latents.shape == (2, 4, 8, 8) and not latents.requires_grad
    assert torch.allclose(latents, expected, atol=1e-6)
    text = family.encode_text(family.tokenize(["a", "b"])).detach()
    with torch.no_grad():
        out = family.predict(latents, torch.tensor([1, 999]), text)
        direct = family.unet(latents, torch.tensor([1, 999]), text).sample
    assert out.shape == (2, 4, 8, 8) and torch.equal(out, direct)


def test_xformers_missing_is_a_user_error(family):
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"--xformers needs the xformers package.*--sdpa"):
            enable_xformers(family)
    else:
        pytest.skip("xformers is installed here")


def test_pickle_file_detection_needs_opt_in(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({TO_K: torch.zeros(4, 768)}, path)
    with pytest.raises(UserError, match=r"x\.pt: pickled checkpoints"):
        detect_family(path)
    assert detect_family(path, unsafe_load_ckpt=True) == "sd1"
    assert os.path.exists(path) and files.is_pickle(path)
