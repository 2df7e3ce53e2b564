"""Single-file checkpoints of SD 1.x, SD 2.x and SDXL: reading them into diffusers components and writing
diffusers components back in the layout A1111, ComfyUI and kohya read.

Layouts (one prefix per component; the key rules are in ldm_keys.py):

- SD 1.x (LDM): `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.` (CLIP-L in
  transformers' layout).
- SD 2.x (LDM): the same UNet and VAE; the text encoder is OpenCLIP-H under `cond_stage_model.model.`. The
  file holds 24 transformer blocks, the diffusers model 23 (SD 2 conditions on the penultimate layer): the
  last block is dropped on load and, as kohya does when it writes a file from a diffusers model, written as
  a copy of the block before it, with a ones `text_projection` and `logit_scale` 1, so loaders that expect
  the full OpenCLIP model accept the file.
- SDXL (SGM): `model.diffusion_model.` (with `label_emb`), `first_stage_model.`,
  `conditioner.embedders.0.transformer.` (CLIP-L, transformers' layout) and `conditioner.embedders.1.model.`
  (OpenCLIP bigG; `text_projection` stored transposed, as in sd_xl_base_1.0).

Files are read one component at a time (only that component's keys are materialised) and nothing is copied
on write: tensors go to the file as they are, or cast one at a time when a dtype is asked for.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from library.errors import UserError
from library.models import files, ldm_keys

logger = logging.getLogger(__name__)

_CONFIG_ROOT = os.path.join(os.path.dirname(__file__), "configs")
# family -> folder of the real architecture's configs (tests point an entry at a tiny model folder).
CONFIG_DIRS = {name: os.path.join(_CONFIG_ROOT, name) for name in ("sd1", "sd2", "sdxl")}
_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class TextSlot:
    """Where one text encoder lives in a family's single file."""

    prefix: str
    open_clip: bool  # OpenCLIP layout (else transformers' CLIP layout)
    config_name: str  # key in the stored configs / folder under configs/<family>/
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's second encoder)
    padded_layer: bool = False  # SD 2: the file holds one block more than the model


TEXT_SLOTS: dict[str, tuple[TextSlot, ...]] = {
    "sd1": (TextSlot(ldm_keys.TEXT_PREFIX, False, "text_encoder"),),
    "sd2": (TextSlot("cond_stage_model.model.", True, "text_encoder", padded_layer=True),),
    "sdxl": (
        TextSlot("conditioner.embedders.0.transformer.", False, "text_encoder"),
        TextSlot("conditioner.embedders.1.model.", True, "text_encoder_2", with_projection=True),
    ),
}
POSITIONS = 77  # CLIP's context length: the position_ids buffer real files carry


def _family(name: str) -> tuple[TextSlot, ...]:
    if name not in TEXT_SLOTS:
        raise ValueError(f"unknown model family {name!r}; one of {sorted(TEXT_SLOTS)}")
    return TEXT_SLOTS[name]


