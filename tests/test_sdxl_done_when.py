"""Issue 7's "done when": a kohya SDXL LoRA config, flat as the kohya_ss GUI writes it (U-Net only, cached
text-encoder outputs on disk, Prodigy, bucketing), runs unmodified through sdxl_train_network.py on the
tiny SDXL model and gives a U-Net-only file that says it is an SDXL LoRA."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
from safetensors import safe_open

import sdxl_train_network
from library import caching

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "sdxl_lora_prodigy.toml")
# bucket_no_upscale at 64x64 pixels in steps of 32: a 64x96 image shrinks to 43x64 and is cropped to 32x64
BUCKETS = [[32, 64], [64, 64]]


def small_dataset(demo_data, root) -> str:
    """Three demo images (64x64 and 64x96) with .txt captions, as the config expects, in `2_shapes`."""
    folder = os.path.join(root, "2_shapes")
    os.makedirs(folder)
    source = os.path.join(demo_data, "10_shapes")
    for stem in ("shape_00", "shape_01", "shape_06"):
        shutil.copy(os.path.join(source, stem + ".png"), folder)
        shutil.copy(os.path.join(source, stem + ".caption"), os.path.join(folder, stem + ".txt"))
    return str(root)


def test_gui_sdxl_lora_config_runs_unmodified(tiny_sdxl_dir, demo_data, tmp_path):
    data, out = small_dataset(demo_data, tmp_path / "data"), tmp_path / "out"
    # what the tiny model needs: its path, the data, and sizes for 64-pixel images (the config's are 1024's)
    argv = ["--config_file", CONFIG, "--pretrained_model_name_or_path", tiny_sdxl_dir, "--train_data_dir", data,
            "--output_dir", str(out), "--resolution", "64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
            "--bucket_reso_steps", "32", "--max_train_epochs", "1"]
    assert sdxl_train_network.main(argv) == 0
    folder = os.path.join(data, "2_shapes")
    te_files = sorted(n for n in os.listdir(folder) if n.endswith("_te_outputs.npz"))
    assert te_files == ["shape_00_te_outputs.npz", "shape_01_te_outputs.npz", "shape_06_te_outputs.npz"]
    with np.load(os.path.join(folder, te_files[0])) as npz:  # the tiny model: 32-wide encoders, projection 32
        assert (npz["hidden_state1"].shape, npz["hidden_state2"].shape, npz["pool2"].shape) == ((77, 32), (77, 32), (32,))
    with safe_open(str(out / "sdxl_prodigy_lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # SDXL's U-Net names are the LDM ones
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_optimizer"].startswith("prodigyopt.prodigy.Prodigy(") and meta["ss_text_encoder_lr"] == "0.0"
    assert meta["ss_steps"] == "6"  # 3 images x 2 repeats, batch 1, one epoch
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert [b["resolution"] for b in buckets.values()] == BUCKETS
    # a second run reuses the text-encoder files (and the latent files) instead of rewriting them
    mtimes = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder) if n.endswith(".npz")}
    assert len(mtimes) == 6
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out2")
    assert sdxl_train_network.main(argv + ["--max_train_steps", "1"]) == 0
    assert mtimes == {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in mtimes}


def test_sdxl_latent_files_have_kohyas_sdxl_name():
    vae = torch.nn.Linear(2, 2)
    vae.config = argparse.Namespace(scaling_factor=0.13025, to_dict=lambda: {"scaling_factor": 0.13025})
    cfg = argparse.Namespace(cache_latents_to_disk=True, skip_cache_check=False)
    assert caching.make_latent_cache(cfg, vae, "sdxl").suffix == "_sdxl.npz"
    assert caching.make_latent_cache(cfg, vae, "sd2").suffix == caching.make_latent_cache(cfg, vae).suffix == "_sd.npz"
