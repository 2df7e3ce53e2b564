"""SDXL-architecture models built from configs, with seeded random weights (no hub, no download).

Two sizes: "sdxl" is the real SDXL base 1.0 architecture, read from the configs stored in
library/models/configs/sdxl (the same files single-file loading uses); "tiny" keeps every kind of
block SDXL has (a plain down block first, a 2-layer transformer level, size / crop time embedding,
two text encoders whose widths add up to the cross-attention width) at a size that trains on a CPU
in milliseconds. Tests, the demo and key-name checks build from here.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import torch

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs", "sdxl")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PAD_TOKEN_2 = "!"  # the second (OpenCLIP bigG) tokenizer pads with "!" (id 0)

# Overrides of the real configs. cross_attention_dim = 32 + 32 (both encoders' hidden states side by
# side); projection_class_embeddings_input_dim = 6 size numbers x 8 + the 32-wide pooled output.
_TINY = {
    "unet": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    ),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32),
    "text_encoder_2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           projection_dim=32),
}
SIZES = ("tiny", "sdxl")


def read_config(name: str) -> dict:
    """A stored config of the real SDXL base 1.0 architecture ("unet", "vae", "text_encoder",
    "text_encoder_2" or "scheduler")."""
    filename = "scheduler_config.json" if name == "scheduler" else "config.json"
    with open(os.path.join(CONFIG_DIR, name, filename), encoding="utf-8") as f:
        return json.load(f)


def sdxl_configs(size: str = "tiny") -> dict:
    """Config dicts (diffusers UNet / VAE configs, transformers CLIPTextConfig dicts) for one size."""
    if size not in SIZES:
        raise ValueError(f"unknown synthetic SDXL size {size!r}; one of {list(SIZES)}")
    configs = {name: read_config(name) for name in COMPONENTS}
    if size == "tiny":
        from library.models.synthetic import sd1_configs

        for name, overrides in _TINY.items():
            configs[name].update(overrides)
        # the tiny SD1 VAE, with SDXL's latent scale
        configs["vae"] = {**configs["vae"], **sd1_configs("tiny")["vae"], "scaling_factor": 0.13025}
    return configs


def _iter_components(size: str, seed: int, empty: bool) -> Iterator[tuple[str, torch.nn.Module]]:
    """unet, vae, text_encoder, text_encoder_2 built one after another from one seeded RNG stream
    (lazily: a caller can save and drop each before the next exists)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = sdxl_configs(size)
    torch.manual_seed(seed)
    builders = {
        "unet": lambda c: UNet2DConditionModel.from_config(c),
        "vae": lambda c: AutoencoderKL.from_config(c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c)),
        "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(c)),
    }
    for name in COMPONENTS:
        with init_empty_weights() if empty else contextlib.nullcontext():
            yield name, builders[name](configs[name])


def build_sdxl_components(size: str = "tiny", seed: int = 0, empty: bool = False) -> dict:
    """{"unet", "vae", "text_encoder", "text_encoder_2"}: seeded weights, or empty (meta) ones when `empty`
    (the real architecture then costs no memory)."""
    return dict(_iter_components(size, seed, empty))


def build_sdxl_pipeline_folder(path: str, size: str = "tiny", seed: int = 0) -> str:
    """Write a diffusers StableDiffusionXLPipeline folder (both text encoders and tokenizers, scheduler).

    Components are built, saved and dropped one at a time, so the "sdxl" size holds one at a time (the
    UNet alone is ~10 GB in fp32). model_index.json is written last: it marks a complete folder.
    """
    import diffusers
    from diffusers import EulerDiscreteScheduler

    from library.saving import atomic_write_text
    from library.tokenizers import clip_tokenizer

    os.makedirs(path, exist_ok=True)
    for name, module in _iter_components(size, seed, empty=False):
        module.save_pretrained(os.path.join(path, name), safe_serialization=True)
        del module
    clip_tokenizer().save_pretrained(os.path.join(path, "tokenizer"))
    clip_tokenizer(PAD_TOKEN_2).save_pretrained(os.path.join(path, "tokenizer_2"))
    EulerDiscreteScheduler.from_config(read_config("scheduler")).save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(CONFIG_DIR, "model_index.json"), encoding="utf-8") as f:
        index = dict(json.load(f), _diffusers_version=diffusers.__version__)
    atomic_write_text(os.path.join(path, "model_index.json"), json.dumps(index, indent=2) + "\n")
    return path
