"""SD1-architecture models built from configs written in code, with seeded random weights.

No hub, no download: tests and the demo use the "tiny" size, benchmarks and key-name checks the
real "sd15" architecture (random weights, same shapes and module names as Stable Diffusion 1.5).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import torch

_SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
_SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
_SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,  # without it the pooled output picks the wrong token
    pad_token_id=1,
)

# The smallest model that still has every block kind of SD1 (cross-attention down/up blocks,
# resnets, down/upsamplers, a mid block), so LoRA/LoCon hit every layer kind.
_TINY_UNET = dict(
    _SD15_UNET,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
)
_TINY_VAE = dict(
    _SD15_VAE,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
)
_TINY_TEXT = dict(
    _SD15_TEXT,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
)

SIZES = {
    "tiny": dict(unet=_TINY_UNET, vae=_TINY_VAE, text_encoder=_TINY_TEXT),
    "sd15": dict(unet=_SD15_UNET, vae=_SD15_VAE, text_encoder=_SD15_TEXT),
}


def sd1_configs(size: str = "tiny") -> dict:
    """Config dicts (diffusers UNet/VAE kwargs, transformers CLIPTextConfig kwargs) for one size."""
    return {name: dict(cfg) for name, cfg in SIZES[size].items()}


def _iter_components(cfg: dict, seed: int, empty: bool) -> Iterator[tuple[str, torch.nn.Module]]:
    """unet, vae, text_encoder built one after another from one seeded RNG stream (lazily, so a caller
    can save and drop each before the next exists)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    builders = [
        ("unet", lambda: UNet2DConditionModel(**cfg["unet"])),
        ("vae", lambda: AutoencoderKL(**cfg["vae"])),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))),
    ]
    for name, build in builders:
        with init_empty_weights() if empty else contextlib.nullcontext():
            yield name, build()


def _iter_sd1_components(size: str, seed: int, empty: bool) -> Iterator[tuple[str, torch.nn.Module]]:
    if size not in SIZES:
        raise ValueError(f"unknown synthetic model size {size!r}; one of {sorted(SIZES)}")
    return _iter_components(sd1_configs(size), seed, empty)


def build_sd1_components(size: str = "tiny", seed: int = 0, empty: bool = False) -> dict:
    """unet, vae and text_encoder of the given size; seeded weights, or empty (meta) ones when `empty`."""
    return dict(_iter_sd1_components(size, seed, empty))


def build_sd1_pipeline_folder(path: str, size: str = "tiny", seed: int = 0) -> str:
    """Write a diffusers StableDiffusionPipeline folder (unet, vae, text_encoder, tokenizer, scheduler).

    Components are built, saved and dropped one at a time, so the "sd15" size never holds more than one
    of them. model_index.json is written last: its presence marks a complete folder. Returns `path`.
    """
    import diffusers

    from library.models.sd1 import kohya_noise_scheduler
    from library.saving import atomic_write_text
    from library.tokenizers import clip_tokenizer

    os.makedirs(path, exist_ok=True)
    for name, module in _iter_sd1_components(size, seed, empty=False):
        module.save_pretrained(os.path.join(path, name), safe_serialization=True)
        del module
    clip_tokenizer().save_pretrained(os.path.join(path, "tokenizer"))
    scheduler = kohya_noise_scheduler()
    scheduler.register_to_config(steps_offset=1)  # what diffusers expects of a saved SD scheduler
    scheduler.save_pretrained(os.path.join(path, "scheduler"))
    index = dict(_MODEL_INDEX, _diffusers_version=diffusers.__version__)
    atomic_write_text(os.path.join(path, "model_index.json"), json.dumps(index, indent=2) + "\n")
    return path


