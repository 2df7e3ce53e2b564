"""Merging trained networks: into an SD 1.x / 2.x / SDXL checkpoint, or into one LoRA file.

Every merge here is exact unless a flag says otherwise:

- into a checkpoint, each wrapped weight becomes ``W + ratio * delta`` with the delta of the layer as the
  network computes it (LoRA / LoCon / DyLoRA: ``up @ down * alpha / rank``; LyCORIS layers through
  networks.lycoris_compat, which applies alpha/dim once);
- LoRA + LoRA (`concat_loras`) stacks the ranks: ``down`` rows and ``up`` columns side by side, each file's
  ``ratio * alpha / rank`` folded into its ``up`` and the new alpha equal to the new rank, so the merged
  delta is ``sum ratio_i * delta_i`` to rounding;
- `svd_merge` sums the exact deltas and keeps the top singular vectors, exact when the new rank reaches the
  sum's true rank.

kohya's LoRA + LoRA merge adds the factors themselves (`average_loras`, behind `--kohya_average`): its
delta is ``(sum |s_i| up_i) @ (sum s_j down_j)``, which scales with ratio squared and has cross terms
(sd-scripts #586, #868); it is kept for reproducing kohya's files only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass

import torch
from tqdm import tqdm

from library.errors import UserError
from networks.detect import Detected, describe_file
from networks.lora import lora_delta, read_weights
from networks.targets import network_layers

logger = logging.getLogger(__name__)

DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class NetworkFile:
    """A network file read whole: tensors, `ss_*` metadata and what detect says it holds."""

    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    detected: Detected

    @property
    def is_lora(self) -> bool:
        """LoRA, LoCon or DyLoRA keys only (lora_up / lora_down / alpha): sdtune's own LoRA reads it."""
        return "networks.lora" in self.detected.sdtune_modules


def read_network(path: str, flag: str = "--models") -> NetworkFile:
    """The network file at `path`; a UserError when it is missing, unreadable or holds no network."""
    from library.saving import read_safetensors_metadata

    try:
        detected = describe_file(path)
    except UserError as exc:
        raise UserError(f"{flag} {exc}") from None
    if detected.algo == "unknown":
        raise UserError(f"{flag} {path}: holds no network layers sdtune recognises (is it a checkpoint?)")
    return NetworkFile(path, read_weights(path), read_safetensors_metadata(path), detected)


def require_lora(net: NetworkFile, what: str) -> None:
    """A UserError unless `net` is a LoRA-format file (what `what` needs)."""
    if not net.is_lora:
        raise UserError(f"{net.path}: holds a {net.detected.summary()}; {what} needs LoRA / LoCon files "
                        "(lora_up / lora_down / alpha); merge it into a checkpoint with --sd_model instead")


def check_ratios(models: list[str] | None, ratios: list[float] | None) -> list[float]:
    """One ratio per model (all 1.0 when none are given); a UserError on a count mismatch."""
    if not models:
        raise UserError("--models: give at least one network file")
    if ratios is None:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise UserError(f"--ratios: {len(ratios)} ratios for {len(models)} --models; give one ratio per model")
    return list(ratios)


# --- LoRA factors and deltas ------------------------------------------------------------------------------

def lora_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Layer name -> (up, down, alpha / rank) of a LoRA state dict (no alpha means alpha = rank)."""
    out = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        up = tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise UserError(f"{name}: lora_down without lora_up (a truncated file?)")
        rank = down.shape[0]
        alpha = tensors.get(f"{name}.alpha")
        alpha = float(alpha.float().item()) if alpha is not None else float(rank)
        out[name] = (up, down, alpha / rank)
    return out


def lora_deltas(tensors: dict[str, torch.Tensor], device="cpu") -> dict[str, torch.Tensor]:
    """Layer name -> its exact weight change (float32, on `device`), shaped like the wrapped weight."""
    return {name: lora_delta(up.to(device), down.to(device), scale)
            for name, (up, down, scale) in lora_factors(tensors).items()}


# --- into a checkpoint ------------------------------------------------------------------------------------

def model_layers(text_encoder, unet) -> dict[str, torch.nn.Module]:
    """kohya's layer name -> the Linear / Conv2d it names, for every layer a LoRA or LoCon can wrap."""
    return {layer.name: layer.module for layer in network_layers(text_encoder, unet, with_conv=True)}


