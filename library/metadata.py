"""Training metadata written into saved files: kohya's `ss_*` keys and SAI ModelSpec 1.0.0 `modelspec.*`.

Everything is built from the resolved config (`cfg`, kohya attribute names) plus the few facts only the
run knows (dataset counts, steps, the loaded model family). Values are rendered the way kohya renders
them, because metadata readers (A1111 extensions, civitai, kohya's own tools) parse these strings:
`str(value)` for scalars ("None", "True", "0.0001", "1e-05"), `json.dumps` for nested data, tuples as
Python reprs (`ss_resolution` is "(512, 512)").

What varies between methods (LoRA, textual inversion, fine-tune) and families (SD1, SD2, SDXL) lives in
the METHODS and FAMILIES tables; a new one is a new row.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from library.config import text_encoder_lr
from library.errors import UserError
from library.saving import add_model_hashes, file_sha256, model_hash

SAI_MODEL_SPEC_VERSION = "1.0.0"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"

# kohya keeps only these with --no_metadata (plus modelspec.* and the sshs_* hashes).
MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)
# Present only in full metadata: finalize_metadata adds the progress keys when it sees it.
SESSION_KEY = "ss_session_id"
# kohya's answer for a model "hash" of a diffusers folder.
FOLDER_HASH = "IsADirectory"


@dataclass(frozen=True)
class FamilySpec:
    """How a model family is named in metadata."""

    architecture: str  # ModelSpec id (epsilon prediction)
    v_architecture: str  # ModelSpec id when trained with v-prediction
    base_model_version: str  # kohya's ss_base_model_version; SD1/SD2 get "_v" appended for v-prediction
    v2: bool
    sdxl: bool
    resolution: int  # ModelSpec resolution when the config gives none (epsilon)
    v_resolution: int

    def version(self, v_prediction: bool) -> str:
        if self.sdxl:
            return self.base_model_version
        return self.base_model_version + ("_v" if v_prediction else "")


FAMILIES: dict[str, FamilySpec] = {
    "sd1": FamilySpec("stable-diffusion-v1", "stable-diffusion-v1", "sd_v1", False, False, 512, 512),
    "sd2": FamilySpec("stable-diffusion-v2-512", "stable-diffusion-v2-768-v", "sd_v2", True, False, 512, 768),
    "sdxl": FamilySpec(
        "stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base", "sdxl_base_v1-0", False, True, 1024, 1024
    ),
}


@dataclass(frozen=True)
class MethodSpec:
    """How a training method is named in metadata."""

    adapter: str | None  # ModelSpec architecture suffix ("/lora"); None for full checkpoints
    title_prefix: str  # kohya's fallback title is "<prefix>@<timestamp>"
    network_keys: bool  # writes ss_network_* keys
    # ModelSpec implementation: kohya names Stability AI's repo for embeddings, checkpoints and SDXL
    # LoRA (their key layout), and "diffusers" for an SD1/SD2 LoRA.
    stability_layout: bool


METHODS: dict[str, MethodSpec] = {
    "network": MethodSpec("lora", "LoRA", True, False),
    "textual_inversion": MethodSpec("textual-inversion", "TextualInversion", False, True),
    "embedding": MethodSpec("textual-inversion", "TextualInversion", False, True),  # library.methods' name
    "fine_tune": MethodSpec(None, "Checkpoint", False, True),
}

# (metadata key, cfg attribute, kohya's default, render as bool). The default is used when the resolved
# config has no such attribute (an option sdtune does not offer yet), so the file still says what kohya
# would say for its default setting.
CONFIG_ROWS: tuple[tuple[str, str, Any, bool], ...] = (
    ("ss_output_name", "output_name", None, False),
    ("ss_learning_rate", "learning_rate", 2e-6, False),
    ("ss_unet_lr", "unet_lr", None, False),
    ("ss_gradient_checkpointing", "gradient_checkpointing", False, False),
    ("ss_gradient_accumulation_steps", "gradient_accumulation_steps", 1, False),
    ("ss_lr_warmup_steps", "lr_warmup_steps", 0, False),
    ("ss_lr_scheduler", "lr_scheduler", "constant", False),
    ("ss_mixed_precision", "mixed_precision", "no", False),
    ("ss_full_fp16", "full_fp16", False, True),
    ("ss_clip_skip", "clip_skip", None, False),
    ("ss_max_token_length", "max_token_length", None, False),
    ("ss_cache_latents", "cache_latents", False, True),
    ("ss_seed", "seed", None, False),
    ("ss_lowram", "lowram", False, False),
    ("ss_noise_offset", "noise_offset", None, False),
    ("ss_multires_noise_iterations", "multires_noise_iterations", None, False),
    ("ss_multires_noise_discount", "multires_noise_discount", 0.3, False),
    ("ss_adaptive_noise_scale", "adaptive_noise_scale", None, False),
    ("ss_zero_terminal_snr", "zero_terminal_snr", False, False),
    ("ss_training_comment", "training_comment", None, False),
    ("ss_max_grad_norm", "max_grad_norm", 1.0, False),
    ("ss_caption_dropout_rate", "caption_dropout_rate", 0.0, False),
    ("ss_caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs", 0, False),
    ("ss_caption_tag_dropout_rate", "caption_tag_dropout_rate", 0.0, False),
    ("ss_prior_loss_weight", "prior_loss_weight", 1.0, False),
    ("ss_min_snr_gamma", "min_snr_gamma", None, False),
    ("ss_scale_weight_norms", "scale_weight_norms", None, False),
    ("ss_ip_noise_gamma", "ip_noise_gamma", None, False),
    ("ss_debiased_estimation", "debiased_estimation_loss", False, True),
    ("ss_noise_offset_random_strength", "noise_offset_random_strength", False, False),
    ("ss_ip_noise_gamma_random_strength", "ip_noise_gamma_random_strength", False, False),
    ("ss_loss_type", "loss_type", "l2", False),
    ("ss_huber_schedule", "huber_schedule", "snr", False),
    ("ss_huber_scale", "huber_scale", 1.0, False),
    ("ss_huber_c", "huber_c", 0.1, False),
    ("ss_fp8_base", "fp8_base", False, True),
    ("ss_fp8_base_unet", "fp8_base_unet", False, True),
    ("ss_validation_seed", "validation_seed", None, False),
    ("ss_validation_split", "validation_split", 0.0, False),
    ("ss_max_validation_steps", "max_validation_steps", None, False),
    ("ss_validate_every_n_epochs", "validate_every_n_epochs", None, False),
    ("ss_validate_every_n_steps", "validate_every_n_steps", None, False),
    ("ss_resize_interpolation", "resize_interpolation", None, False),
)

NETWORK_ROWS: tuple[tuple[str, str, Any, bool], ...] = (
    ("ss_network_module", "network_module", None, False),
    ("ss_network_dim", "network_dim", None, False),
    ("ss_network_alpha", "network_alpha", 1, False),
    ("ss_network_dropout", "network_dropout", None, False),
)


def _opt(cfg, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


def _rows(cfg, rows) -> dict[str, Any]:
    values = {}
    for key, attr, default, as_bool in rows:
        value = _opt(cfg, attr, default)
        values[key] = bool(value) if as_bool else value
    return values


def _to_json(value: Any) -> str:
    """json.dumps as kohya calls it, also accepting numpy scalars/arrays and tuples from the dataset."""

    def plain(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON serialisable")

    return json.dumps(value, default=plain)


def resolution_pair(value: Any, option: str = "resolution") -> tuple[int, int] | None:
    """kohya's "512" / "512,768" (or an int / sequence) as (width, height); None stays None."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    from library.dataset.buckets import is_multires, parse_resolutions

    if is_multires(value):  # multi-resolution training is recorded at its largest size
        return max(parse_resolutions(value), key=lambda size: size[0] * size[1])
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        numbers = ()
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2:
        raise UserError(f"--{option}: {value!r} is not a resolution; write 512 or 512,768")
    return numbers