_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_sd1_single_file(
    folder_or_components: str | dict, path: str, dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write an SD 1.x model as one original-LDM-layout .safetensors (the A1111 / ComfyUI layout).

    `folder_or_components` is a diffusers folder or a dict with unet, vae and text_encoder modules.
    Tensors are written without copies (a folder's modules are cast in place when `dtype` is given);
    the diffusers configs go into the metadata so non-standard sizes load back. Atomic. Returns `path`.
    """
    from library.models.single_file import write_single_file

    if isinstance(folder_or_components, str):
        from library.models.sd1 import SD1Family

        unet, vae, text_encoder, _ = SD1Family.load_folder_components(folder_or_components)
        if dtype is not None:  # we own these modules: cast in place, one component at a time
            for module in (unet, vae, text_encoder):
                module.to(dtype)
        parts, dtype = {"unet": unet, "vae": vae, "text_encoders": [text_encoder]}, None
    else:
        parts = folder_or_components
    return write_single_file("sd1", parts, path, dtype, metadata)


# SD 2.x: SD 1.5's layout with per-level head sizes, linear projections in the transformers, 1024-wide
# cross-attention and OpenCLIP-H as a 23-layer CLIP text model (gelu, padded with "!"); the same VAE.
SD2_PAD_TOKEN = "!"
_SD2_UNET = dict(_SD15_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True)
_SD2_VAE = dict(_SD15_VAE, sample_size=768)
_SD2_TEXT = dict(_SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu", projection_dim=512, pad_token_id=0)
SD2_SIZES = {
    "tiny": dict(unet=dict(_TINY_UNET, use_linear_projection=True), vae=_TINY_VAE,
                 text_encoder=dict(_TINY_TEXT, hidden_act="gelu", pad_token_id=0)),
    "sd2": dict(unet=_SD2_UNET, vae=_SD2_VAE, text_encoder=_SD2_TEXT),
}


def sd2_configs(size: str = "tiny") -> dict:
    """SD 2.x config dicts (diffusers UNet/VAE kwargs, transformers CLIPTextConfig kwargs) for one size."""
    if size not in SD2_SIZES:
        raise ValueError(f"unknown synthetic SD2 size {size!r}; one of {sorted(SD2_SIZES)}")
    return {name: dict(cfg) for name, cfg in SD2_SIZES[size].items()}


def _iter_sd2_components(size: str, seed: int, empty: bool) -> Iterator[tuple[str, torch.nn.Module]]:
    return _iter_components(sd2_configs(size), seed, empty)


def build_sd2_components(size: str = "tiny", seed: int = 0, empty: bool = False) -> dict:
    """SD 2.x unet, vae and text_encoder ("tiny" or the real "sd2"); seeded, or empty (meta) weights."""
    return dict(_iter_sd2_components(size, seed, empty))


def sd2_scheduler_config(v_prediction: bool) -> dict:
    """The scheduler a SD 2.x folder ships: kohya's DDPM betas; 768-v folders say v_prediction."""
    from library.models.sd1 import kohya_noise_scheduler

    config = dict(kohya_noise_scheduler().config)
    config.update(steps_offset=1, prediction_type="v_prediction" if v_prediction else "epsilon")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_sd2_pipeline_folder(path: str, size: str = "tiny", seed: int = 0, v_prediction: bool = False) -> str:
    """Write a SD 2.x diffusers StableDiffusionPipeline folder; its scheduler config says
    prediction_type "v_prediction" when `v_prediction` (a 768-v model). model_index.json last. Returns `path`."""
    import diffusers
    from diffusers import DDPMScheduler

    from library.saving import atomic_write_text
    from library.tokenizers import clip_tokenizer

    os.makedirs(path, exist_ok=True)
    for name, module in _iter_sd2_components(size, seed, empty=False):
        module.save_pretrained(os.path.join(path, name), safe_serialization=True)
        del module
    clip_tokenizer(SD2_PAD_TOKEN).save_pretrained(os.path.join(path, "tokenizer"))
    DDPMScheduler.from_config(sd2_scheduler_config(v_prediction)).save_pretrained(os.path.join(path, "scheduler"))
    index = dict(_MODEL_INDEX, _diffusers_version=diffusers.__version__)
    atomic_write_text(os.path.join(path, "model_index.json"), json.dumps(index, indent=2) + "\n")
    return path
