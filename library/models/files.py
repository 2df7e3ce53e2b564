"""Reading model files: path checks, safetensors headers, per-component state dicts, family detection.

Nothing here loads a whole model. Single files are read one component at a time (only the keys under
that component's prefix), so converting a checkpoint never holds two copies of the UNet. Pickled
checkpoints (`.ckpt`, `.pt`, `.bin`) run code when loaded and are refused unless the user opts in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import torch

from library.errors import UserError

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")
# Metadata key where sdtune's own single-file writer records the diffusers configs of non-standard
# architectures (the tiny test models); real SD checkpoints use the configs in library/models/configs.
CONFIG_METADATA_KEY = "sdtune.diffusers_configs"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_local_path(path: str | None, what: str = "model") -> str:
    """`path` itself when it exists locally; otherwise a UserError (hub ids get their own message)."""
    if not path:
        raise UserError(f"no {what} given: pass a local file or diffusers folder")
    if os.path.exists(path):
        return path
    if _HUB_ID.match(path) and not path.lower().endswith(SAFETENSORS_EXT + PICKLE_EXT):
        raise UserError(
            f"{what} {path!r} looks like a Hugging Face hub id: sdtune works offline, "
            "download the model and pass its local path"
        )
    raise UserError(f"{what} not found: {path}")


def is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_EXT)


def _load_pickle(path: str, unsafe_load_ckpt: bool) -> dict[str, torch.Tensor]:
    """A pickled checkpoint's flat state dict, only when the user allowed unpickling."""
    if not unsafe_load_ckpt:
        raise UserError(
            f"{path}: pickled checkpoints can run arbitrary code when loaded; convert it to .safetensors, "
            "or pass --unsafe_load_ckpt if you trust the file"
        )
    try:
        try:  # memory-map when the file's format allows it, so tensors are paged in as read
            data = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"{path}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    while isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds no state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


class CheckpointReader:
    """Reads a single-file checkpoint component by component.

    safetensors files are opened lazily and only the requested keys are materialised; a pickle is
    unpickled once (on opt-in) and each component's tensors are handed over and dropped from it.
    """

    def __init__(self, path: str, unsafe_load_ckpt: bool = False):
        self.path = path
        self._pickled = _load_pickle(path, unsafe_load_ckpt) if is_pickle(path) else None
        if self._pickled is None:
            self._keys, self.metadata, self._shapes = _safetensors_header(path)
        else:
            self._keys, self.metadata = list(self._pickled), {}
            self._shapes = {k: tuple(v.shape) for k, v in self._pickled.items()}

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose key starts with `prefix` (keys kept whole)."""
        wanted = [k for k in self._keys if k.startswith(prefix)]
        if self._pickled is not None:
            return {k: self._pickled.pop(k) for k in wanted if k in self._pickled}
        from safetensors import safe_open

        with safe_open(self.path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in wanted}

    def stored_configs(self) -> dict | None:
        """Diffusers configs that sdtune's writer stored in the file, or None."""
        raw = (self.metadata or {}).get(CONFIG_METADATA_KEY)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise UserError(f"{self.path}: metadata {CONFIG_METADATA_KEY} is not valid JSON") from None