@torch.no_grad()
def merge_into_model(text_encoder, unet, nets: list[NetworkFile], ratios: list[float], device="cpu") -> None:
    """Add ``ratio * delta`` of every layer of every network to the models' weights, in place (float32)."""
    layers = model_layers(text_encoder, unet)
    for net, ratio in zip(nets, ratios):
        logger.info("merging %s (%s) at ratio %g", net.path, net.detected.algo, ratio)
        if not net.is_lora:
            _merge_lycoris(text_encoder, unet, net, ratio)
            continue
        deltas = lora_deltas(net.tensors, device)
        todo = {name: delta for name, delta in deltas.items() if name in layers}
        if not todo:
            raise UserError(f"{net.path}: none of its layers belong to this model (a network for another model?)")
        if len(todo) < len(deltas):
            logger.warning("%s: %d layers not in this model are skipped (first: %s)", net.path,
                           len(deltas) - len(todo), min(set(deltas) - set(todo)))
        for name, delta in todo.items():  # every shape checked before the first weight changes
            if layers[name].weight.shape != delta.shape:
                raise UserError(f"{net.path}: {name} has shape {tuple(delta.shape)}, the model's weight "
                                f"{tuple(layers[name].weight.shape)} (a network for another model?)")
        for name, delta in tqdm(todo.items(), desc=os.path.basename(net.path)):
            weight = layers[name].weight
            weight.copy_((weight.float() + ratio * delta.to(weight.device)).to(weight.dtype))


def _merge_lycoris(text_encoder, unet, net: NetworkFile, ratio: float) -> None:
    """A LyCORIS file: lycoris rebuilds its layers, sdtune's merge_to bakes each at `ratio` exactly."""
    from networks import lycoris_compat

    network, _ = lycoris_compat.create_network_from_weights(ratio, net.path, None, text_encoder, unet,
                                                            weights_sd=dict(net.tensors))
    network.merge_to()


# --- LoRA + LoRA ------------------------------------------------------------------------------------------

def _grouped(nets: list[NetworkFile], ratios: list[float]) -> dict[str, list[tuple]]:
    """Layer name -> [(file, up, down, scale, ratio)] over all files, in file order."""
    groups: dict[str, list[tuple]] = {}
    for net, ratio in zip(nets, ratios):
        require_lora(net, "merging networks into one")
        for name, (up, down, scale) in lora_factors(net.tensors).items():
            groups.setdefault(name, []).append((net.path, up.float(), down.float(), scale, ratio))
    return groups


def _check_same_layer(name: str, entries: list[tuple]) -> None:
    """Every file's layer `name` must wrap the same weight shape (output size, input size, kernel)."""
    first = entries[0]
    for entry in entries[1:]:
        if entry[1].shape[0] != first[1].shape[0] or entry[2].shape[1:] != first[2].shape[1:]:
            raise UserError(f"{entry[0]}: {name} wraps a weight of another shape than in {first[0]} "
                            "(networks for different models?)")


def concat_loras(nets: list[NetworkFile], ratios: list[float]) -> dict[str, torch.Tensor]:
    """One LoRA whose delta is exactly ``sum ratio_i * delta_i``: ranks stacked, alpha = the summed rank."""
    out = {}
    for name, entries in tqdm(_grouped(nets, ratios).items(), desc="concat"):
        _check_same_layer(name, entries)
        ups = [up * (scale * ratio) for _, up, _, scale, ratio in entries]
        down = torch.cat([down for _, _, down, _, _ in entries], dim=0)
        out[f"{name}.lora_up.weight"] = torch.cat(ups, dim=1).contiguous()
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def average_loras(nets: list[NetworkFile], ratios: list[float]) -> dict[str, torch.Tensor]:
    """kohya's merge of factors: ``down = sum s_i down_i``, ``up = sum |s_i| up_i`` with
    ``s_i = sqrt(alpha_i / alpha_first) * ratio_i``, keeping the first file's alpha. NOT the sum of deltas."""
    out = {}
    for name, entries in tqdm(_grouped(nets, ratios).items(), desc="average"):
        _check_same_layer(name, entries)
        path0, up0, down0, scale0, _ = entries[0]
        rank = down0.shape[0]
        alpha0 = scale0 * rank
        up, down = torch.zeros_like(up0), torch.zeros_like(down0)
        for path, u, d, scale, ratio in entries:
            if d.shape[0] != rank:
                raise UserError(f"{path}: {name} has rank {d.shape[0]}, {path0} rank {rank}; --kohya_average "
                                "needs equal ranks (the default concatenation does not)")
            s = math.sqrt(scale * rank / alpha0) * ratio
            up += u * abs(s)
            down += d * s
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha0)
    return out


