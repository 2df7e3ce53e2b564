"""SD 2.x: detection and loading, the v-prediction rules, kohya command lines end to end, kohya's key set on
the real 768-v architecture, diffusers interop and single-file round trips (tiny models, CPU)."""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library import losses, sampling
from library.config import parse_args
from library.errors import UserError
from library.methods import NetworkMethod
from library.models import detect_family, load_model
from library.models.sd2 import SD2Family, resolve_v_prediction
from library.trainer import Run
from networks import lora
from tests.conftest import train_argv

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with BOS / EOS (CLIP ids)


def _load(model: str, *extra: str):
    return load_model(parse_args(["--pretrained_model_name_or_path", model, *extra]))


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# --- detection, loading, text ------------------------------------------------------------------------

def test_tiny_sd2_folder_is_detected_and_loads_with_pad_zero(tiny_sd2_dir):
    assert detect_family(tiny_sd2_dir) == "sd2"
    fam = _load(tiny_sd2_dir)
    assert isinstance(fam, SD2Family) and fam.name == "sd2"
    config = fam.text_encoders[0].config
    assert (config.num_hidden_layers, config.hidden_size, config.hidden_act) == (2, 32, "gelu")  # as built
    tok = fam.tokenizers[0]
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id) == ("!", 0, 49407)
    assert fam.tokenize(["a photo of a cat"])[0].tolist() == CAT + [0] * 70
    assert (fam.v_prediction, fam.resolution_default, fam.bucket_divisor) == (False, 512, 16)
    assert fam.encode_conditioning(["a photo of a cat"])["hidden_state"].shape == (1, 77, 32)


def test_long_captions_chunk_with_pad_zero_as_kohya(tiny_sd2_dir):
    fam = _load(tiny_sd2_dir, "--max_token_length", "150")
    ids = fam.tokenize(["a photo of a cat"])[0].tolist()
    assert len(ids) == 154
    # chunk 1: BOS, the caption, EOS, padding; chunk 2 holds only padding, so it starts with EOS (kohya)
    assert ids[:77] == CAT + [0] * 70
    assert ids[77:] == [49406, 49407] + [0] * 75
    assert fam.encode_conditioning(["a photo of a cat"])["hidden_state"].shape == (1, 152, 32)


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(tiny_sd2_dir):
    fam = _load(tiny_sd2_dir, "--clip_skip", "2")
    encoder = fam.text_encoders[0]
    ids = fam.tokenize(["a photo of a cat"])
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        want = encoder.final_layer_norm(hidden[-2])
        got = fam.encode_conditioning(["a photo of a cat"])["hidden_state"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, encoder(ids)[0].detach())  # not the last layer


def test_vae_option_replaces_the_models_vae(tiny_sd2_v_dir, tmp_path):
    from library.models.synthetic import build_sd2_components

    other = build_sd2_components("tiny", seed=1)["vae"]
    other.save_pretrained(str(tmp_path / "vae"))
    fam = _load(tiny_sd2_v_dir, "--vae", str(tmp_path / "vae"))
    assert fam.vae_path == str(tmp_path / "vae")
    got, want = fam.vae.state_dict(), other.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# --- v-prediction: the flag, the folder's scheduler config, single files -------------------------------

def test_folder_prediction_type_switches_v_prediction_on(tiny_sd2_v_dir, caplog):
    with caplog.at_level(logging.INFO, logger="library.models.sd2"):
        fam = _load(tiny_sd2_v_dir)
    assert fam.v_prediction and fam.resolution_default == 768
    (record,) = [r for r in caplog.records if r.name == "library.models.sd2"]
    assert record.levelno == logging.INFO and "v_prediction: training with v-prediction" in record.getMessage()


