"""Inpainting models (9-channel U-Net): the conditioning, the U-Net input order, training a LoRA on one."""

from __future__ import annotations

import argparse
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library import inpainting
from library.config import parse_args
from library.errors import UserError
from library.methods import NetworkMethod
from library.models import load_model
from library.trainer import Run
from tests.conftest import files_under, train_argv


@pytest.fixture(scope="module")
def tiny_inpaint_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny SD1 folder with a U-Net of 9 input channels (an SD 1.x inpainting model)."""
    from diffusers import UNet2DConditionModel

    from library.models.synthetic import sd1_configs

    path = str(tmp_path_factory.mktemp("models") / "tiny_sd1_inpaint")
    shutil.copytree(tiny_model_dir, path)
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**dict(sd1_configs("tiny")["unet"], in_channels=9))
    shutil.rmtree(os.path.join(path, "unet"))
    unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def inpaint_family(tiny_inpaint_dir):
    return load_model(argparse.Namespace(pretrained_model_name_or_path=tiny_inpaint_dir))


@pytest.fixture(scope="module")
def plain_family(tiny_model_dir):
    return load_model(argparse.Namespace(pretrained_model_name_or_path=tiny_model_dir))


def _cfg(**kw):
    return argparse.Namespace(**{"seed": 1, "cache_latents": False, "cache_latents_to_disk": False, **kw})


def test_predict_concatenates_noisy_mask_masked_latents(inpaint_family):
    fam = inpaint_family
    assert inpainting.is_inpainting(fam) and fam.unet.config.in_channels == 9
    gen = torch.Generator().manual_seed(0)
    noisy, extra = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 8, 8, generator=gen)
    states = torch.randn(2, 77, fam.unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        got = fam.predict(noisy, t, {"hidden_state": states}, {"inpaint_cond": extra})
        by_hand = fam.unet(torch.cat([noisy, extra], dim=1), t, states).sample
        swapped = fam.unet(torch.cat([extra, noisy], dim=1)[:, [4, 5, 6, 7, 8, 0, 1, 2, 3]], t, states).sample
    assert got.shape == (2, 4, 8, 8)
    assert torch.equal(got, by_hand)
    assert (got - swapped).abs().max() > 1e-4  # the order matters, so the check above means something
    with pytest.raises(UserError, match="inpaint_cond"):
        fam.predict(noisy, t, {"hidden_state": states}, {})


def test_masked_image_latents_are_vae_of_masked_pixels(inpaint_family):
    fam = inpaint_family
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    loss_masks = torch.zeros(2, 1, 8, 8)
    loss_masks[0, :, 2:6, 1:5] = 0.8  # >= 0.5: painted
    loss_masks[1, :, 4:, :] = 0.3  # < 0.5: kept
    batch = {"images": images, "masks": loss_masks, "image_paths": ["a.png", "b.png"]}
    torch.manual_seed(7)
    inpainting.add_conditioning(batch, torch.zeros(2, 4, 8, 8), fam, _cfg())
    cond = batch["inpaint_cond"]
    assert cond.shape == (2, 5, 8, 8)
    binary = (loss_masks >= 0.5).float()
    assert torch.equal(cond[:, :1], binary)
    assert cond[0, 0].sum() == 16 and cond[1, 0].sum() == 0
    # by hand: pixel mask = every latent cell an 8x8 block; masked image = image * (mask < 0.5)
    pixel_mask = binary.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    masked = images * (pixel_mask < 0.5)
    assert masked[0, :, 16:48, 8:40].abs().sum() == 0 and torch.equal(masked[1], images[1])
    torch.manual_seed(7)
    with torch.no_grad():
        expected = fam.vae.encode(masked).latent_dist.sample() * fam.vae.config.scaling_factor
    assert fam.vae.config.scaling_factor == pytest.approx(0.18215)
    torch.testing.assert_close(cond[:, 1:], expected, rtol=0, atol=1e-6)


def test_random_masks_are_seeded_and_mixed():
    a = inpainting.random_mask(inpainting.sample_rng(1, 5, 0, "x.png"), 8, 12)
    b = inpainting.random_mask(inpainting.sample_rng(1, 5, 0, "x.png"), 8, 12)
    assert a.shape == (1, 8, 12) and torch.equal(a, b)  # a resumed run draws the same
    masks = [inpainting.random_mask(inpainting.sample_rng(1, step, 0, "x.png"), 16, 16) for step in range(400)]
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks)
    full = sum(bool(m.min() == 1) for m in masks) / len(masks)
    partial = sum(bool(0 < m.mean() < 1) for m in masks) / len(masks)
    assert 0.18 < full < 0.40  # FULL_SHARE = 0.25, plus rectangles that happen to cover everything
    assert partial > 0.55
    assert sum(not torch.equal(masks[0], m) for m in masks[1:]) > 350


def test_random_masks_in_batch(inpaint_family):
    fam = inpaint_family
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    batch = {"images": images, "masks": None, "image_paths": ["a.png", "b.png", "c.png"]}
    inpainting.add_conditioning(batch, torch.zeros(3, 4, 8, 8), fam, _cfg(seed=4), step=9)
    expected = torch.stack([inpainting.random_mask(inpainting.sample_rng(4, 9, i, p), 8, 8)
                            for i, p in enumerate(batch["image_paths"])])
    assert torch.equal(batch["inpaint_cond"][:, :1], expected)


def test_four_channel_batches_untouched(plain_family):
    assert not inpainting.is_inpainting(plain_family)
    images = torch.rand(1, 3, 64, 64)
    batch = {"images": images, "masks": None, "image_paths": ["a.png"]}
    inpainting.add_conditioning(batch, torch.zeros(1, 4, 8, 8), plain_family, _cfg())
    assert set(batch) == {"images", "masks", "image_paths"} and batch["images"] is images
    inpainting.check_options(_cfg(cache_latents=True), plain_family)  # no objection


def test_cached_latents_refused(inpaint_family):
    with pytest.raises(UserError, match="drop --cache_latents"):
        inpainting.check_options(_cfg(cache_latents=True), inpaint_family)
    batch = {"images": None, "latents": torch.zeros(1, 4, 8, 8), "masks": None, "image_paths": ["a.png"]}
    with pytest.raises(UserError, match="drop --cache_latents"):
        inpainting.add_conditioning(batch, batch["latents"], inpaint_family, _cfg())


@pytest.mark.parametrize("extra", [(), ("--alpha_mask",)], ids=["random_masks", "alpha_masks"])
def test_lora_trains_on_inpainting_model(tiny_inpaint_dir, demo_data, tmp_path, monkeypatch, extra):
    seen = []  # (the batch had loss masks, share of latent cells painted) per step
    add = inpainting.add_conditioning

    def spy(batch, latents, fam, cfg, step=0):
        add(batch, latents, fam, cfg, step)
        seen.append((batch["masks"] is not None, batch["inpaint_cond"][:, 0].mean().item()))

    monkeypatch.setattr(inpainting, "add_conditioning", spy)
    out = tmp_path / "out"
    argv = train_argv(tiny_inpaint_dir, demo_data, str(out), "--max_train_steps", "6", *extra)
    losses = Run(parse_args(argv), NetworkMethod).train()
    assert len(losses) == 6 and all(math.isfinite(x) and x > 0 for x in losses)
    assert len(seen) == 6 and all(masked == bool(extra) for masked, _ in seen)
    if not extra:  # random masks: some cells painted, some kept
        assert all(0 < share <= 1 for _, share in seen) and any(share < 1 for _, share in seen)
    sd = load_file(out / "lora.safetensors")
    ups = [k for k in sd if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert ups and any(sd[k].abs().sum() > 0 for k in ups)
    # the first conv reads 9 channels; LoRA wraps linear / 1x1 layers, so the file has no conv_in module
    assert not any(k.startswith("lora_unet_conv_in") for k in sd)


def test_train_network_main_runs(tiny_inpaint_dir, demo_data, tmp_path):
    out = tmp_path / "out"
    assert train_network.main(train_argv(tiny_inpaint_dir, demo_data, str(out))) == 0
    assert (out / "lora.safetensors").exists()


def test_single_file_inpainting_model_loads_with_nine_channels(tiny_inpaint_dir, tmp_path):
    from library.models.synthetic import write_sd1_single_file

    path = str(tmp_path / "inpaint.safetensors")
    write_sd1_single_file(tiny_inpaint_dir, path)
    fam = load_model(argparse.Namespace(pretrained_model_name_or_path=path))
    assert inpainting.is_inpainting(fam)
    folder = load_model(argparse.Namespace(pretrained_model_name_or_path=tiny_inpaint_dir))
    torch.testing.assert_close(fam.unet.conv_in.weight, folder.unet.conv_in.weight, rtol=0, atol=0)


def test_sample_pipeline_paints_blank_image(inpaint_family):
    from diffusers import DDIMScheduler

    fam = inpaint_family
    pipe = inpainting.sample_pipeline(fam, DDIMScheduler.from_config(fam.noise_scheduler.config))
    with torch.no_grad():
        text = fam.prompt_embeds("a red square", "")
        latents = pipe(**text, width=64, height=64, num_inference_steps=2, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_sample_rounds_during_training(tiny_inpaint_dir, demo_data, tmp_path):
    """A sample round on an inpainting model: the family's pipeline paints a blank, fully masked image."""
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 7\na circle --w 32 --h 48 --s 2 --ss euler_a\n")
    out = tmp_path / "out"
    argv = train_argv(tiny_inpaint_dir, demo_data, str(out), "--max_train_steps", "2", "--sample_prompts",
                      str(prompts), "--sample_every_n_steps", "2")
    assert train_network.main(argv) == 0
    names = sorted(os.listdir(out / "sample"))
    assert len(names) == 3 and names[0].startswith("lora_000002_00")
    assert Image.open(out / "sample" / names[1]).size == (32, 48)
    assert np.asarray(Image.open(out / "sample" / names[0])).std() > 0


