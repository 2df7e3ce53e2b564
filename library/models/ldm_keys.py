"""Our diffusers -> original-LDM / SGM key mapping for SD 1.x, SD 2.x and SDXL single-file checkpoints.

diffusers can read single files but cannot write them, so saving one (the layout A1111, ComfyUI and
kohya read) needs this mapping. Every key is translated by a rule below; a key no rule matches raises,
so a new block kind can never be dropped silently. The layout facts (block numbering, resnet and VAE
attention names) are those of the CompVis `ldm` code that SD 1.x checkpoints were trained with.
"""

from __future__ import annotations

import re
from typing import Iterable

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
    # SDXL: the pooled-text and size embedding (diffusers add_embedding, SGM label_emb)
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
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


# --- OpenCLIP text encoders (SD 2.x's OpenCLIP-H, SDXL's bigG) <-> transformers' CLIP layout -------------

# transformers names inside one encoder layer -> OpenCLIP resblock names (q/k/v are one stacked in_proj).
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def open_clip_key(key: str) -> tuple[str, int | None]:
    """A transformers CLIP text key -> (its OpenCLIP key, the q/k/v slot inside in_proj or None).

    `text_projection.weight` maps to OpenCLIP's `text_projection`, which holds the transposed matrix
    (OpenCLIP multiplies x @ P; a Linear computes x @ W.T)."""
    bare = key.removeprefix("text_model.")
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "text_projection.weight": "text_projection",
    }
    if bare in fixed:
        return fixed[bare], None
    if m := re.match(r"final_layer_norm\.(weight|bias)$", bare):
        return f"ln_final.{m[1]}", None
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", bare)
    if m is None:
        raise UnmappedKeyError(f"text encoder key {key!r}")
    block, name, kind = f"transformer.resblocks.{m[1]}", m[2], m[3]
    if name.startswith("self_attn.") and name[len("self_attn."):] in _QKV:
        return f"{block}.attn.in_proj_{kind}", _QKV[name[len("self_attn."):]]
    if name not in _OPEN_CLIP_LAYER:
        raise UnmappedKeyError(f"text encoder key {key!r}")
    return f"{block}.{_OPEN_CLIP_LAYER[name]}.{kind}", None


def hf_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text state dict in OpenCLIP's layout (q, k, v stacked into in_proj)."""
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, list] = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        name, slot = open_clip_key(key)
        if slot is not None:
            stacked.setdefault(name, [None] * 3)[slot] = tensor
        elif name == "text_projection":
            out[name] = tensor.T.contiguous()
        else:
            out[name] = tensor
    for name, parts in stacked.items():
        if any(p is None for p in parts):
            raise UnmappedKeyError(f"{name}: q, k and v projections must all be present")
        out[name] = torch.cat(parts, dim=0)
    return out


def open_clip_to_hf(state: dict[str, torch.Tensor], model_state: dict) -> dict[str, torch.Tensor]:
    """The tensors a transformers CLIP text model (keys of `model_state`) takes from an OpenCLIP-layout
    state dict. File keys the model does not ask for (SD 2's 24th block, logit_scale) are left out, and so
    are model keys the file lacks (the caller reports them as missing)."""
    out: dict[str, torch.Tensor] = {}
    for key in model_state:
        name, slot = open_clip_key(key)
        if name not in state:
            continue
        tensor = state[name]
        if slot is not None:  # a copy, so the model's q/k/v do not share one storage
            out[key] = tensor.chunk(3, dim=0)[slot].clone()
        elif name == "text_projection":
            out[key] = tensor.T.contiguous()
        else:
            out[key] = tensor
    return out
