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

SDXL files name U-Net layers by the original (LDM / SGM) layout kohya trains SDXL in
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, networks/targets.py): converting one
renames those paths to diffusers' (``down_blocks.1.attentions.0...``) and back. The block numbering
depends on the U-Net's ``layers_per_block`` (2 in SDXL base), read from the file: from kohya names, SDXL
base's 2 when every layer fits it, else the smallest number every layer fits (in a U-Net of 1 layer per
block an attention sits at ``input_blocks_3_1``, which 2 does not allow); from diffusers paths, the
largest resnet / attention index. Up-samplers follow an attention (slot 2) in up blocks that have one.
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
          "class_embedding", "input_blocks", "middle_block", "output_blocks", "in_layers", "emb_layers",
          "out_layers", "skip_connection", "time_embed", "label_emb")
_JOINED_PATTERN = re.compile("|".join(sorted(JOINED, key=len, reverse=True)))
# The original U-Net's resnet module names -> diffusers' (kohya's SDXL LoCon layers sit in these).
LDM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
LDM_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
SDXL_LAYERS_PER_BLOCK = 2
KOHYA_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def kohya_layer_to_path(layer: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> tuple[str, str]:
    """(diffusers component, module path) of a kohya layer name, e.g. lora_te_text_model_encoder_layers_0_mlp_fc1
    -> ("text_encoder", "text_model.encoder.layers.0.mlp.fc1"); an SDXL U-Net name in the original layout
    gets its diffusers path (`layers_per_block` of the U-Net it was trained on)."""
    prefix = next((p for p in PREFIXES if layer.startswith(p)), None)
    if prefix is None:
        raise UserError(f"layer {layer}: not a kohya LoRA name (lora_unet_ / lora_te_ / lora_te1_ / lora_te2_)")
    rest = layer[len(prefix):]
    # Protect the known multi-part names, turn every other `_` into a dot, then restore them.
    protected = _JOINED_PATTERN.sub(lambda m: m.group(0).replace("_", "\0"), rest)
    path = protected.replace("_", ".").replace("\0", "_")
    if any(part == "" for part in path.split(".")):
        raise UserError(f"layer {layer}: cannot tell its module path (an unexpected `_` in it)")
    if PREFIXES[prefix] == "unet" and path.startswith(LDM_ROOTS):
        path = ldm_to_diffusers_path(path, layers_per_block)
    return PREFIXES[prefix], path


def path_to_kohya_layer(component: str, path: str, sdxl: bool = False) -> str:
    prefixes = SDXL_KOHYA_PREFIX if sdxl else KOHYA_PREFIX
    if component not in prefixes:
        raise UserError(f"component {component}: only unet, text_encoder and text_encoder_2 LoRAs convert")
    return prefixes[component] + path.replace(".", "_")


# --- SDXL: the original U-Net layout <-> diffusers ------------------------------------------------------
# The original U-Net numbers its blocks in one sequence per side: input_blocks 0 is conv_in, then per level
# `layers_per_block` resnet (+ attention) blocks and a down-sampler; output_blocks hold `layers_per_block
# + 1` blocks per level, the up-sampler riding in the level's last one (slot 2 after an attention, else 1).

def _resnet_name(rest: str, names: dict[str, str], path: str) -> str:
    if rest not in names:
        raise UserError(f"U-Net path {path}: {rest} is not a LoRA layer of a resnet block")
    return names[rest]


def ldm_to_diffusers_path(path: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """diffusers module path of a module path in the original layout, e.g. (layers_per_block 2)
    input_blocks.4.1.proj_in -> down_blocks.1.attentions.0.proj_in; a UserError for a path not in it."""
    for src, dst in LDM_FIXED.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    per_block = layers_per_block + 1
    bad = UserError(f"U-Net path {path}: not a module of an original-layout U-Net with "
                    f"{layers_per_block} layers per block")
    if m := re.fullmatch(r"middle_block\.([012])\.(.+)", path):
        if m[1] == "1":
            return f"mid_block.attentions.0.{m[2]}"
        return f"mid_block.resnets.{int(m[1]) // 2}.{_resnet_name(m[2], LDM_RESNET, path)}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", path):
        index, slot, rest = int(m[1]), m[2], m[3]
        block, layer = divmod(index - 1, per_block)
        if rest == "op" and slot == "0" and layer == layers_per_block:
            return f"down_blocks.{block}.downsamplers.0.conv"
        if layer == layers_per_block or index < 1:
            raise bad
        if slot == "0":
            return f"down_blocks.{block}.resnets.{layer}.{_resnet_name(rest, LDM_RESNET, path)}"
        return f"down_blocks.{block}.attentions.{layer}.{rest}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", path):
        index, slot, rest = int(m[1]), m[2], m[3]
        block, layer = divmod(index, per_block)
        if rest == "conv" and slot != "0":
            if layer != layers_per_block:
                raise bad
            return f"up_blocks.{block}.upsamplers.0.conv"
        if slot == "0":
            return f"up_blocks.{block}.resnets.{layer}.{_resnet_name(rest, LDM_RESNET, path)}"
        if slot == "1":
            return f"up_blocks.{block}.attentions.{layer}.{rest}"
    raise bad