def _face_crop_range(value: Any) -> Any:
    """kohya turns --face_crop_aug_range "2.0,4.0" into a float tuple before recording it."""
    if isinstance(value, str):
        try:
            return tuple(float(part) for part in value.split(","))
        except ValueError:
            raise UserError(f"--face_crop_aug_range: {value!r} is not two numbers; write e.g. 2.0,4.0") from None
    return tuple(value) if isinstance(value, list) else value


def parse_network_args(cfg) -> dict[str, Any] | None:
    """--network_args as kohya records them in ss_network_args (None when not given).

    kohya adds `dropout` (= --network_dropout) to the arguments it passes to the network unless the dims
    come from weights, and that is what it records.
    """
    items = _opt(cfg, "network_args")
    if not items:
        return None
    kwargs: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--network_args: {item!r} is not key=value; write e.g. conv_dim=4")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = value.strip()
    if not _opt(cfg, "dim_from_weights", False) and "dropout" not in kwargs:
        kwargs["dropout"] = _opt(cfg, "network_dropout")
    return kwargs


@functools.lru_cache(maxsize=1)
def _git_revision() -> str:
    """The source revision, recorded where kohya records its own (`ss_sd_scripts_commit_hash`)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip() or "(unknown)"
    except (OSError, subprocess.SubprocessError):
        return "(unknown)"


@functools.lru_cache(maxsize=16)
def _cached_file_hashes(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    return model_hash(path), file_sha256(path)


def _file_hashes(path: str) -> tuple[str, str]:
    """(legacy hash, sha256) of a model file; kohya writes "IsADirectory" for a diffusers folder."""
    if os.path.isdir(path):
        return FOLDER_HASH, FOLDER_HASH
    try:
        stat = os.stat(path)
        return _cached_file_hashes(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    except OSError as exc:
        raise UserError(f"cannot read {path} to hash it for metadata: {exc.strerror}") from None


def _model_values(path: str | None, name_key: str, hash_key: str, new_hash_key: str) -> dict[str, Any]:
    """Name (basename when it exists locally) and hashes of the base model or VAE, as kohya records them."""
    if path is None:
        return {}
    values: dict[str, Any] = {}
    name = path
    if os.path.exists(path):
        values[hash_key], values[new_hash_key] = _file_hashes(path)
        name = os.path.basename(os.path.normpath(path))
    values[name_key] = name
    return values


def _dataset_values(cfg, info: dict, num_processes: int) -> dict[str, Any]:
    """Dataset keys. With --dataset_config kohya records per-dataset JSON instead of the flat keys."""
    if _opt(cfg, "dataset_config") and info.get("datasets") is not None:
        return {
            "ss_datasets": _to_json(info["datasets"]),
            "ss_tag_frequency": _to_json(info.get("tag_frequency", {})),
            "ss_dataset_dirs": _to_json(info.get("dataset_dirs", {})),
        }
    batch_size = _opt(cfg, "train_batch_size", 1)
    resolution = info.get("resolution") or resolution_pair(_opt(cfg, "resolution"))
    return {
        "ss_batch_size_per_device": batch_size,
        "ss_total_batch_size": batch_size * num_processes * _opt(cfg, "gradient_accumulation_steps", 1),
        "ss_resolution": tuple(resolution) if resolution is not None else None,
        "ss_color_aug": bool(_opt(cfg, "color_aug", False)),
        "ss_flip_aug": bool(_opt(cfg, "flip_aug", False)),
        "ss_random_crop": bool(_opt(cfg, "random_crop", False)),
        "ss_shuffle_caption": bool(_opt(cfg, "shuffle_caption", False)),
        "ss_enable_bucket": bool(info.get("enable_bucket", _opt(cfg, "enable_bucket", False))),
        "ss_bucket_no_upscale": bool(info.get("bucket_no_upscale", _opt(cfg, "bucket_no_upscale", False))),
        "ss_min_bucket_reso": info.get("min_bucket_reso", _opt(cfg, "min_bucket_reso", 256)),
        "ss_max_bucket_reso": info.get("max_bucket_reso", _opt(cfg, "max_bucket_reso", 1024)),
        "ss_keep_tokens": _opt(cfg, "keep_tokens", 0),
        "ss_dataset_dirs": _to_json(info.get("dataset_dirs", {})),
        "ss_reg_dataset_dirs": _to_json(info.get("reg_dataset_dirs", {})),
        "ss_tag_frequency": _to_json(info.get("tag_frequency", {})),
        "ss_bucket_info": _to_json(info.get("bucket_info")),
    }


def _iso_date(timestamp: float) -> str:
    """ModelSpec date: local time, whole seconds, ISO 8601 (as kohya writes it)."""
    return datetime.datetime.fromtimestamp(int(timestamp)).isoformat()


def default_title(cfg, method: str, timestamp: float) -> str:
    """kohya's title: --metadata_title, else --output_name, else "LoRA@<timestamp>" (per method)."""
    title = _opt(cfg, "metadata_title") or _opt(cfg, "output_name")
    return title if title else f"{METHODS[method].title_prefix}@{timestamp}"