def test_epsilon_folder_stays_epsilon_unless_the_flag_says_v(tiny_sd2_dir, caplog):
    with caplog.at_level(logging.INFO, logger="library.models.sd2"):
        assert _load(tiny_sd2_dir).v_prediction is False
    assert not [r for r in caplog.records if r.name == "library.models.sd2"]
    with caplog.at_level(logging.INFO, logger="library.models.sd2"):
        fam = _load(tiny_sd2_dir, "--v_parameterization")
    assert fam.v_prediction and fam.resolution_default == 768
    (record,) = [r for r in caplog.records if r.name == "library.models.sd2"]
    assert record.levelno == logging.WARNING and "prediction_type epsilon, but --v_parameterization" in record.message


def test_a_file_that_cannot_say_trains_epsilon_with_one_warning(caplog):
    with caplog.at_level(logging.INFO, logger="library.models.sd2"):
        assert resolve_v_prediction(False, None, "v2-1_768.safetensors") is False
        assert resolve_v_prediction(True, None, "v2-1_768.safetensors") is True
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "training as epsilon; pass --v_parameterization for 768-v models" in record.getMessage()


def test_sd1_models_keep_their_behaviour(tiny_model_dir):
    fam = _load(tiny_model_dir)
    assert (fam.name, fam.v_prediction, fam.resolution_default) == ("sd1", False, 512)
    assert fam.tokenizers[0].pad_token_id == 49407
    with pytest.raises(UserError, match="--v2"):
        _load(tiny_model_dir, "--v2")


@pytest.mark.parametrize("fixture, v_target", [("tiny_sd2_v_dir", True), ("tiny_sd2_dir", False)])
def test_the_training_target_follows_the_model(fixture, v_target, demo_data, tmp_path, monkeypatch, request):
    """One step's loss equals the MSE against v = sqrt(abar) * noise - sqrt(1 - abar) * x0, computed here by
    hand, on the v model (no flag given), and against the noise on the epsilon model."""
    model = request.getfixturevalue(fixture)
    run = Run(parse_args(train_argv(model, demo_data, str(tmp_path / "out"), "--cache_latents")), NetworkMethod)
    run.prepare()
    run.dataset.set_epoch(0)
    batch = run.dataset[0]
    seen = {}
    noisy_latents = losses.noisy_latents

    def record(*args):
        seen["noise"], seen["noisy"], seen["t"] = noisy_latents(*args)
        return seen["noise"], seen["noisy"], seen["t"]

    monkeypatch.setattr(losses, "noisy_latents", record)
    fam = run.family
    with torch.no_grad():
        loss = run.step_loss(batch).item()
        pred = fam.predict(seen["noisy"], seen["t"], fam.encode_conditioning(batch["captions"]))
    abar = fam.noise_scheduler.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    v = abar.sqrt() * seen["noise"] - (1 - abar).sqrt() * batch["latents"]
    v_loss = torch.nn.functional.mse_loss(pred, v).item()
    eps_loss = torch.nn.functional.mse_loss(pred, seen["noise"]).item()
    assert fam.v_prediction is v_target
    assert abs(v_loss - eps_loss) > 0.01  # the two targets are told apart
    assert loss == pytest.approx(v_loss if v_target else eps_loss, rel=1e-5)


# --- kohya command lines end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_v(tiny_sd2_v_dir, demo_data, tmp_path_factory) -> Path:
    """kohya's SD 2.x 768-v flags on the tiny v model: 4 steps, a sample round after step 2."""
    out = tmp_path_factory.mktemp("sd2_v")
    prompts = out / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 3\n", encoding="utf-8")
    argv = train_argv(tiny_sd2_v_dir, demo_data, str(out / "out"), "--v2", "--v_parameterization",
                      "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")
    assert train_network.main(argv) == 0
    return out / "out"


def test_kohya_v2_v_command_line_trains_and_names_the_file(trained_v):
    sd = load_file(trained_v / "lora.safetensors")
    assert sum(k.endswith(".lora_down.weight") for k in sd) == 60  # 12 text encoder + 48 U-Net layers
    assert any(k.startswith("lora_te_text_model_encoder_layers_1_") for k in sd)
    assert any(sd[k].abs().sum() > 0 for k in sd if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))
    meta = _metadata(trained_v / "lora.safetensors")
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"


