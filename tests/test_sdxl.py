"""The SDXL family on tiny models: detection, conditioning (shapes, chunks, pooled output, size / crop),
predict against diffusers' UNet called by hand, kohya SDXL command lines end to end, the low-memory path,
sample images; and the real SDXL architecture with empty weights."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.models import detect_family, load_model
from library.models.sdxl import SDXLFamily, default_size_cond
from tests.conftest import train_argv

CAPTIONS = ["a photo of a cat", "a red square on a blue background"]


def _cfg(path: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(pretrained_model_name_or_path=path, **kw)


@pytest.fixture(scope="module")
def fam(tiny_sdxl_dir) -> SDXLFamily:
    return load_model(_cfg(tiny_sdxl_dir))


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# --- loading and conditioning -------------------------------------------------------------------------

def test_tiny_folder_is_detected_and_loads(tiny_sdxl_dir, fam):
    assert detect_family(tiny_sdxl_dir) == "sdxl"
    assert isinstance(fam, SDXLFamily) and fam.name == "sdxl"
    assert len(fam.text_encoders) == 2 and len(fam.tokenizers) == 2
    assert [t.pad_token_id for t in fam.tokenizers] == [49407, 0]
    assert type(fam.text_encoders[1]).__name__ == "CLIPTextModelWithProjection"
    assert fam.resolution_default == 1024 and fam.bucket_divisor == 16
    assert fam.vae.config.scaling_factor == 0.13025 and fam.v_prediction is False


@pytest.mark.parametrize("length, tokens, weighted", [(None, 77, False), (225, 227, False), (225, 227, True)])
def test_conditioning_shapes(tiny_sdxl_dir, length, tokens, weighted):
    fam = load_model(_cfg(tiny_sdxl_dir, max_token_length=length, weighted_captions=weighted))
    with torch.no_grad():
        cond = fam.encode_conditioning(CAPTIONS)
    assert {k: tuple(v.shape) for k, v in cond.items()} == {
        "hidden_state1": (2, tokens, 32), "hidden_state2": (2, tokens, 32), "pool2": (2, 32)}
    assert all(torch.isfinite(v).all() for v in cond.values())


def test_states_are_the_penultimate_layers_and_pool_is_projected(fam):
    ids1, ids2 = fam.tokenize(CAPTIONS[:1])
    assert ids2[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and ids2[0, 7] == 0  # pad "!"
    with torch.no_grad():
        cond = fam.encode_conditioning(CAPTIONS[:1])
        out1 = fam.text_encoders[0](ids1, output_hidden_states=True)
        out2 = fam.text_encoders[1](ids2, output_hidden_states=True)
    assert torch.equal(cond["hidden_state1"], out1.hidden_states[-2])  # no final layer norm
    assert torch.equal(cond["hidden_state2"], out2.hidden_states[-2])
    assert torch.equal(cond["pool2"], out2.text_embeds)


def test_pooled_output_is_the_first_chunks(tiny_sdxl_dir):
    """kohya: with --max_token_length the pooled output comes from the first 75-token chunk only, so
    words after token 75 change the states but not pool2."""
    fam = load_model(_cfg(tiny_sdxl_dir, max_token_length=150))
    head = " ".join(["cat"] * 80)
    with torch.no_grad():
        a = fam.encode_conditioning([head + " red"])
        b = fam.encode_conditioning([head + " blue"])
        first_chunk = fam.text_encoders[1](fam.tokenize([head])[1][:, :77]).text_embeds
    assert torch.equal(a["pool2"], b["pool2"])
    assert torch.allclose(a["pool2"], first_chunk, atol=1e-6)
    assert not torch.allclose(a["hidden_state2"], b["hidden_state2"])


def test_weighted_captions_scale_states_not_pool(tiny_sdxl_dir):
    fam = load_model(_cfg(tiny_sdxl_dir, weighted_captions=True))
    with torch.no_grad():
        plain = fam.encode_conditioning(["a red dog"])
        weighted = fam.encode_conditioning(["a (red:1.5) dog"])
    assert torch.equal(plain["pool2"], weighted["pool2"])
    weights = torch.ones(1, 77, 1)
    weights[0, 2] = 1.5  # "red" is token 2 (after BOS and "a")
    for key in ("hidden_state1", "hidden_state2"):
        scaled = plain[key] * weights
        expected = scaled * plain[key].mean() / scaled.mean()  # kohya keeps each sample's mean
        assert torch.allclose(weighted[key], expected, atol=1e-5)
        assert not torch.allclose(weighted[key], plain[key], atol=1e-3)


def test_clip_skip_is_ignored_with_a_warning(tiny_sdxl_dir, caplog):
    fam = load_model(_cfg(tiny_sdxl_dir, clip_skip=2))
    assert "--clip_skip 2 is ignored for SDXL" in caplog.text
    plain = load_model(_cfg(tiny_sdxl_dir))
    with torch.no_grad():
        assert torch.equal(fam.encode_conditioning(CAPTIONS)["hidden_state1"],
                           plain.encode_conditioning(CAPTIONS)["hidden_state1"])


def test_predict_equals_the_unet_called_by_hand_and_uses_size_cond(fam):
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 16), torch.tensor([10, 500])
    with torch.no_grad():
        cond = fam.encode_conditioning(CAPTIONS)
        default = fam.predict(noisy, t, cond)
        size = torch.tensor([[64.0, 128, 0, 0, 64, 128]] * 2)
        assert torch.equal(default_size_cond(noisy), size)
        assert torch.equal(fam.predict(noisy, t, cond, {"size_cond": size}), default)
        states = torch.cat([cond["hidden_state1"], cond["hidden_state2"]], -1)
        by_hand = fam.unet(noisy, t, encoder_hidden_states=states,
                           added_cond_kwargs={"text_embeds": cond["pool2"], "time_ids": size}).sample
        cropped = fam.predict(noisy, t, cond, {"size_cond": torch.tensor([[256.0, 512, 16, 32, 64, 128]] * 2)})
    assert torch.equal(default, by_hand)
    assert (cropped - default).abs().max() > 1e-4  # the size / crop numbers reach the UNet


def test_scheduler_v_prediction_is_honoured(tiny_sdxl_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "v"
    shutil.copytree(tiny_sdxl_dir, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), prediction_type="v_prediction")))
    assert load_model(_cfg(str(folder))).v_prediction is True
    assert load_model(_cfg(tiny_sdxl_dir, v_parameterization=True)).v_prediction is True


def test_single_file_loads_the_same_model(tiny_sdxl_dir, fam, tmp_path):
    """An SGM-layout single file written from the tiny folder loads into the same conditioning and UNet."""
    from library.models import single_file

    path = str(tmp_path / "tiny_sdxl.safetensors")
    single_file.write_single_file("sdxl", {"unet": fam.unet, "vae": fam.vae, "text_encoders": fam.text_encoders},
                                  path)
    assert detect_family(path) == "sdxl"
    loaded = load_model(_cfg(path))
    assert [t.pad_token_id for t in loaded.tokenizers] == [49407, 0]
    torch.manual_seed(0)
    noisy, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():
        a, b = fam.encode_conditioning(CAPTIONS[:1]), loaded.encode_conditioning(CAPTIONS[:1])
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
        assert torch.allclose(fam.predict(noisy, t, a), loaded.predict(noisy, t, b), atol=1e-5)
    assert loaded.vae.config.scaling_factor == 0.13025
    # --vae: the same file's first_stage_model.* replaces the folder's VAE
    other = load_model(_cfg(tiny_sdxl_dir, vae=path))
    assert other.vae_path == path and other.vae.config.scaling_factor == 0.13025
    assert all(torch.equal(a, b) for a, b in zip(fam.vae.state_dict().values(), other.vae.state_dict().values()))


def test_pipeline_runs_on_the_live_modules(fam):
    from diffusers import EulerDiscreteScheduler

    pipe = fam.pipeline(EulerDiscreteScheduler.from_config(fam.noise_scheduler.config))
    assert pipe.unet is fam.unet and pipe.text_encoder_2 is fam.text_encoders[1] and pipe.watermark is None
    with torch.no_grad():
        text = fam.prompt_embeds("a photo of a cat", "blurry")
        cond = fam.encode_conditioning(["a photo of a cat"])
        latents = pipe(**text, width=64, height=48, num_inference_steps=2, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.allclose(text["prompt_embeds"], torch.cat([cond["hidden_state1"], cond["hidden_state2"]], -1))
    assert torch.allclose(text["pooled_prompt_embeds"], cond["pool2"], atol=1e-6)  # batch of 2 vs 1
    assert text["negative_pooled_prompt_embeds"].shape == (1, 32)
    assert latents.shape == (1, 4, 6, 8) and torch.isfinite(latents).all()


# --- training end to end -----------------------------------------------------------------------------

def _sdxl_argv(model, data, out, *extra):
    # kohya's SDXL LoRA flags; 64 px buckets divide by the tiny UNet's 16
    return train_argv(model, data, str(out), "--max_train_steps", "3", "--cache_latents", *extra)


def test_unet_only_lora_trains_with_kohya_sdxl_names_and_metadata(tiny_sdxl_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    assert train_network.main(_sdxl_argv(tiny_sdxl_dir, demo_data, out, "--network_train_unet_only")) == 0
    sd = load_file(out / "lora.safetensors")
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith("lora_up.weight"))
    meta = _metadata(out / "lora.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_lora_with_both_text_encoders_trains(tiny_sdxl_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    argv = _sdxl_argv(tiny_sdxl_dir, demo_data, out, "--text_encoder_lr", "1e-4", "5e-5")
    assert train_network.main(argv) == 0
    sd = load_file(out / "lora.safetensors")
    prefixes = {k.split("_text_model")[0] for k in sd if k.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    for prefix in ("lora_te1_", "lora_te2_", "lora_unet_"):
        assert any(sd[k].abs().sum() > 0 for k in sd if k.startswith(prefix) and k.endswith("lora_up.weight"))


def test_two_text_encoder_rates_make_two_groups(fam):
    from networks import lora

    network = lora.create_network(1.0, 4, 2, fam.vae, fam.text_encoders, fam.unet)  # not applied: fam is shared
    groups, names = network.prepare_optimizer_params([1e-4, 5e-5], None, 1e-3)
    assert names == ["textencoder1", "textencoder2", "unet"]
    assert [g["lr"] for g in groups] == [1e-4, 5e-5, 1e-3]
    for group, prefix in zip(groups, ("lora_te1_", "lora_te2_")):
        want = {id(p) for lo in network.text_encoder_loras if lo.lora_name.startswith(prefix) for p in lo.parameters()}
        assert want and {id(p) for p in group["params"]} == want
    _, names = network.prepare_optimizer_params([1e-4, 1e-4], None, 1e-3)
    assert names == ["textencoder", "unet"]  # one rate: kohya's single group


def _record_calls(monkeypatch) -> list[tuple]:
    """Wrap SDXLFamily.encode_conditioning / predict: ("encode",) and ("predict", what the UNet was given)."""
    calls = []
    encode, predict = SDXLFamily.encode_conditioning, SDXLFamily.predict

    def recorded_encode(self, captions):
        calls.append(("encode",))
        return encode(self, captions)

    def recorded_predict(self, noisy, timesteps, cond, batch=None):
        seen = {"fp8": self.unet.conv_in.weight.dtype == torch.float8_e4m3fn,
                "checkpointing": self.unet.is_gradient_checkpointing, "shape": tuple(noisy.shape),
                "size_cond": None if batch is None else batch.get("size_cond")}
        calls.append(("predict", seen))
        return predict(self, noisy, timesteps, cond, batch)

    monkeypatch.setattr(SDXLFamily, "encode_conditioning", recorded_encode)
    monkeypatch.setattr(SDXLFamily, "predict", recorded_predict)
    return calls


def test_low_memory_path_together(tiny_sdxl_dir, demo_data, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    argv = _sdxl_argv(tiny_sdxl_dir, demo_data, out, "--network_train_unet_only", "--gradient_checkpointing",
                      "--cache_text_encoder_outputs", "--fp8_base", "--optimizer_type", "AdamW8bit",
                      "--mixed_precision", "bf16", "--logging_dir", str(tmp_path / "logs"))
    calls = _record_calls(monkeypatch)
    assert train_network.main(argv) == 0
    kinds = [c[0] for c in calls]
    # captions are encoded up front only (cached); the 3 steps never run the text encoders
    assert kinds.count("predict") == 3 and "encode" not in kinds[kinds.index("predict"):]
    for _, seen in calls[kinds.index("predict"):]:
        assert seen["fp8"] and seen["checkpointing"]
        batch, _, height, width = seen["shape"]
        assert seen["size_cond"].shape == (batch, 6)
        assert seen["size_cond"][:, 4:].tolist() == [[height * 8, width * 8]] * batch  # target = the bucket
    sd = load_file(out / "lora.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith("lora_up.weight"))
    losses = _logged_losses(tmp_path / "logs")
    assert len(losses) == 3 and all(np.isfinite(losses))


def _logged_losses(logs) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = os.listdir(logs)
    for root, _, names in os.walk(logs / run_dir):
        if any(n.startswith("events.") for n in names):
            events = EventAccumulator(root)
            events.Reload()
            tag = next(t for t in events.Tags()["scalars"] if t.startswith("loss/current"))
            return [e.value for e in events.Scalars(tag)]
    raise AssertionError("no TensorBoard events written")


def test_sample_round_writes_a_finite_image(tiny_sdxl_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a (red:1.2) square --n blue --w 64 --h 48 --s 2 --d 3\n")
    argv = _sdxl_argv(tiny_sdxl_dir, demo_data, out, "--network_train_unet_only", "--max_train_steps", "1",
                      "--sample_prompts", str(prompts), "--sample_every_n_steps", "1")
    assert train_network.main(argv) == 0
    (image,) = [n for n in os.listdir(out / "sample") if "_grid_" not in n]
    pixels = np.asarray(Image.open(out / "sample" / image))
    assert pixels.shape == (48, 64, 3) and pixels.std() > 0


# --- the real architecture ---------------------------------------------------------------------------

def test_real_architecture_with_empty_weights():
    from library.models.synthetic_sdxl import build_sdxl_components

    parts = build_sdxl_components("sdxl", empty=True)
    millions = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for k, m in parts.items()}
    assert millions == {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7}
    fam = SDXLFamily(parts["unet"], parts["vae"], [parts["text_encoder"], parts["text_encoder_2"]], [None, None],
                     model_path="sdxl")
    assert fam.bucket_divisor == 32
    assert parts["unet"].config.cross_attention_dim == 768 + 1280
    assert parts["unet"].config.projection_class_embeddings_input_dim == 6 * 256 + 1280
    assert parts["text_encoder_2"].config.eos_token_id == 49407
