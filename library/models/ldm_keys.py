"""Our diffusers -> original-LDM key mapping for SD 1.x single-file checkpoints.

diffusers can read single files but cannot write them, so saving one (the layout A1111, ComfyUI and
kohya read) needs this mapping. Every key is translated by a rule below; a key no rule matches raises,
so a new block kind can never be dropped silently. The layout facts (block numbering, resnet and VAE
attention names) are those of the CompVis `ldm` code that SD 1.x checkpoints were trained with.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# diffusers resnet parameter names -> LDM ResBlock names (UNet).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers VAE attention names -> LDM AttnBlock names (LDM uses 1x1 convolutions there).
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


class UnmappedKeyError(KeyError):
    """A state-dict key that no rule of this module knows how to translate."""


def _resnet(rest: str, names: dict[str, str]) -> str:
    """Rename the first component of a resnet parameter path (`conv1.weight` -> `in_layers.2.weight`)."""
    for src, dst in names.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src) :]
    raise UnmappedKeyError(rest)


def _layers_per_block(keys: Iterable[str]) -> int:
    """Resnets per down block, read from the key names (SD 1.x: 2)."""
    ids = [int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))]
    return max(ids) + 1


def unet_key_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> LDM key (without the `model.diffusion_model.` prefix)."""
    keys = list(keys)
    per_block = _layers_per_block(keys) + 1  # LDM numbers resnets and the down/upsampler in one sequence
    up_with_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    mapping = {}
    for key in keys:
        mapping[key] = _unet_key(key, per_block, up_with_attention)
    return mapping


def _unet_key(key: str, per_block: int, up_with_attention: set[int]) -> str:
    for src, dst in _UNET_FIXED.items():
        if key.startswith(src + "."):
            return dst + key[len(src) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + layer
        return _block_key(f"input_blocks.{index}", kind, rest)
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        # The middle block is a flat sequence resnet, attention, resnet with no sub-module level.
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3], _UNET_RESNET)}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        return _block_key(f"output_blocks.{index}", kind, rest)
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        # The upsampler follows the last resnet (and its attention, when the block has one).
        slot = 2 if block in up_with_attention else 1
        return f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv.{m[2]}"
    raise UnmappedKeyError(f"UNet key {key!r}")


def _block_key(base: str, kind: str, rest: str) -> str:
    """A resnet is sub-module 0 of an LDM block, its transformer (same names as diffusers) sub-module 1."""
    if kind == "resnets":
        return f"{base}.0.{_resnet(rest, _UNET_RESNET)}"
    return f"{base}.1.{rest}"


def vae_key_map(keys: Iterable[str], num_blocks: int | None = None) -> dict[str, str]:
    """diffusers AutoencoderKL key -> LDM key (without the `first_stage_model.` prefix)."""
    keys = list(keys)
    if num_blocks is None:
        num_blocks = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    return {key: _vae_key(key, num_blocks) for key in keys}


def _vae_key(key: str, num_blocks: int) -> str:
    if m := re.match(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.+)", key):
        name = "norm_out" if m[2] == "conv_norm_out" else m[2]
        return f"{m[1]}.{name}.{m[3]}"
    if m := re.match(r"(post_quant_conv|quant_conv)\.(.+)", key):
        return key
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        # LDM numbers decoder levels from the lowest resolution up; diffusers in execution order.
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_resnet(m[2], _VAE_ATTENTION)}"
    raise UnmappedKeyError(f"VAE key {key!r}")


def _vae_resnet(rest: str) -> str:
    return "nin_shortcut" + rest[len("conv_shortcut") :] if rest.startswith("conv_shortcut.") else rest


def text_key_map(keys: Iterable[str]) -> dict[str, str]:
    """transformers CLIPTextModel key -> LDM key (without `cond_stage_model.transformer.`).

    transformers 5 dropped the `text_model.` level from CLIPTextModel; LDM files keep it.
    """
    mapping = {}
    for key in keys:
        if not re.match(r"(text_model\.)?(embeddings|encoder|final_layer_norm)\.", key):
            raise UnmappedKeyError(f"text encoder key {key!r}")
        mapping[key] = key if key.startswith("text_model.") else "text_model." + key
    return mapping


def _vae_tensor(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention projections are 1x1 convolutions: (out, in) -> (out, in, 1, 1)."""
    if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def sd1_to_ldm(
    unet: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor],
    text_encoder: dict[str, torch.Tensor],
    convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict from the three diffusers/transformers state dicts.

    `convert` is applied to each tensor (e.g. a dtype cast); the identity keeps the caller's tensors,
    so no copy of the model is made. Raises UnmappedKeyError on any key no rule translates.
    """
    out: dict[str, torch.Tensor] = {}
    for key, ldm in unet_key_map(unet).items():
        out[UNET_PREFIX + ldm] = convert(unet[key])
    for key, ldm in vae_key_map(vae).items():
        out[VAE_PREFIX + ldm] = convert(_vae_tensor(ldm, vae[key]))
    for key, ldm in text_key_map(k for k in text_encoder if not k.endswith("position_ids")).items():
        out[TEXT_PREFIX + ldm] = convert(text_encoder[key])
    return out