# --- SVD merge --------------------------------------------------------------------------------------------

# kohya's layer-block weights: 26 slots (BASE = text encoder, IN00-IN11, MID, OUT00-OUT11); a 17-value list
# fills the slots SD 1.x LoRAs use. 12 and 20 values are SDXL's layouts.
LBW_SLOTS = {26: tuple(range(26)), 17: (0, 2, 3, 5, 6, 8, 9, 13, 17, 18, 19, 20, 21, 22, 23, 24, 25)}
_UNET_BLOCK = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")


def parse_lbws(lbws: list[str] | None, count: int) -> list[list[float] | None]:
    """`--lbws` JSON lists, one per model, as full 26-slot weights; [None] * count when not given."""
    if not lbws:
        return [None] * count
    if len(lbws) != count:
        raise UserError(f"--lbws: {len(lbws)} lists for {count} --models; give one per model")
    out = []
    for text in lbws:
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise UserError(f"--lbws {text!r}: give a JSON list of numbers such as [1,1,0.5,...]")
        if len(values) not in LBW_SLOTS:
            hint = " (12 and 20 are SDXL layouts, not supported)" if len(values) in (12, 20) else ""
            raise UserError(f"--lbws {text!r}: {len(values)} values; give 17 or 26{hint}")
        full = [1.0] * 26
        for slot, value in zip(LBW_SLOTS[len(values)], values):
            full[slot] = float(value)
        out.append(full)
    return out


def lbw_slot(name: str) -> int | None:
    """The block-weight slot of an SD 1.x LoRA layer: 0 text encoder, 1 + n for INnn, 13 MID, 14 + n OUTnn."""
    if name.startswith("lora_te"):
        return 0
    match = _UNET_BLOCK.search(name)
    if match:
        side, block, kind, index = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if side == "down":
            return 1 + (3 * (block + 1) if kind == "downsamplers" else 3 * block + index + 1)
        return 14 + (3 * block + 2 if kind == "upsamplers" else 3 * block + index)
    return 13 if "mid_block_" in name else None