def build_modelspec(cfg, *, family_name: str, v_prediction: bool, method: str, timestamp: float) -> dict[str, str]:
    """The `modelspec.*` keys kohya writes (ModelSpec 1.0.0) for this family and method."""
    family, spec = FAMILIES[family_name], METHODS[method]
    architecture = family.v_architecture if v_prediction else family.architecture
    if spec.adapter:
        architecture += "/" + spec.adapter
    stability = spec.stability_layout or family.sdxl
    resolution = resolution_pair(_opt(cfg, "resolution"))
    if resolution is None:
        size = family.v_resolution if v_prediction else family.resolution
        resolution = (size, size)
    metadata = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": IMPL_STABILITY_AI if stability else IMPL_DIFFUSERS,
        "modelspec.title": default_title(cfg, method, timestamp),
    }
    for field in ("author", "description", "license", "tags", "usage_hint", "merged_from", "trigger_phrase",
                  "preprocessor"):
        value = _opt(cfg, "metadata_" + field)
        if value is not None:
            metadata["modelspec." + field] = str(value)
    metadata["modelspec.date"] = _iso_date(timestamp)
    metadata["modelspec.resolution"] = f"{resolution[0]}x{resolution[1]}"
    metadata["modelspec.prediction_type"] = "v" if v_prediction else "epsilon"
    min_t, max_t = _opt(cfg, "min_timestep"), _opt(cfg, "max_timestep")
    if min_t is not None or max_t is not None:
        metadata["modelspec.timestep_range"] = f"{0 if min_t is None else min_t},{1000 if max_t is None else max_t}"
    if _opt(cfg, "clip_skip") is not None:
        metadata["modelspec.encoder_layer"] = str(_opt(cfg, "clip_skip"))
    return metadata


