"""LoRA key formats: kohya (sd-scripts, sdtune, A1111) <-> diffusers / peft, both ways and lossless.

kohya names a layer after its module path with every `.` made `_`, under a prefix that says which model
it belongs to: ``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`` (and ``.lora_up.weight``,
``.alpha``). diffusers' ``save_lora_weights`` (peft) keeps the path and the model apart:
``unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`` (down) and ``.lora_B.weight`` (up); text
encoders are ``text_encoder.`` / ``text_encoder_2.`` with the ``text_model.`` level kohya names carry.

peft has no alpha per key: a layer's scale is ``lora_alpha / r`` from its LoraConfig, with
``rank_pattern`` / ``alpha_pattern`` for layers that differ. diffusers keeps that config in the file's
``lora_adapter_metadata`` (JSON of ``unet.r``, ``unet.lora_alpha``, ``unet.alpha_pattern``, ...) and
``load_lora_weights`` builds the adapter from it; a file without it loads with alpha = rank (scale 1).
sdtune writes each layer's alpha there, weights untouched, rather than folding alpha / rank into the
up weights: the bytes of every weight stay the same both ways (folding rounds), and a diffusers file
converted back gives the kohya file again. A diffusers file without that metadata converts with
alpha = rank, the scale diffusers gives it.

Going from kohya names back to paths needs to know which `_` were dots: the names of diffusers' U-Net and
transformers' CLIP modules that contain `_` are listed in `JOINED`; a kohya name with a part this table
does not know is refused rather than guessed.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch

from library.errors import UserError

# kohya prefix -> diffusers prefix (and whether kohya's names include the CLIP `text_model` level)
PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
            "lora_te2_": "text_encoder_2"}
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the peft LoraConfig in the file

# Module names with `_` in diffusers' UNet2DConditionModel and transformers' CLIP text models.
JOINED = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k",
          "to_v", "to_out", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding",
          "linear_1", "linear_2", "add_embedding", "conv_norm_out", "text_model", "self_attn", "q_proj",
          "k_proj", "v_proj", "out_proj", "text_projection", "final_layer_norm", "layer_norm1", "layer_norm2",
          "token_embedding", "position_embedding", "add_k_proj", "add_v_proj", "encoder_hid_proj",
          "class_embedding")
_JOINED_PATTERN = re.compile("|".join(sorted(JOINED, key=len, reverse=True)))
KOHYA_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def kohya_layer_to_path(layer: str) -> tuple[str, str]:
    """(diffusers component, module path) of a kohya layer name, e.g. lora_te_text_model_encoder_layers_0_mlp_fc1
    -> ("text_encoder", "text_model.encoder.layers.0.mlp.fc1")."""
    prefix = next((p for p in PREFIXES if layer.startswith(p)), None)
    if prefix is None:
        raise UserError(f"layer {layer}: not a kohya LoRA name (lora_unet_ / lora_te_ / lora_te1_ / lora_te2_)")
    rest = layer[len(prefix):]
    # Protect the known multi-part names, turn every other `_` into a dot, then restore them.
    protected = _JOINED_PATTERN.sub(lambda m: m.group(0).replace("_", "\0"), rest)
    path = protected.replace("_", ".").replace("\0", "_")
    if any(part == "" for part in path.split(".")):
        raise UserError(f"layer {layer}: cannot tell its module path (an unexpected `_` in it)")
    return PREFIXES[prefix], path


def path_to_kohya_layer(component: str, path: str, sdxl: bool = False) -> str:
    prefixes = SDXL_KOHYA_PREFIX if sdxl else KOHYA_PREFIX
    if component not in prefixes:
        raise UserError(f"component {component}: only unet, text_encoder and text_encoder_2 LoRAs convert")
    return prefixes[component] + path.replace(".", "_")


def _split_kohya_key(key: str) -> tuple[str, str]:
    layer, _, rest = key.partition(".")
    if rest not in ("lora_down.weight", "lora_up.weight", "alpha"):
        raise UserError(f"key {key}: only LoRA / LoCon / DyLoRA layers (lora_down, lora_up, alpha) convert; "
                        "LoHa, LoKr, DoRA and other LyCORIS layers have no diffusers LoRA form")
    return layer, rest


def _config_name(component: str, path: str) -> str:
    """The module name peft's patterns use: without the `text_model.` level transformers 5 no longer has
    (peft matches a pattern as a suffix, so it also finds the module under transformers 4)."""
    return path.removeprefix("text_model.") if component.startswith("text_encoder") else path


def kohya_to_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict]:
    """diffusers / peft tensors and metadata (with `lora_adapter_metadata`) for a kohya LoRA file."""
    out, ranks, alphas = {}, {}, {}
    for key, value in tensors.items():
        layer, rest = _split_kohya_key(key)
        component, path = kohya_layer_to_path(layer)
        name = (component, _config_name(component, path))
        if rest == "alpha":
            alphas[name] = float(value.float().item())
            continue
        out[f"{component}.{path}.{KOHYA_SUFFIXES[rest]}"] = value
        if rest == "lora_down.weight":
            ranks[name] = int(value.shape[0])
    missing = [k for k in ranks if k not in alphas]
    for name in missing:  # kohya: a layer without alpha has alpha = rank
        alphas[name] = float(ranks[name])
    config = {}
    for component in sorted({c for c, _ in ranks}):
        config.update(_peft_config(component, {p: r for (c, p), r in ranks.items() if c == component},
                                   {p: a for (c, p), a in alphas.items() if c == component}))
    converted = {k: v for k, v in metadata.items() if k != METADATA_KEY}
    converted[METADATA_KEY] = json.dumps(config, sort_keys=True)
    converted.setdefault("format", "pt")
    return out, converted


def _peft_config(component: str, ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """One component's LoraConfig as diffusers stores it (keys prefixed with the component)."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
              "rank_pattern": {p: r for p, r in sorted(ranks.items()) if r != rank},
              "alpha_pattern": {p: a for p, a in sorted(alphas.items()) if a != alpha}}
    return {f"{component}.{key}": value for key, value in config.items()}


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict]:
    """kohya tensors (with an alpha per layer) and metadata for a diffusers / peft LoRA file."""
    config = _read_config(metadata)
    sdxl = any(key.startswith("text_encoder_2.") for key in tensors)
    out, downs = {}, {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        path, dot, suffix = rest.rpartition(".lora_")
        kohya_suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(suffix)
        if not dot or kohya_suffix is None:
            raise UserError(f"key {key}: not a diffusers LoRA key (<component>.<module>.lora_A/lora_B.weight)")
        layer = path_to_kohya_layer(component, path, sdxl)
        out[f"{layer}.{kohya_suffix}"] = value
        if kohya_suffix == "lora_down.weight":
            downs[layer] = (component, path, value)
    for layer, (component, path, down) in downs.items():
        alpha = _alpha(config, component, _config_name(component, path), int(down.shape[0]))
        out[f"{layer}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
    converted = {k: v for k, v in metadata.items() if k != METADATA_KEY}
    return out, converted


def _read_config(metadata: dict[str, str]) -> dict:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise UserError(f"metadata {METADATA_KEY}: not JSON; remove it to convert with alpha = rank") from None
    return config if isinstance(config, dict) else {}


def _alpha(config: dict, component: str, name: str, rank: int) -> float:
    """A layer's alpha from diffusers' LoraConfig metadata, as peft resolves it; alpha = rank without one."""
    if f"{component}.lora_alpha" not in config:
        return float(rank)
    for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
        if name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name):
            return float(value)
    return float(config[f"{component}.lora_alpha"])


def detect_format(tensors: dict[str, torch.Tensor]) -> str:
    """kohya, diffusers, or a UserError for anything else."""
    if tensors and all(key.startswith(tuple(PREFIXES)) for key in tensors):
        return "kohya"
    if tensors and all(".lora_A." in key or ".lora_B." in key for key in tensors):
        return "diffusers"
    example = next((k for k in tensors if not k.startswith(tuple(PREFIXES))), "(none)")
    raise UserError(f"neither a kohya LoRA (lora_unet_* / lora_te_* keys) nor a diffusers / peft LoRA "
                    f"(*.lora_A.weight / *.lora_B.weight); e.g. key {example}")


def convert_file(src_path: str, dst_path: str, dst: str, overwrite: bool = False) -> str:
    """Write `src_path` in format `dst` (kohya or diffusers) to `dst_path`; returns the source format."""
    from library.lora_inspect import read_network_file
    from library.saving import add_model_hashes, save_safetensors

    if not dst_path.lower().endswith(".safetensors"):
        raise UserError(f"--dst_path {dst_path}: give a file name ending in .safetensors")
    if os.path.abspath(dst_path) == os.path.abspath(src_path):
        raise UserError(f"--dst_path {dst_path}: is the input file; give another name")
    if os.path.exists(dst_path) and not overwrite:
        raise UserError(f"--dst_path {dst_path}: already exists; remove it or give another name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(dst_path))):
        raise UserError(f"--dst_path {dst_path}: its folder does not exist")
    tensors, metadata = read_network_file(src_path, "--src_path")
    try:
        source = detect_format(tensors)
    except UserError as exc:
        raise UserError(f"--src_path {src_path}: {exc}") from None
    if source == dst:
        raise UserError(f"--src_path {src_path}: is already in {dst} format")
    convert = kohya_to_diffusers if dst == "diffusers" else diffusers_to_kohya
    out, meta = convert(tensors, metadata)
    save_safetensors(out, dst_path, add_model_hashes(out, meta))
    return source