def _safetensors_header(path: str) -> tuple[list[str], dict, dict[str, tuple[int, ...]]]:
    """Keys, metadata and shapes of a safetensors file, read from its header only."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 200_000_000:
                raise ValueError("bad header size")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    return list(shapes), metadata, shapes


def detect_family_from_keys(path: str, keys: list[str], shape) -> str:
    """'sd1' | 'sd2' | 'sdxl' from an LDM-layout checkpoint's key names (and one tensor shape)."""
    if any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.")) for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"  # OpenCLIP text encoder
    to_k = next((k for k in keys if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise UserError(not_a_base_model(path, keys))
    context_dim = shape(to_k)[-1]
    if context_dim == 2048:
        return "sdxl"
    if context_dim == 1024:
        return "sd2"
    if context_dim == 768 or any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise UserError(f"{path}: unrecognised checkpoint (cross-attention width {context_dim})")


_NETWORK_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
_EMBEDDING_KEYS = ("emb_params", "string_to_param", "clip_l", "clip_g")
_VAE_KEYS = ("encoder.conv_in.weight", "first_stage_model.encoder.conv_in.weight", "decoder.conv_in.weight")


def not_a_base_model(path: str, keys: list[str]) -> str:
    """The one-line message for a file with no UNet: what it is instead, and where it belongs."""
    if any(k.startswith(_NETWORK_PREFIXES) for k in keys):
        return f"{path} is a LoRA (network) file, not a base model: pass it as --network_weights"
    if any(k in _VAE_KEYS for k in keys):
        return f"{path} is a VAE, not a base model: pass it as --vae"
    if any(k.split(".")[0] in _EMBEDDING_KEYS for k in keys):
        return f"{path} is an embedding (textual inversion), not a base model: load it with the prompt, not as a model"
    return (f"{path}: no Stable Diffusion UNet weights (model.diffusion_model.*); expected an SD 1.x, SD 2.x "
            "or SDXL checkpoint (.safetensors) or a diffusers folder")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def detect_family_from_folder(path: str) -> str:
    """'sd1' | 'sd2' | 'sdxl' from a diffusers folder's configs, without loading weights."""
    unet_config = os.path.join(path, "unet", "config.json")
    if not os.path.isfile(unet_config):
        raise UserError(f"{path}: not a diffusers model folder (no unet/config.json)")
    unet = _read_json(unet_config)
    index_path = os.path.join(path, "model_index.json")
    index = _read_json(index_path) if os.path.isfile(index_path) else {}
    if "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    context_dim = unet.get("cross_attention_dim")
    if context_dim == 2048:
        return "sdxl"
    if context_dim == 1024:
        return "sd2"
    text_config = os.path.join(path, "text_encoder", "config.json")
    hidden_act = _read_json(text_config).get("hidden_act") if os.path.isfile(text_config) else None
    # CLIP-L (SD 1.x) uses quick_gelu, OpenCLIP-H (SD 2.x) gelu: this tells small test models apart too.
    if context_dim == 768 or hidden_act == "quick_gelu":
        return "sd1"
    if hidden_act == "gelu":
        return "sd2"
    raise UserError(f"{path}: unrecognised diffusers model (cross_attention_dim {context_dim})")


def detect_family(path: str, unsafe_load_ckpt: bool = False) -> str:
    """The model family of a local single file or diffusers folder, read without a full load."""
    check_local_path(path)
    if os.path.isdir(path):
        return detect_family_from_folder(path)
    if is_pickle(path):
        reader = CheckpointReader(path, unsafe_load_ckpt)
        return detect_family_from_keys(path, reader.keys(), reader.shape)
    if not path.lower().endswith(SAFETENSORS_EXT):
        raise UserError(f"{path}: unsupported model file type; use .safetensors or a diffusers folder")
    keys, _, shapes = _safetensors_header(path)
    return detect_family_from_keys(path, keys, shapes.__getitem__)


_FAMILY_LABELS = {"sd1": "an SD 1.x", "sd2": "an SD 2.x", "sdxl": "an SDXL"}


def check_family_flags(path: str, family: str, v2: bool = False, sdxl: bool = False, flag: str = "model") -> None:
    """kohya's --v2 / --sdxl tell a tool the family; sdtune reads it from the file. A flag that says
    otherwise is a UserError (the tools need neither flag)."""
    wanted = "sdxl" if sdxl else "sd2" if v2 else None
    if v2 and sdxl:
        raise UserError("--v2 and --sdxl: give at most one (sdtune detects the model family itself)")
    if wanted is not None and wanted != family:
        given = "--sdxl" if sdxl else "--v2"
        raise UserError(f"{flag} {path} is {_FAMILY_LABELS[family]} model, but {given} was given; "
                        f"drop {given} (sdtune detects the model family itself)")


def folder_prediction_type(path: str) -> str | None:
    """The prediction_type a diffusers folder's scheduler config states, or None (a single file, or a
    folder without a readable scheduler config)."""
    config = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isdir(path) or not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("prediction_type")
    except (OSError, json.JSONDecodeError):
        return None  # the scheduler config is not needed for training: decide as for a single file


def load_subfolder(loader, path: str, subfolder: str):
    """`loader.from_pretrained` of one component of a local diffusers folder; UserError naming the folder."""
    try:
        with _no_transformers_progress_bar():
            return loader.from_pretrained(path, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load {subfolder}/ ({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def _no_transformers_progress_bar():
    """transformers 5 draws a progress bar per model load; a tiny load then litters stderr, which
    should hold nothing but a one-line error when something goes wrong."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