def read_stock_config(family: str, name: str) -> dict:
    """A config of the family's real architecture, stored in the repository (never fetched)."""
    path = os.path.join(CONFIG_DIRS[family], name, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError:
        raise UserError(f"no stored {name} config for {_LABELS.get(family, family)} ({path})") from None


# --- reading ---------------------------------------------------------------------------------------------

def load_components(family_name: str, path: str, unsafe: bool = False, with_vae: bool = True) -> dict:
    """{"unet", "vae", "text_encoders": [...]} (float32, eval mode) from a single-file checkpoint.

    Configs come from the file's `sdtune.diffusers_configs` metadata, else from configs/<family>/. One
    component's tensors are resident at a time besides the models already built. `with_vae` False leaves
    the VAE unread ("vae" None), for tools that never run it.
    """
    slots = _family(family_name)
    reader = files.CheckpointReader(path, unsafe)
    configs = reader.stored_configs() or {}

    def config(name):
        return configs.get(name) or read_stock_config(family_name, name)

    unet = unet_from_file(reader, config("unet"), family_name)
    vae = vae_from_state(path, reader.read(vae_prefix(reader)), config("vae"), family_name) if with_vae else None
    text_encoders = [text_from_file(reader, slot, config(slot.config_name), family_name) for slot in slots]
    return {"unet": unet, "vae": vae, "text_encoders": text_encoders}


def vae_prefix(reader: files.CheckpointReader) -> str:
    """VAE keys sit under `first_stage_model.` in a full checkpoint, at the top level in a VAE file."""
    return ldm_keys.VAE_PREFIX if any(k.startswith(ldm_keys.VAE_PREFIX) for k in reader.keys()) else ""


def as_float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast half-precision tensors to fp32 one at a time (each half tensor is freed as we go)."""
    for key in list(state):
        if state[key].is_floating_point() and state[key].dtype != torch.float32:
            state[key] = state[key].float()
    return state


def assign(model, state: dict[str, torch.Tensor], path: str, what: str, family: str = "sd1"):
    """Load `state` into an empty (meta) model without copying; UserError on missing or misshapen keys.

    A tensor whose shape differs only by 1x1 dimensions (LDM's conv projections vs diffusers' linear ones)
    is reshaped to the model's shape.
    """
    state = as_float32(state)
    expected = model.state_dict()
    for key, tensor in state.items():
        want = expected.get(key)
        if want is not None and tensor.shape != want.shape and tensor.numel() == want.numel():
            state[key] = tensor.reshape(want.shape)
    label = _LABELS.get(family, family)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: the {what} weights do not fit the {label} architecture "
                        f"({str(exc).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise UserError(f"{path}: {len(missing)} {what} weights missing (e.g. {missing[0]}); "
                        f"is it a complete {label} checkpoint?")
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if unexpected:
        logger.warning("%s: ignored %d unexpected %s keys (e.g. %s)", path, len(unexpected), what, unexpected[0])
    return model.eval()


def _renamed(state: dict[str, torch.Tensor], mapping: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    """model key -> tensor for every model key whose file key (`prefix` + mapping) is in `state`."""
    return {key: state[prefix + ldm] for key, ldm in mapping.items() if prefix + ldm in state}


def unet_from_file(reader: files.CheckpointReader, config: dict, family: str = "sd1"):
    """The UNet under `model.diffusion_model.`; an inpainting file's 9-channel conv_in is honoured."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    prefix = ldm_keys.UNET_PREFIX
    conv_in = prefix + "input_blocks.0.0.weight"
    if conv_in in reader.keys():
        config = dict(config, in_channels=reader.shape(conv_in)[1])  # inpainting models take 9 channels
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    state = reader.read(prefix)
    converted = _renamed(state, ldm_keys.unet_key_map(unet.state_dict()), prefix)
    del state
    return assign(unet, converted, reader.path, "UNet", family)


def vae_from_state(path: str, state: dict[str, torch.Tensor], config: dict, family: str = "sd1"):
    """The VAE from its LDM tensors (keys with or without `first_stage_model.`)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    prefix = ldm_keys.VAE_PREFIX if any(k.startswith(ldm_keys.VAE_PREFIX) for k in state) else ""
    converted = _renamed(state, ldm_keys.vae_key_map(vae.state_dict()), prefix)
    del state
    return assign(vae, converted, path, "VAE", family)


def text_from_file(reader: files.CheckpointReader, slot: TextSlot, config: dict, family: str = "sd1"):
    """One text encoder from its slot of the file (OpenCLIP or transformers layout)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if slot.with_projection else CLIPTextModel
    with init_empty_weights():
        model = cls(CLIPTextConfig.from_dict(config))
    state = {k[len(slot.prefix) :]: v for k, v in reader.read(slot.prefix).items()}
    if slot.open_clip:  # blocks past the model's last (SD 2's 24th) are never asked for
        converted = ldm_keys.open_clip_to_hf(state, model.state_dict())
    else:  # files from transformers 4 keep `text_model.`; transformers 5's CLIPTextModel has none
        plain = {k.removeprefix("text_model."): v for k, v in state.items()}
        converted = {key: plain[key.removeprefix("text_model.")] for key in model.state_dict()
                     if key.removeprefix("text_model.") in plain}
    del state
    what = "text encoder" if slot.config_name == "text_encoder" else "text encoder 2"
    return assign(model, converted, reader.path, what, family)


def load_vae_file(path: str, family_name: str = "sd1", unsafe: bool = False):
    """--vae given as a single file: a VAE-only file or a full checkpoint's `first_stage_model.`."""
    reader = files.CheckpointReader(path, unsafe)
    prefix = vae_prefix(reader)
    state = reader.read(prefix)
    if prefix + "encoder.conv_in.weight" not in state:
        raise UserError(f"{path}: no VAE weights found (encoder.conv_in.weight)")
    config = (reader.stored_configs() or {}).get("vae") or read_stock_config(family_name, "vae")
    return vae_from_state(path, state, config, family_name)


# --- writing ---------------------------------------------------------------------------------------------

def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def cast_to(dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A tensor -> tensor function casting floating tensors to `dtype` (the identity for None)."""
    if dtype is None:
        return _identity
    return lambda t: t.to(dtype) if t.is_floating_point() else t


def text_encoders_of(components: dict) -> list:
    """The text encoders of a components dict: "text_encoders" (list) or text_encoder / text_encoder_2."""
    if components.get("text_encoders") is not None:
        return list(components["text_encoders"])
    return [components[k] for k in ("text_encoder", "text_encoder_2") if components.get(k) is not None]


def to_ldm(family_name: str, unet=None, vae=None, text_encoders=(), convert=_identity,
           padding: bool = True) -> dict[str, torch.Tensor]:
    """The file-layout tensors of the given components (each may be left out).

    `padding` adds what the file layout has and the diffusers models lack (SD 2's 24th block, OpenCLIP's
    text_projection / logit_scale, CLIP's position_ids); merging into an existing file leaves it off so the
    file's own tensors stay. Raises ldm_keys.UnmappedKeyError on a key no rule translates.
    """
    slots = _family(family_name)
    out: dict[str, torch.Tensor] = {}
    if unet is not None:
        state = unet.state_dict()
        for key, ldm in ldm_keys.unet_key_map(state).items():
            out[ldm_keys.UNET_PREFIX + ldm] = convert(state[key])
    if vae is not None:
        state = vae.state_dict()
        for key, ldm in ldm_keys.vae_key_map(state).items():
            out[ldm_keys.VAE_PREFIX + ldm] = convert(ldm_keys._vae_tensor(ldm, state[key]))
    text_encoders = list(text_encoders)
    if text_encoders and len(text_encoders) != len(slots):
        raise ValueError(f"{family_name} has {len(slots)} text encoders, got {len(text_encoders)}")
    for slot, encoder in zip(slots, text_encoders):
        tensors = _text_tensors(slot, encoder, padding)
        out.update({slot.prefix + k: convert(v) for k, v in tensors.items()})
    return out


def _text_tensors(slot: TextSlot, encoder, padding: bool) -> dict[str, torch.Tensor]:
    state = encoder.state_dict()
    if not slot.open_clip:
        keys = [k for k in state if not k.endswith("position_ids")]
        out = {ldm: state[k] for k, ldm in ldm_keys.text_key_map(keys).items()}
        if padding:
            out["text_model.embeddings.position_ids"] = torch.arange(POSITIONS).unsqueeze(0)
        return out
    out = ldm_keys.hf_to_open_clip(state)
    if padding:
        out.update(_open_clip_padding(slot, encoder.config, out))
    return out


def _open_clip_padding(slot: TextSlot, config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What OpenCLIP files hold beyond the diffusers model (see the module docstring)."""
    ref = tensors["token_embedding.weight"]
    extra = {}
    if slot.padded_layer:  # kohya's dummy weights: the last block again, ones projection, logit_scale 1
        last, pad = config.num_hidden_layers - 1, config.num_hidden_layers
        head = f"transformer.resblocks.{last}."
        for key in [k for k in tensors if k.startswith(head)]:
            extra[f"transformer.resblocks.{pad}." + key[len(head) :]] = tensors[key].clone()
        extra["text_projection"] = torch.ones(config.hidden_size, config.hidden_size, dtype=ref.dtype)
        extra["logit_scale"] = torch.tensor(1.0, dtype=ref.dtype)
    else:  # CLIP's trained temperature: log(100), the value its clamp holds (unused for generation)
        extra["logit_scale"] = torch.tensor(math.log(100.0), dtype=ref.dtype)
    return extra


def configs_of(unet, vae, text_encoders: list) -> dict:
    """The diffusers / transformers configs to store in the file (keys as load_components reads them)."""
    out = {"unet": _plain_config(dict(unet.config)), "vae": _plain_config(dict(vae.config))}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
        out[name] = _plain_config(encoder.config.to_dict())
    return out


def _plain_config(config: dict) -> dict:
    """A config without bookkeeping entries (such as the local folder it was read from)."""
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "_use_default_values")}


def write_single_file(family_name: str, components: dict, path: str, dtype: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None) -> str:
    """Write unet, vae and text encoder(s) as one .safetensors in the family's file layout (atomic).

    No copy of the model is made (tensors are cast one at a time when `dtype` is given); the configs go
    into the metadata (`sdtune.diffusers_configs`) so non-standard sizes load back. Returns `path`.
    """
    from library.saving import save_safetensors

    unet, vae = components["unet"], components["vae"]
    encoders = text_encoders_of(components)
    tensors = to_ldm(family_name, unet, vae, encoders, cast_to(dtype))
    meta = dict(metadata or {})
    meta[files.CONFIG_METADATA_KEY] = json.dumps(configs_of(unet, vae, encoders), default=list)
    save_safetensors(tensors, path, meta)
    return path


# --- folders and files alike (tools) ---------------------------------------------------------------------

def load_folder(family_name: str, path: str, with_vae: bool = True) -> dict:
    """{"unet", "vae", "text_encoders"} of a diffusers folder (vae None when not asked for)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def load(loader, subfolder):
        return files.load_subfolder(loader, path, subfolder)

    encoders = [load(CLIPTextModelWithProjection if s.with_projection else CLIPTextModel, s.config_name)
                for s in _family(family_name)]
    return {"unet": load(UNet2DConditionModel, "unet"), "vae": load(AutoencoderKL, "vae") if with_vae else None,
            "text_encoders": encoders}


def load_model(path: str, unsafe: bool = False, with_vae: bool = True) -> tuple[str, dict]:
    """(family, components) of a single file or diffusers folder, the family detected from the keys."""
    family = files.detect_family(path, unsafe)
    if os.path.isdir(path):
        return family, load_folder(family, path, with_vae)
    return family, load_components(family, path, unsafe, with_vae)
