"""Which layers a kohya LoRA wraps, and the names they are saved under.

kohya's rule: walk each model's modules; inside every module whose class is a *target class*, every
``Linear`` and ``Conv2d`` is a LoRA layer named ``<prefix>_<path with '.' -> '_'>``.

- UNet (``lora_unet``): ``Transformer2DModel`` always. With LoCon (``conv_dim``) also
  ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D``: their 3x3 convs get ``conv_dim``, their
  Linear (``time_emb_proj``) and 1x1 convs (``conv_shortcut``) the plain ``network_dim``.
  SD 1.x / 2.x layers are named by their diffusers path (kohya trains those on diffusers' U-Net).
  kohya trains SDXL on its own U-Net in the original (LDM / SGM) layout, so SDXL files name U-Net layers
  by that layout: ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` is saved as
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``resnets.0.conv1`` as
  ``..._0_in_layers_2``, ``time_emb_proj`` as ``emb_layers_1``, ``conv_shortcut`` as ``skip_connection``,
  a downsampler as ``input_blocks_N_0_op``, an upsampler as ``output_blocks_N_2_conv``
  (library/models/ldm_keys.py has the rules). An SDXL U-Net is one with ``addition_embed_type``
  ``text_time`` (the pooled-text and size conditioning).
- Text encoder (``lora_te``, or ``lora_te1`` / ``lora_te2`` for two encoders): the Linear layers of
  CLIP's attention and MLP blocks. Paths always start with ``text_model.`` as in transformers 4, so
  files are the same whatever transformers version wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from library.errors import UserError
from library.models.ldm_keys import UnmappedKeyError, unet_key_map

UNET_PREFIX = "lora_unet"
UNET_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# transformers 4.3x had per-backend attention classes; 5.x has one CLIPAttention.
TEXT_ENCODER_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
TEXT_ENCODER_ROOT = "text_model."

# How many text encoders a family has -> the prefix of each one's LoRA names.
TEXT_ENCODER_PREFIXES = {1: ("lora_te",), 2: ("lora_te1", "lora_te2")}


@dataclass(frozen=True)
class Layer:
    """One wrappable layer: its LoRA name, the module, and whether it is a conv with a kernel > 1x1."""

    name: str
    module: torch.nn.Module
    is_unet: bool

    @property
    def is_spatial_conv(self) -> bool:
        """A Conv2d with a kernel larger than 1x1: trained only with LoCon (conv_dim)."""
        return isinstance(self.module, torch.nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def lora_name(prefix: str, path: str) -> str:
    """kohya's name for the layer at `path` (a dotted module path) under `prefix`."""
    return f"{prefix}.{path}".replace(".", "_")


def is_sdxl_unet(unet) -> bool:
    """Whether `unet` is an SDXL U-Net (whose LoRA names use the LDM layout), told by its config."""
    config = getattr(unet, "config", None)
    if isinstance(config, dict):  # diffusers' FrozenDict
        return config.get("addition_embed_type") == "text_time"
    return getattr(config, "addition_embed_type", None) == "text_time"


def unet_paths(unet) -> dict[str, str]:
    """diffusers module path -> the path kohya names the module by; {} when they are the same (SD 1.x / 2.x).

    The rules map parameter keys, so they run over the whole U-Net's key list (block numbering needs
    every block) and module paths are read off the keys: `a.b.weight` -> `c.d.weight` gives `a.b` -> `c.d`.
    """
    if unet is None or not is_sdxl_unet(unet):
        return {}
    try:
        mapping = unet_key_map(unet.state_dict().keys())
    except UnmappedKeyError as exc:
        raise UserError(f"SDXL U-Net: {exc.args[0]} has no name in the original layout kohya's SDXL LoRA names "
                        "use (a U-Net with modules SDXL does not have?)") from None
    return {key.rpartition(".")[0]: ldm.rpartition(".")[0] for key, ldm in mapping.items()}


def unet_renames(unet) -> dict[str, str]:
    """LoRA name by diffusers path -> kohya's LoRA name, for the U-Net layers where the two differ (SDXL)."""
    return {lora_name(UNET_PREFIX, path): lora_name(UNET_PREFIX, ldm) for path, ldm in unet_paths(unet).items()}


def text_encoder_list(text_encoder) -> list[torch.nn.Module]:
    """kohya passes one text encoder, or a list of them (SDXL); always a list here."""
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def find_layers(root: torch.nn.Module, prefix: str, classes: Sequence[str], path_root: str = "",
                is_unet: bool = False, paths: dict[str, str] | None = None) -> list[Layer]:
    """Every Linear / Conv2d inside a module of one of `classes` under `root`, in module order.

    `path_root` is put in front of paths that lack it (transformers 5 dropped CLIP's `text_model`);
    `paths` renames module paths before they become names (SDXL's U-Net: `unet_paths`).
    """
    layers: dict[str, Layer] = {}
    for parent_path, parent in root.named_modules():
        if type(parent).__name__ not in classes:
            continue
        for child_path, child in parent.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            path = ".".join(p for p in (parent_path, child_path) if p)
            if path_root and not path.startswith(path_root):
                path = path_root + path
            path = (paths or {}).get(path, path)
            name = lora_name(prefix, path)
            # A layer reached through two nested target classes is still one layer.
            layers.setdefault(name, Layer(name, child, is_unet))
    return list(layers.values())


def network_layers(text_encoder, unet, with_conv: bool) -> list[Layer]:
    """The layers kohya's LoRA targets in these models: text encoder(s) first, then the UNet."""
    encoders = text_encoder_list(text_encoder)
    layers: list[Layer] = []
    if encoders:
        prefixes = TEXT_ENCODER_PREFIXES.get(len(encoders))
        if prefixes is None:
            raise ValueError(f"LoRA supports 1 or 2 text encoders, got {len(encoders)}")
        for prefix, encoder in zip(prefixes, encoders):
            layers += find_layers(encoder, prefix, TEXT_ENCODER_CLASSES, TEXT_ENCODER_ROOT)
    if unet is not None:
        classes = UNET_CLASSES + (UNET_CONV_CLASSES if with_conv else ())
        layers += find_layers(unet, UNET_PREFIX, classes, is_unet=True, paths=unet_paths(unet))
    return layers
