"""library.saving (atomic writes, hashes) and library.metadata (kohya ss_* / modelspec.* keys)."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os

import pytest
import safetensors.torch
import torch

from library import metadata as md
from library import saving
from library.errors import UserError

MIB = 1024 * 1024

# Every ss_* key kohya's train_network.py writes for a DreamBooth-folder run (no --dataset_config) with
# no --network_args and no --vae, from a base model that exists locally, before the first save.
KOHYA_DEFAULT_SS_KEYS = {
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr",
    "ss_unet_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images",
    "ss_num_batches_per_epoch", "ss_num_epochs", "ss_gradient_checkpointing",
    "ss_gradient_accumulation_steps", "ss_max_train_steps", "ss_lr_warmup_steps", "ss_lr_scheduler",
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_dropout", "ss_mixed_precision",
    "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip", "ss_max_token_length",
    "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset", "ss_multires_noise_iterations",
    "ss_multires_noise_discount", "ss_adaptive_noise_scale", "ss_zero_terminal_snr", "ss_training_comment",
    "ss_sd_scripts_commit_hash", "ss_optimizer", "ss_max_grad_norm", "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_face_crop_aug_range",
    "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms", "ss_ip_noise_gamma",
    "ss_debiased_estimation", "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength",
    "ss_loss_type", "ss_huber_schedule", "ss_huber_scale", "ss_huber_c", "ss_fp8_base", "ss_fp8_base_unet",
    "ss_validation_seed", "ss_validation_split", "ss_max_validation_steps", "ss_validate_every_n_epochs",
    "ss_validate_every_n_steps", "ss_resize_interpolation",
    # the single-dataset block
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info",
    # base model
    "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash",
}
KOHYA_SD1_LORA_MODELSPEC_KEYS = {
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.date", "modelspec.resolution", "modelspec.prediction_type",
}


def kohya_cfg(**overrides) -> argparse.Namespace:
    """kohya's train_network defaults for the options metadata reads, plus a typical LoRA run."""
    values = dict(
        output_name="mylora", learning_rate=1e-4, text_encoder_lr=None, unet_lr=None,
        gradient_checkpointing=False, gradient_accumulation_steps=1, lr_warmup_steps=0, lr_scheduler="constant",
        network_module="networks.lora", network_dim=4, network_alpha=1, network_dropout=None, network_args=None,
        dim_from_weights=False, mixed_precision="no", full_fp16=False, clip_skip=None, max_token_length=None,
        cache_latents=False, seed=42, lowram=False, noise_offset=None, multires_noise_iterations=None,
        multires_noise_discount=0.3, adaptive_noise_scale=None, zero_terminal_snr=False, training_comment=None,
        max_grad_norm=1.0, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0, face_crop_aug_range=None, prior_loss_weight=1.0, min_snr_gamma=None,
        scale_weight_norms=None, ip_noise_gamma=None, debiased_estimation_loss=False, train_batch_size=2,
        resolution="512", color_aug=False, flip_aug=False, random_crop=False, shuffle_caption=False,
        enable_bucket=False, bucket_no_upscale=False, min_bucket_reso=256, max_bucket_reso=1024, keep_tokens=0,
        dataset_config=None, no_metadata=False, metadata_title=None, metadata_author=None,
        metadata_description=None, metadata_license=None, metadata_tags=None, min_timestep=None,
        max_timestep=None,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


DATASET_INFO = {
    "num_train_images": 20,
    "num_reg_images": 0,
    "dataset_dirs": {"10_sks dog": {"n_repeats": 10, "img_count": 2}},
    "tag_frequency": {"10_sks dog": {"sks dog": 2, "grass": 1}},
    "bucket_info": None,
    "resolution": (512, 512),
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
}
STARTED_AT = 1_700_000_000.25


def build(cfg, model_path, **overrides):
    kwargs = dict(
        dataset_info=DATASET_INFO, family_name="sd1", v_prediction=False, num_batches_per_epoch=10,
        num_epochs=3, max_train_steps=30, optimizer_name="torch.optim.adamw.AdamW", session_id=1234,
        training_started_at=STARTED_AT, model_path=str(model_path), vae_path=None,
    )
    kwargs.update(overrides)
    return md.build_training_metadata(cfg, **kwargs)


def lora_tensors(seed: int = 0, rows: int = 320) -> dict[str, torch.Tensor]:
    """About 1.25 MiB of float32, so the legacy hash window (1 MiB .. 1 MiB + 64 KiB) holds tensor data."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(rows, 1024, generator=gen),
        "lora_unet_a.lora_up.weight": torch.randn(8, 4, generator=gen),
        "lora_unet_a.alpha": torch.tensor(4.0),
    }


def data_section(path) -> bytes:
    raw = open(path, "rb").read()
    header_length = int.from_bytes(raw[:8], "little")
    return raw[8 + header_length:]


# --- saving -------------------------------------------------------------------------------------------


def test_save_roundtrip_makes_tensors_contiguous_and_unshared(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "half_a": base[:2], "half_b": base[2:], "bf16": torch.ones(3, dtype=torch.bfloat16)}
    path = tmp_path / "out.safetensors"
    saving.save_safetensors(tensors, str(path), {"ss_x": "1", "modelspec.title": "t"})
    loaded = safetensors.torch.load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["bf16"].dtype == torch.bfloat16
    assert saving.read_safetensors_metadata(str(path)) == {"ss_x": "1", "modelspec.title": "t"}
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


@pytest.mark.parametrize("bad", [{"ss_dim": 4}, {"ss_flag": None}, {3: "x"}])
def test_non_str_metadata_is_a_type_error_and_writes_nothing(tmp_path, bad):
    with pytest.raises(TypeError):
        saving.save_safetensors({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"), bad)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_earlier_file_and_leaves_no_temp(tmp_path, monkeypatch, error):
    path = tmp_path / "model.safetensors"
    saving.save_safetensors({"a": torch.arange(5.0)}, str(path), {"ss_epoch": "1"})
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 100)  # half a file, then the failure
        raise error

    monkeypatch.setattr(saving.safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(type(error)):
        saving.save_safetensors({"a": torch.arange(7.0)}, str(path), {"ss_epoch": "2"})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_atomic_write_text_replaces_and_survives_a_failed_rename(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "config.toml"
    saving.atomic_write_text(str(path), "a = 1\n")
    saving.atomic_write_text(str(path), "a = 2\nname = \"caf\u00e9\"\n")
    assert path.read_text(encoding="utf-8") == "a = 2\nname = \"caf\u00e9\"\n"

    def refuse(src, dst):
        raise PermissionError("locked")

    monkeypatch.setattr(saving.os, "replace", refuse)
    with pytest.raises(PermissionError):
        saving.atomic_write_text(str(path), "a = 3\n")
    assert path.read_text(encoding="utf-8") == "a = 2\nname = \"caf\u00e9\"\n"
    assert os.listdir(path.parent) == ["config.toml"]


def test_sshs_hashes_equal_hashlib_over_the_byte_ranges(tmp_path):
    tensors = lora_tensors()
    ss_only = {"ss_network_dim": "4", "ss_epoch": "3"}
    everything = dict(ss_only, **{"modelspec.title": "x", "other": "y"})

    # Independent: a file holding only the ss_* metadata, hashed over kohya's byte ranges.
    reference = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(tensors, str(reference), ss_only)
    raw = reference.read_bytes()
    assert len(raw) > MIB + 0x10000
    expected_model = hashlib.sha256(data_section(reference)).hexdigest()
    expected_legacy = hashlib.sha256(raw[MIB:MIB + 0x10000]).hexdigest()[:8]

    model, legacy = saving.precalculate_safetensors_hashes(tensors, everything)
    assert (model, legacy) == (expected_model, expected_legacy)
    assert len(model) == 64 and len(legacy) == 8

    # Non-ss metadata never changes them; ss metadata shifts the data and so changes the legacy hash only.
    assert saving.precalculate_safetensors_hashes(tensors, ss_only) == (model, legacy)
    moved_model, moved_legacy = saving.precalculate_safetensors_hashes(tensors, dict(ss_only, ss_comment="z" * 40))
    assert moved_model == model and moved_legacy != legacy

    # The file we write with all metadata has the same data section the model hash was taken over.
    written = tmp_path / "written.safetensors"
    saving.save_safetensors(tensors, str(written), saving.add_model_hashes(tensors, everything))
    assert hashlib.sha256(data_section(written)).hexdigest() == model
    assert saving.read_safetensors_metadata(str(written))["sshs_legacy_hash"] == legacy


def test_hashes_follow_the_saved_dtype():
    tensors = lora_tensors(rows=8)
    half = {k: v.to(torch.float16) for k, v in tensors.items()}
    assert saving.precalculate_safetensors_hashes(tensors, {})[0] != saving.precalculate_safetensors_hashes(half, {})[0]


def test_model_hash_and_file_sha256(tmp_path):
    data = bytes(range(256)) * (6 * 1024 + 7)  # 1.5 MiB and change
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    assert saving.model_hash(str(big)) == hashlib.sha256(data[MIB:MIB + 0x10000]).hexdigest()[:8]
    assert saving.file_sha256(str(big)) == hashlib.sha256(data).hexdigest()
    small = tmp_path / "small.bin"
    small.write_bytes(b"tiny")
    # A file under 1 MiB hashes an empty window, as A1111 does.
    assert saving.model_hash(str(small)) == "e3b0c442"
    assert saving.file_sha256(str(small)) == hashlib.sha256(b"tiny").hexdigest()


# --- metadata ---------------------------------------------------------------------------------------


def test_default_run_has_kohyas_keys_as_strings(tmp_path):
    model_folder = tmp_path / "my_sd15"
    model_folder.mkdir()
    meta = build(kohya_cfg(), model_folder)
    assert all(isinstance(v, str) for v in meta.values())
    assert {k for k in meta if k.startswith("ss_")} == KOHYA_DEFAULT_SS_KEYS
    assert {k for k in meta if k.startswith("modelspec.")} == KOHYA_SD1_LORA_MODELSPEC_KEYS
    assert set(meta) == KOHYA_DEFAULT_SS_KEYS | KOHYA_SD1_LORA_MODELSPEC_KEYS

    expected = {
        "ss_session_id": "1234", "ss_training_started_at": "1700000000.25", "ss_output_name": "mylora",
        "ss_learning_rate": "0.0001", "ss_text_encoder_lr": "None", "ss_num_train_images": "20",
        "ss_num_validation_images": "0", "ss_num_reg_images": "0", "ss_num_batches_per_epoch": "10",
        "ss_num_epochs": "3", "ss_max_train_steps": "30", "ss_network_module": "networks.lora",
        "ss_network_dim": "4", "ss_network_alpha": "1", "ss_network_dropout": "None", "ss_v2": "False",
        "ss_base_model_version": "sd_v1", "ss_seed": "42", "ss_noise_offset": "None",
        "ss_multires_noise_discount": "0.3", "ss_optimizer": "torch.optim.adamw.AdamW", "ss_loss_type": "l2",
        "ss_huber_c": "0.1", "ss_batch_size_per_device": "2", "ss_total_batch_size": "2",
        "ss_resolution": "(512, 512)", "ss_enable_bucket": "False", "ss_min_bucket_reso": "256",
        "ss_face_crop_aug_range": "None", "ss_bucket_info": "null", "ss_reg_dataset_dirs": "{}",
        "ss_sd_model_name": "my_sd15", "ss_sd_model_hash": "IsADirectory", "ss_new_sd_model_hash": "IsADirectory",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "mylora", "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": datetime.datetime.fromtimestamp(1_700_000_000).isoformat(),
    }
    assert {k: meta[k] for k in expected} == expected
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"]) == {"10_sks dog": {"sks dog": 2, "grass": 1}}


def test_bucket_info_network_args_and_batch_totals_render_like_kohya(tmp_path):
    info = dict(DATASET_INFO, enable_bucket=True, bucket_info={
        "buckets": {0: {"resolution": (448, 576), "count": 12}, 3: {"resolution": [512, 512], "count": 8}},
        "mean_img_ar_error": 0.0125,
    })
    cfg = kohya_cfg(network_args=["conv_dim=4", "conv_alpha=1"], gradient_accumulation_steps=3,
                    text_encoder_lr=[5e-5, 1e-5], face_crop_aug_range="2.0,4.0", resolution="512,768")
    meta = build(cfg, tmp_path / "hub/id", dataset_info=info, num_processes=2)
    assert json.loads(meta["ss_bucket_info"]) == {
        "buckets": {"0": {"resolution": [448, 576], "count": 12}, "3": {"resolution": [512, 512], "count": 8}},
        "mean_img_ar_error": 0.0125,
    }
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1", "dropout": None}
    assert meta["ss_total_batch_size"] == "12"  # 2 per device x 2 processes x 3 accumulation steps
    assert meta["ss_text_encoder_lr"] == "5e-05"
    assert meta["ss_face_crop_aug_range"] == "(2.0, 4.0)"
    assert meta["ss_enable_bucket"] == "True"
    assert meta["modelspec.resolution"] == "512x768"
    # A path that does not exist locally is recorded as given, with no hashes.
    assert meta["ss_sd_model_name"] == str(tmp_path / "hub/id")
    assert "ss_sd_model_hash" not in meta and "ss_new_sd_model_hash" not in meta


def test_model_and_vae_files_are_named_and_hashed(tmp_path):
    model = tmp_path / "base.safetensors"
    model.write_bytes(os.urandom(MIB + 100_000))
    vae = tmp_path / "vae.safetensors"
    vae.write_bytes(b"vae bytes")
    meta = build(kohya_cfg(), model, vae_path=str(vae))
    data = model.read_bytes()
    assert meta["ss_sd_model_name"] == "base.safetensors"
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[MIB:MIB + 0x10000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_vae_name"] == "vae.safetensors"
    assert meta["ss_vae_hash"] == "e3b0c442"
    assert meta["ss_new_vae_hash"] == hashlib.sha256(b"vae bytes").hexdigest()


def test_finalize_adds_progress_date_title_and_hashes(tmp_path):
    meta = build(kohya_cfg(), tmp_path)
    frozen = dict(meta)
    tensors = lora_tensors(rows=4)
    final = md.finalize_metadata(meta, epoch=2, steps=20, tensors=tensors, now=1_700_000_100.5)
    assert meta == frozen  # the run's metadata is not mutated between saves
    assert set(final) - set(meta) == {"ss_training_finished_at", "ss_steps", "ss_epoch", "sshs_model_hash",
                                      "sshs_legacy_hash"}
    assert (final["ss_training_finished_at"], final["ss_steps"], final["ss_epoch"]) == ("1700000100.5", "20", "2")
    assert final["modelspec.date"] == datetime.datetime.fromtimestamp(1_700_000_100).isoformat()
    assert final["modelspec.title"] == "mylora"
    assert (final["sshs_model_hash"], final["sshs_legacy_hash"]) == saving.precalculate_safetensors_hashes(
        tensors, final)
    assert md.finalize_metadata(meta, epoch=1, steps=10, title="custom")["modelspec.title"] == "custom"


def test_no_metadata_keeps_kohyas_minimum(tmp_path):
    cfg = kohya_cfg(no_metadata=True, network_args=["conv_dim=8"])
    meta = build(cfg, tmp_path)
    assert {k for k in meta if k.startswith("ss_")} == set(md.MINIMUM_KEYS)
    assert {k for k in meta if k.startswith("modelspec.")} == KOHYA_SD1_LORA_MODELSPEC_KEYS
    final = md.finalize_metadata(meta, epoch=1, steps=10, tensors=lora_tensors(rows=4))
    assert "ss_steps" not in final and "ss_training_finished_at" not in final
    assert {"sshs_model_hash", "sshs_legacy_hash"} <= set(final)
    assert json.loads(final["ss_network_args"]) == {"conv_dim": "8", "dropout": None}
    # Without --network_args there is no ss_network_args at all, as in kohya.
    assert "ss_network_args" not in build(kohya_cfg(no_metadata=True), tmp_path)


@pytest.mark.parametrize(
    "family, v_pred, version, v2, arch, implementation, resolution",
    [
        ("sd1", False, "sd_v1", "False", "stable-diffusion-v1/lora", md.IMPL_DIFFUSERS, "512x512"),
        ("sd2", False, "sd_v2", "True", "stable-diffusion-v2-512/lora", md.IMPL_DIFFUSERS, "512x512"),
        ("sd2", True, "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", md.IMPL_DIFFUSERS, "768x768"),
        ("sdxl", False, "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", md.IMPL_STABILITY_AI,
         "1024x1024"),
    ],
)
def test_family_table(tmp_path, family, v_pred, version, v2, arch, implementation, resolution):
    cfg = kohya_cfg(resolution=None)
    meta = build(cfg, tmp_path, family_name=family, v_prediction=v_pred)
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2
    assert meta["modelspec.architecture"] == arch
    assert meta["modelspec.implementation"] == implementation
    assert meta["modelspec.resolution"] == resolution
    assert meta["modelspec.prediction_type"] == ("v" if v_pred else "epsilon")


def test_other_methods_drop_network_keys(tmp_path):
    meta = build(kohya_cfg(output_name=None), tmp_path, method="textual_inversion")
    assert not any(k.startswith("ss_network_") for k in meta)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.implementation"] == md.IMPL_STABILITY_AI
    assert meta["modelspec.title"] == f"TextualInversion@{STARTED_AT}"


def test_optional_modelspec_fields(tmp_path):
    cfg = kohya_cfg(min_timestep=100, clip_skip=2, metadata_title="Dog", metadata_author="me",
                    metadata_license="openrail", metadata_tags="dog, sks", metadata_description="a dog")
    meta = build(cfg, tmp_path)
    assert meta["modelspec.timestep_range"] == "100,1000"
    assert meta["modelspec.encoder_layer"] == "2"
    assert meta["ss_clip_skip"] == "2"
    assert (meta["modelspec.title"], meta["modelspec.author"], meta["modelspec.license"]) == ("Dog", "me", "openrail")
    assert (meta["modelspec.tags"], meta["modelspec.description"]) == ("dog, sks", "a dog")
    assert build(kohya_cfg(max_timestep=900), tmp_path)["modelspec.timestep_range"] == "0,900"


def test_dataset_config_records_per_dataset_json(tmp_path):
    datasets = [{"is_dreambooth": True, "batch_size_per_device": 2, "resolution": (512, 512),
                 "subsets": [{"img_count": 2, "num_repeats": 10, "image_dir": "dogs"}]}]
    info = dict(DATASET_INFO, datasets=datasets)
    meta = build(kohya_cfg(dataset_config="ds.toml", resolution=None), tmp_path, dataset_info=info)
    assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["num_repeats"] == 10
    assert json.loads(meta["ss_datasets"])[0]["resolution"] == [512, 512]
    assert "ss_resolution" not in meta and "ss_batch_size_per_device" not in meta
    assert meta["modelspec.resolution"] == "512x512"


@pytest.mark.parametrize("field, value", [("resolution", "512x512"), ("network_args", ["conv_dim"]),
                                          ("face_crop_aug_range", "a,b")])
def test_bad_values_are_user_errors(tmp_path, field, value):
    with pytest.raises(UserError, match=field):
        build(kohya_cfg(**{field: value}), tmp_path)


def test_resolved_default_config_gives_the_same_key_set(tmp_path):
    """With CONFIG's real option table (once it exists) the key set is still kohya's."""
    config = pytest.importorskip("library.config")
    cfg = config.default_config("train_network")
    cfg.network_module, cfg.output_name, cfg.seed = "networks.lora", "mylora", 1
    meta = build(cfg, tmp_path)
    assert all(isinstance(v, str) for v in meta.values())
    assert {k for k in meta if k.startswith("ss_")} == KOHYA_DEFAULT_SS_KEYS


def test_saved_file_has_ordinary_permissions(tmp_path):
    path = tmp_path / "perm.safetensors"
    saving.save_safetensors({"w": torch.zeros(2)}, str(path), None)
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