def test_sd2_inpainting_model_trains(tiny_sd2_dir, demo_data, tmp_path):
    from diffusers import UNet2DConditionModel

    from library.models.synthetic import sd2_configs

    path = str(tmp_path / "tiny_sd2_inpaint")
    shutil.copytree(tiny_sd2_dir, path)
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**dict(sd2_configs("tiny")["unet"], in_channels=9))
    shutil.rmtree(os.path.join(path, "unet"))
    unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
    losses = Run(parse_args(train_argv(path, demo_data, str(tmp_path / "out"))), NetworkMethod).train()
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_other_families_refused():
    from types import SimpleNamespace

    sdxl = SimpleNamespace(name="sdxl", unet=SimpleNamespace(config=SimpleNamespace(in_channels=9)))
    with pytest.raises(UserError, match="SD 1.x / 2.x only, not sdxl"):
        inpainting.check_options(_cfg(), sdxl)


def test_cache_latents_stops_before_anything_is_written(tiny_inpaint_dir, demo_data, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(demo_data, data)
    before = files_under(data)
    argv = train_argv(tiny_inpaint_dir, str(data), str(out), "--cache_latents", "--cache_latents_to_disk")
    assert train_network.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: an inpainting model encodes the masked image at every step: drop --cache_latents "
                   "(and --cache_latents_to_disk)"]
    assert files_under(out) == [] and files_under(data) == before