def build_training_metadata(
    cfg,
    *,
    dataset_info: dict,
    family_name: str,
    v_prediction: bool,
    num_batches_per_epoch: int,
    num_epochs: int,
    max_train_steps: int,
    optimizer_name: str,
    session_id: int,
    training_started_at: float,
    model_path: str,
    vae_path: str | None,
    method: str = "network",
    num_processes: int = 1,
) -> dict[str, str]:
    """All metadata kohya's trainer writes for this run, as str -> str, before the first save.

    `optimizer_name` is kohya's label, e.g. "torch.optim.adamw.AdamW(weight_decay=0.1)". With
    --no_metadata only MINIMUM_KEYS and modelspec.* are kept, as kohya does.
    """
    if family_name not in FAMILIES:
        raise ValueError(f"no metadata naming for model family {family_name!r}; add it to FAMILIES")
    family, spec = FAMILIES[family_name], METHODS[method]
    values: dict[str, Any] = {
        SESSION_KEY: session_id,
        "ss_training_started_at": training_started_at,
        "ss_text_encoder_lr": text_encoder_lr(_opt(cfg, "text_encoder_lr")),
        "ss_num_train_images": dataset_info.get("num_train_images", 0),
        "ss_num_validation_images": dataset_info.get("num_validation_images", 0),
        "ss_num_reg_images": dataset_info.get("num_reg_images", 0),
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": max_train_steps,
        "ss_v2": family.v2,
        "ss_base_model_version": family.version(v_prediction),
        "ss_sd_scripts_commit_hash": _git_revision(),
        "ss_optimizer": optimizer_name,
        "ss_face_crop_aug_range": _face_crop_range(_opt(cfg, "face_crop_aug_range")),
    }
    values.update(_rows(cfg, CONFIG_ROWS))
    if spec.network_keys:
        values.update(_rows(cfg, NETWORK_ROWS))
        network_args = parse_network_args(cfg)
        if network_args is not None:
            values["ss_network_args"] = _to_json(network_args)
    values.update(_dataset_values(cfg, dataset_info, num_processes))
    values.update(_model_values(model_path, "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash"))
    values.update(_model_values(vae_path, "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash"))

    metadata = {key: str(value) for key, value in values.items()}
    if _opt(cfg, "no_metadata", False):
        metadata = {key: metadata[key] for key in MINIMUM_KEYS if key in metadata}
    metadata.update(
        build_modelspec(cfg, family_name=family_name, v_prediction=v_prediction, method=method,
                        timestamp=training_started_at)
    )
    return metadata


def finalize_metadata(
    metadata: dict[str, str],
    *,
    epoch: int,
    steps: int,
    title: str | None = None,
    tensors: dict | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """A copy of `metadata` for one save: progress keys, save date, optional title and model hashes.

    ss_training_finished_at / ss_steps / ss_epoch are added only to full metadata (kohya leaves them
    out with --no_metadata). `title=None` keeps build_training_metadata's title (kohya's: --metadata_title
    or --output_name, the same for every epoch's file). With `tensors`, sshs_model_hash /
    sshs_legacy_hash are added; they must be the tensors exactly as written (after dtype conversion).
    """
    now = time.time() if now is None else now
    result = dict(metadata)
    if SESSION_KEY in result:
        result["ss_training_finished_at"] = str(now)
        result["ss_steps"] = str(steps)
        result["ss_epoch"] = str(epoch)
    result["modelspec.date"] = _iso_date(now)
    if title is not None:
        result["modelspec.title"] = title
    if tensors is not None:
        result = add_model_hashes(tensors, result)
    return result