def test_a_sample_round_on_the_v_model_gives_a_real_image(trained_v, tiny_sd2_v_dir):
    names = sorted(n for n in os.listdir(trained_v / "sample") if "_grid" not in n)
    assert [n.split("_")[1:3] for n in names] == [["000002", "00"], ["000004", "00"]]  # after steps 2 and 4
    image = np.asarray(Image.open(trained_v / "sample" / names[0]), dtype=np.float32)
    assert image.shape == (64, 64, 3) and image.std() > 1  # not flat, not black
    # the pipeline's own output before PNG quantisation: finite, v-prediction scheduler
    fam = _load(tiny_sd2_v_dir)
    scheduler = sampling.make_scheduler("euler_a", fam.noise_scheduler, fam.v_prediction)
    assert scheduler.config.prediction_type == "v_prediction"
    with torch.no_grad():
        out = fam.pipeline(scheduler)(**fam.prompt_embeds("a red square", ""), width=64, height=64,
                                      num_inference_steps=2, output_type="np",
                                      generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and out.std() > 0


def _recipe_data(demo_data, root: Path) -> str:
    """Four demo images with .txt captions (the example configs' caption_extension)."""
    target = root / "1_shapes"
    target.mkdir(parents=True)
    for i in range(4):
        source = Path(demo_data) / "10_shapes" / f"shape_{i:02d}"
        shutil.copy(source.with_suffix(".png"), target / f"shape_{i:02d}.png")
        shutil.copy(source.with_suffix(".caption"), target / f"shape_{i:02d}.txt")
    return str(root)


def test_example_768v_config_runs_unmodified(tiny_sd2_v_dir, demo_data, tmp_path):
    from library.trainer import train

    out = tmp_path / "out"
    cfg = parse_args(["--config_file", str(REPO / "configs" / "sd2_768v_lora.toml"),
                      "--pretrained_model_name_or_path", tiny_sd2_v_dir, "--train_data_dir",
                      _recipe_data(demo_data, tmp_path / "data"), "--output_dir", str(out), "--resolution", "64",
                      "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--max_train_epochs", "1",
                      "--max_data_loader_n_workers", "0"])
    assert cfg.v2 and cfg.v_parameterization and cfg.max_token_length == 225
    step_losses = train(cfg, NetworkMethod)
    assert len(step_losses) == 2 and all(math.isfinite(x) for x in step_losses)  # 4 images, batch 2
    path = out / "sd2_768v_lora.safetensors"
    meta = _metadata(path)
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_max_token_length"] == "225"
    assert meta["ss_network_dim"] == "16" and meta["ss_steps"] == "2"
    assert {t.dtype for t in load_file(path).values()} == {torch.float16}  # save_precision fp16


# --- the real SD 2.x 768-v architecture (empty weights) ------------------------------------------------

def _stored_sd2_models():
    """UNet and text encoder of library/models/configs/sd2 (what single files load into), empty weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.single_file import read_stock_config

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(read_stock_config("sd2", "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_dict(read_stock_config("sd2", "text_encoder")))
    return unet, text


def test_stored_configs_are_the_768v_architecture():
    from library.models.single_file import read_stock_config
    from library.models.files import folder_prediction_type
    from library.models.sd2 import CONFIG_DIR
    from library.models.synthetic import sd2_configs

    for name, built in sd2_configs("sd2").items():
        stored = read_stock_config("sd2", name)
        assert {k: stored[k] for k in built} == {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in built.items()}, name
    assert read_stock_config("sd2", "unet")["attention_head_dim"] == [5, 10, 20, 20]
    assert read_stock_config("sd2", "vae")["sample_size"] == 768
    assert folder_prediction_type(CONFIG_DIR) == "v_prediction"


def test_real_sd2_architecture_gives_kohyas_key_set():
    from library.models.synthetic import build_sd1_components

    unet, text = _stored_sd2_models()
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 865.9
    assert (text.config.num_hidden_layers, text.config.hidden_size) == (23, 1024)
    net = lora.create_network(1.0, 4, 1.0, None, text, unet)
    te_names = {m.lora_name for m in net.text_encoder_loras}
    parts = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    assert te_names == {f"lora_te_text_model_encoder_layers_{i}_{p}" for i in range(23) for p in parts}  # 138
    # the U-Net's layer names are SD 1.5's (192); SD 2.x's proj_in / proj_out are Linear, not 1x1 convs
    sd15 = build_sd1_components("sd15", empty=True)
    sd15_names = {m.lora_name for m in lora.create_network(1.0, 4, 1.0, None, sd15["text_encoder"],
                                                           sd15["unet"]).unet_loras}
    unet_loras = {m.lora_name: m for m in net.unet_loras}
    assert len(unet_loras) == 192 and set(unet_loras) == sd15_names
    proj_in = unet_loras["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert tuple(proj_in.lora_down.weight.shape) == (4, 320)
    assert tuple(unet_loras["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]
                 .lora_down.weight.shape) == (4, 1024)


# --- interop -------------------------------------------------------------------------------------------

def test_diffusers_takes_every_key_and_fuses_w_plus_up_down(trained_v, tiny_sd2_v_dir):
    import warnings

    from diffusers import StableDiffusionPipeline

    path = str(trained_v / "lora.safetensors")
    sd = load_file(path)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2_v_dir, local_files_only=True)
    models = {"lora_te": pipe.text_encoder, "lora_unet": pipe.unet}
    # kohya name -> (prefix, module path), from the same naming rule on the pipeline's own modules
    net = lora.create_network(1.0, 4, 1.0, None, pipe.text_encoder, pipe.unet)
    paths = {id(m): (prefix, p) for prefix, model in models.items() for p, m in model.named_modules()}
    where = {m.lora_name: paths[id(m.org_module)] for m in net.loras}
    names = {k.split(".")[0] for k in sd}
    assert names <= where.keys() and len(names) == 60
    base = {prefix: {k: v.clone() for k, v in m.state_dict().items()} for prefix, m in models.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(path)  # raises on a key it cannot rename
    assert not [str(w.message) for w in caught if "did not match" in str(w.message)]
    adapted = {(prefix, p) for prefix, m in models.items() for p, sub in m.named_modules() if hasattr(sub, "lora_A")}
    assert adapted == {where[n] for n in names}
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for name in names:
        prefix, module_path = where[name]
        up, down = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]
        want = base[prefix][module_path + ".weight"] + up @ down * sd[f"{name}.alpha"] / down.shape[0]
        got = models[prefix].state_dict()[module_path + ".weight"]
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0, msg=name)


def test_single_file_round_trip(tiny_sd2_v_dir, tmp_path, caplog):
    single_file = pytest.importorskip("library.models.single_file")
    components = dict(zip(("unet", "vae", "text_encoder", "tokenizer"),
                          SD2Family.load_folder_components(tiny_sd2_v_dir)))
    path = str(tmp_path / "tiny_sd2.safetensors")
    single_file.write_single_file("sd2", {"unet": components["unet"], "vae": components["vae"],
                                          "text_encoders": [components["text_encoder"]]}, path)
    assert detect_family(path) == "sd2"
    with caplog.at_level(logging.WARNING, logger="library.models.sd2"):
        fam = _load(path)
    assert not fam.v_prediction and "pass --v_parameterization" in caplog.text  # a file cannot say
    assert fam.tokenizers[0].pad_token_id == 0
    for name, loaded in (("unet", fam.unet), ("vae", fam.vae), ("text_encoder", fam.text_encoders[0])):
        want = components[name].state_dict()
        got = loaded.state_dict()
        assert got.keys() == want.keys(), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key}"
    assert _load(path, "--v_parameterization").v_prediction