def summed_deltas(nets: list[NetworkFile], ratios: list[float], lbws: list, device="cpu") -> dict[str, torch.Tensor]:
    """Layer name -> ``sum ratio_i * block_weight_i * delta_i`` (float32)."""
    total: dict[str, torch.Tensor] = {}
    for net, ratio, lbw in zip(nets, ratios, lbws):
        require_lora(net, "svd_merge_lora")
        for name, delta in lora_deltas(net.tensors, device).items():
            slot = lbw_slot(name) if lbw else None
            weight = ratio * (lbw[slot] if slot is not None else 1.0)
            if name in total and total[name].shape != delta.shape:
                raise UserError(f"{net.path}: {name} wraps a weight of another shape than in an earlier "
                                "model (networks for different models?)")
            total[name] = total[name] + weight * delta if name in total else weight * delta
    return total


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of the best rank-`rank` approximation of `delta` (exact when its rank is <= `rank`)."""
    out_dim = delta.shape[0]
    matrix = delta.flatten(1)
    rank = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if delta.ndim == 4:
        return up.reshape(out_dim, rank, 1, 1), down.reshape(rank, *delta.shape[1:])
    return up, down


def svd_merge(deltas: dict[str, torch.Tensor], new_rank: int, new_conv_rank: int) -> dict[str, torch.Tensor]:
    """A LoRA state dict approximating `deltas`: rank `new_rank` (`new_conv_rank` for kxk convs), alpha = rank."""
    out = {}
    for name, delta in tqdm(deltas.items(), desc="svd"):
        spatial = delta.ndim == 4 and tuple(delta.shape[2:]) != (1, 1)
        up, down = svd_factors(delta, new_conv_rank if spatial else new_rank)
        out[f"{name}.lora_up.weight"] = up.cpu().contiguous()
        out[f"{name}.lora_down.weight"] = down.cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


# --- writing a merged LoRA --------------------------------------------------------------------------------

def lora_metadata(nets: list[NetworkFile], ratios: list[float], tensors: dict[str, torch.Tensor],
                  save_to: str, with_spec: bool) -> dict[str, str]:
    """kohya's minimum network metadata for a merged LoRA, plus what it was merged from."""
    downs = [v for k, v in tensors.items() if k.endswith("lora_down.weight")]
    ranks = {v.shape[0] for v in downs if v.ndim == 2}
    conv = {v.shape[0] for v in downs if v.ndim == 4 and tuple(v.shape[2:]) != (1, 1)}
    dim = max(ranks, default=max(conv, default=0))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(dim)}
    if conv:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(max(conv)), "conv_alpha": str(max(conv))})
    for key in ("ss_v2", "ss_base_model_version"):
        value = next((n.metadata[key] for n in nets if key in n.metadata), None)
        if value is not None:
            metadata[key] = value
    if with_spec:
        metadata["modelspec.title"] = os.path.splitext(os.path.basename(save_to))[0]
        metadata["modelspec.merged_from"] = ", ".join(
            f"{os.path.splitext(os.path.basename(n.path))[0]}:{r:g}" for n, r in zip(nets, ratios))
    return metadata