def diffusers_to_ldm_path(path: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK,
                          up_attention_blocks: tuple[int, ...] = (0, 1)) -> str:
    """The original-layout module path of a diffusers U-Net module path (the inverse of
    `ldm_to_diffusers_path`). `up_attention_blocks`: the up blocks with attentions (SDXL base: 0 and 1),
    which put their up-sampler in slot 2."""
    for dst, src in LDM_FIXED.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    per_block = layers_per_block + 1
    resnet = {v: k for k, v in LDM_RESNET.items()}
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        index = 1 + block * per_block + layer if side == "down" else block * per_block + layer
        name = f"{'input' if side == 'down' else 'output'}_blocks.{index}"
        return f"{name}.0.{_resnet_name(rest, resnet, path)}" if kind == "resnets" else f"{name}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        block = int(m[1])
        slot = 2 if block in up_attention_blocks else 1
        return f"output_blocks.{block * per_block + layers_per_block}.{slot}.conv"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", path):
        return f"middle_block.{2 * int(m[1])}.{_resnet_name(m[2], resnet, path)}"
    raise UserError(f"U-Net path {path}: not a LoRA layer sdtune can place in the original (SDXL) layout")


def ldm_layers_per_block(layers: list[str]) -> int:
    """`layers_per_block` of the U-Net a kohya SDXL file was trained on, from its U-Net layer names:
    SDXL base's 2 when every name fits it, else the smallest number of layers that every name fits."""
    unet = [layer for layer in layers if re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", layer)]
    for candidate in (SDXL_LAYERS_PER_BLOCK, *range(1, 9)):
        try:
            for layer in unet:
                kohya_layer_to_path(layer, candidate)
        except UserError:
            continue
        return candidate
    raise UserError(f"layer {unet[0]}: its U-Net block numbering fits no SDXL-like U-Net")


def diffusers_layers_per_block(paths: list[str]) -> int:
    """`layers_per_block` of a diffusers U-Net, from LoRA module paths (2 when none tells)."""
    counts = [int(m[2]) + (m[1] == "down") for p in paths
              if (m := re.match(r"(down|up)_blocks\.\d+\.(?:resnets|attentions)\.(\d+)\.", p))]
    return max(counts, default=SDXL_LAYERS_PER_BLOCK)


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


def kohya_to_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                       layers_per_block: int | None = None) -> tuple[dict, dict]:
    """diffusers / peft tensors and metadata (with `lora_adapter_metadata`) for a kohya LoRA file.
    `layers_per_block`: of the SDXL U-Net the file was trained on (None: read from the layer names)."""
    out, ranks, alphas = {}, {}, {}
    if layers_per_block is None:
        layers_per_block = ldm_layers_per_block(sorted({key.partition(".")[0] for key in tensors}))
    for key, value in tensors.items():
        layer, rest = _split_kohya_key(key)
        component, path = kohya_layer_to_path(layer, layers_per_block)
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


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                       sdxl: bool | None = None) -> tuple[dict, dict]:
    """kohya tensors (with an alpha per layer) and metadata for a diffusers / peft LoRA file. SDXL files
    (`sdxl` None: those with a second text encoder, or 2048-wide cross-attention) get kohya's SDXL names."""
    config = _read_config(metadata)
    if sdxl is None:
        sdxl = any(key.startswith("text_encoder_2.") for key in tensors) or any(
            re.search(r"\.attn2\.to_k\.lora_A\.", key) and value.shape[-1] == 2048 for key, value in tensors.items())
    unet_paths = [key.partition(".")[2] for key in tensors if key.startswith("unet.")]
    layers_per_block = diffusers_layers_per_block(unet_paths)
    up_attention = tuple({int(m[1]) for p in unet_paths if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", p))})
    out, downs = {}, {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        path, dot, suffix = rest.rpartition(".lora_")
        kohya_suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(suffix)
        if not dot or kohya_suffix is None:
            raise UserError(f"key {key}: not a diffusers LoRA key (<component>.<module>.lora_A/lora_B.weight)")
        named = diffusers_to_ldm_path(path, layers_per_block, up_attention) if sdxl and component == "unet" else path
        layer = path_to_kohya_layer(component, named, sdxl)
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