def save_lora(tensors: dict[str, torch.Tensor], path: str, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """Write a LoRA state dict as .safetensors atomically, cast to `dtype`, with kohya's sshs_* hashes."""
    from library.saving import add_model_hashes, save_safetensors

    cast = {k: (v.to(dtype) if k.endswith(".weight") else v.float()).contiguous() for k, v in tensors.items()}
    save_safetensors(cast, path, add_model_hashes(cast, metadata))
    logger.info("saved %s (%d layers)", path, sum(k.endswith(".alpha") for k in cast))


def check_save_to(save_to: str | None, inputs: list[str], suffixes: tuple[str, ...] = (".safetensors",)) -> str:
    """`--save_to` given, of a kind we write, and not one of the inputs (those are never overwritten)."""
    if not save_to:
        raise UserError("--save_to: give the output path")
    if not save_to.lower().endswith(suffixes):
        raise UserError(f"--save_to {save_to}: give a .safetensors file path (.ckpt files are not written; "
                        "only a diffusers-folder --sd_model can be written as a folder)")
    target = os.path.realpath(save_to)
    if any(os.path.exists(p) and os.path.realpath(p) == target for p in inputs):
        raise UserError(f"--save_to {save_to}: is one of the inputs; inputs are never overwritten, "
                        "choose another path")
    return save_to


# --- checkpoints ------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A model loaded for merging: its text encoder(s) and UNet (float32), family and source."""

    path: str
    text_encoders: list
    unet: torch.nn.Module
    vae: torch.nn.Module | None  # kept for a folder model written as one file
    family: str = "sd1"

    @property
    def text_encoder(self):
        """What kohya's network code takes: the encoder, or the list of both for SDXL."""
        return self.text_encoders[0] if len(self.text_encoders) == 1 else list(self.text_encoders)


def load_checkpoint(path: str, v2: bool = False, sdxl: bool = False) -> Checkpoint:
    """A diffusers folder or a single .safetensors file of SD 1.x / 2.x / SDXL (family detected from the
    keys; `v2` / `sdxl` are kohya's flags, checked against it); a UserError for anything else."""
    from library.models import files, single_file

    if os.path.isfile(path) and not path.lower().endswith(".safetensors"):
        raise UserError(f"--sd_model {path}: give a .safetensors file or a diffusers folder (pickled "
                        ".ckpt files are not read here)")
    files.check_local_path(path, "--sd_model")
    family = files.detect_family(path)
    files.check_family_flags(path, family, v2=v2, sdxl=sdxl, flag="--sd_model")
    if os.path.isdir(path):
        parts = single_file.load_folder(family, path)
    else:  # the file's own VAE tensors are written back untouched: no need to build it
        parts = single_file.load_components(family, path, with_vae=False)
    return Checkpoint(path, parts["text_encoders"], parts["unet"], parts["vae"], family)


def save_checkpoint(ckpt: Checkpoint, save_to: str, dtype: torch.dtype | None) -> None:
    """Write the merged model: a file model as the input file with its UNet and text-encoder tensors
    replaced (VAE, extra keys and metadata kept); a folder model as a folder, or as a single file in the
    family's layout when `save_to` ends in .safetensors. `dtype` None keeps each tensor's dtype."""
    if not os.path.isdir(ckpt.path):
        _save_single_file(ckpt, save_to, dtype)
    elif save_to.lower().endswith(".safetensors"):
        from library.models.single_file import write_single_file

        parts = {"unet": ckpt.unet, "vae": ckpt.vae, "text_encoders": ckpt.text_encoders}
        write_single_file(ckpt.family, parts, save_to, dtype)
    else:
        _save_folder(ckpt, save_to, dtype)
    logger.info("saved %s", save_to)


def _save_single_file(ckpt: Checkpoint, save_to: str, dtype: torch.dtype | None) -> None:
    from safetensors import safe_open

    from library.models.single_file import to_ldm
    from library.saving import save_safetensors

    with safe_open(ckpt.path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    # padding=False: the file's own extras (SD 2's 24th block, logit_scale, ...) are kept as they are
    new = to_ldm(ckpt.family, ckpt.unet, None, ckpt.text_encoders, padding=False)
    for key, value in new.items():
        old = tensors.get(key)
        if old is None or old.numel() != value.numel():
            raise UserError(f"--sd_model {ckpt.path}: cannot write {key} back in the file's layout; "
                            "save to a folder instead")
        tensors[key] = value.reshape(old.shape).to(old.dtype)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors(tensors, save_to, metadata or None)


def _save_folder(ckpt: Checkpoint, save_to: str, dtype: torch.dtype | None) -> None:
    """A copy of the input folder with unet/ and text_encoder/ rewritten, moved into place when complete."""
    import shutil

    from library.saving import partial_folder, replace_folder

    partial = partial_folder(save_to)
    if os.path.exists(partial):
        shutil.rmtree(partial)
    shutil.copytree(ckpt.path, partial)
    named = [("unet", ckpt.unet)] + list(zip(("text_encoder", "text_encoder_2"), ckpt.text_encoders))
    for name, module in named:
        if dtype is None:  # keep the dtype the folder stored
            dtype_here = _stored_dtype(os.path.join(ckpt.path, name))
        else:
            dtype_here = dtype
        shutil.rmtree(os.path.join(partial, name))
        module.to(dtype_here).save_pretrained(os.path.join(partial, name), safe_serialization=True)
    replace_folder(partial, save_to)


def _stored_dtype(folder: str) -> torch.dtype:
    """The dtype of the first floating tensor of a component folder's .safetensors weights (float32 if none)."""
    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(tensor.get_dtype())
                    return dtype or torch.float32
    return torch.float32


def add_output_args(parser, save_precision_help: str) -> None:
    """The flags kohya's merge_lora.py and svd_merge_lora.py share: dtypes, device, metadata."""
    parser.add_argument("--save_precision", choices=list(DTYPES), help=save_precision_help)
    parser.add_argument("--precision", default="float", choices=list(DTYPES),
                        help="kohya's merge dtype; sdtune always merges in float32")
    parser.add_argument("--device", default="cpu", help="where the deltas (and SVDs) are computed (cpu, cuda)")
    parser.add_argument("--no_metadata", action="store_true", help="no modelspec title / merged_from entries")
