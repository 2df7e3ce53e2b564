"""sdtune's side of `--network_module lycoris.kohya` (the lycoris-lora package).

`adapt(module)` gives the trainer and the tools this module in place of `lycoris.kohya`: the same two
factories, building lycoris' own network and modules, with what lycoris-lora 4.1.3 gets wrong with
diffusers models and transformers 5 handled here:

- presets are class attributes in lycoris, applied by every factory call and kept afterwards; here each
  call applies one complete preset and puts the previous state back (`_preset_applied`). Built-in presets
  are fitted to the model: the default `full` names `time_embedding.linear_1` / `_2` *and* the class of the
  block holding them (`TimestepEmbedding`), which lycoris wraps twice and then rejects ("duplicated lora
  name"); kohya's `CrossAttention` class is called `Attention` in diffusers (`attn-only` found nothing);
- under transformers 5 `CLIPTextModel` lost its `text_model` level, so lycoris names text-encoder layers
  `lora_te_encoder_layers_0_...`; files here use kohya's / A1111's `lora_te_text_model_encoder_layers_0_...`,
  and files written with the short names load too;
- lycoris names U-Net layers by the diffusers path; kohya names SDXL's by the original (LDM) layout
  (`lora_unet_input_blocks_4_1_...`, networks/targets.py), so SDXL layers are renamed to those names
  the same way, and SDXL files lycoris wrote with diffusers paths load too;
- `merge_to` (also `--base_weights`): lycoris merges every layer at multiplier 1 whatever was asked, and
  LoHa / LoKr with alpha/dim applied twice; here each layer merges at its multiplier, exactly as it runs;
- lycoris' own loader cannot rebuild IA3 layers (a TypeError) and ignores `train_on_input`; a `full` layer
  adds a loaded file to its current weight (loading twice doubled it);
- target names in presets match from a module path's start, so the `ia3` preset's `to_k` / `k_proj` found
  nothing; names that only end paths become suffix patterns;
- `network_args` are checked (unknown keys, numbers, booleans: lycoris reads "False" given to `decompose_both`
  as true, "0" as true everywhere), and `algo=dylora` is refused (see `REFUSED_ALGOS`).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import logging
import os
import re
import sys
from types import ModuleType

import torch

import lycoris.kohya as lycoris_kohya
from library.errors import UserError, not_supported
from lycoris.config import PRESET
from lycoris.modules import get_module, make_module
from lycoris.modules.base import LycorisBaseModule
from lycoris.modules.full import FullModule
from lycoris.modules.ia3 import IA3Module
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from lycoris.utils.preset import read_preset
from lycoris.wrapper import network_module_dict
from networks.base import arg_number, check_weights_fit
from networks.lora import read_weights
from networks.targets import TEXT_ENCODER_ROOT, lora_name, text_encoder_list, unet_renames

logger = logging.getLogger(__name__)

KohyaNetwork = lycoris_kohya.LycorisNetworkKohya

# network_args lycoris.kohya reads, by kind. Values arrive as strings from the command line or TOML.
INT_ARGS = ("conv_dim", "block_size", "factor")
FLOAT_ARGS = ("conv_alpha", "dropout", "rank_dropout", "module_dropout", "constraint", "loraplus_lr_ratio",
              "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
BOOL_ARGS = ("use_tucker", "use_scalar", "train_norm", "rescaled", "dora_wd", "wd_on_output", "full_matrix",
             "bypass_mode", "rs_lora", "unbalanced_factorization", "decompose_both", "train_t5xxl",
             "train_llm_adapter")
# Older spellings lycoris still accepts: name -> (current name, whether the meaning is inverted).
ALIASES = {"use_cp": ("use_tucker", False), "use_conv_cp": ("use_tucker", False),
           "disable_conv_cp": ("use_tucker", True), "constrain": ("constraint", False)}
KNOWN_ARGS = ("algo", "preset") + INT_ARGS + FLOAT_ARGS + BOOL_ARGS + tuple(ALIASES)
DROPOUT_ARGS = ("dropout", "rank_dropout", "module_dropout")

REFUSED_ALGOS = {
    "dylora": "lycoris-lora 4.1.3's DyLoRA draws a random rank at every forward pass, also outside training, "
              "and cannot load its own files; use --network_module networks.dylora",
    "tlora": "T-LoRA needs a timestep mask that its own training loop sets at every step",
}
ALGOS = tuple(sorted(a for a in network_module_dict if a not in REFUSED_ALGOS))

# What lycoris' class attributes hold before any preset is applied (its `full` preset, no maps).
BASE_PRESET = {**PRESET["full"], "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False,
               "exclude_name": []}
# kohya's U-Net class names that diffusers spells differently.
DIFFUSERS_CLASSES = {"CrossAttention": "Attention"}
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def adapt(module: ModuleType) -> ModuleType:
    """The plug-in module to use for `module`: this one for `lycoris.kohya`, others unchanged."""
    return sys.modules[__name__] if module.__name__ == "lycoris.kohya" else module


# --- network_args ------------------------------------------------------------------------------------

def checked_args(kwargs: dict, neuron_dropout: float | None = None) -> dict:
    """`--network_args` as typed values lycoris reads right; a UserError for an unknown key or a bad value.

    `--network_dropout` becomes `dropout` unless that is given, as kohya's trainer does for LyCORIS.
    """
    args: dict = {}
    for key, value in kwargs.items():
        if key not in KNOWN_ARGS:
            close = difflib.get_close_matches(key, KNOWN_ARGS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"--network_args: unknown key {key!r} for lycoris.kohya{hint}; "
                            f"valid keys: {', '.join(KNOWN_ARGS)}")
        name, inverted = ALIASES.get(key, (key, False))
        args[name] = _typed(name, key, value, inverted)
    if neuron_dropout is not None and args.get("dropout") is None:
        args["dropout"] = float(neuron_dropout)
    for key in DROPOUT_ARGS:
        if args.get(key) is not None and not 0.0 <= args[key] < 1.0:
            raise UserError(f"--network_args {key}={args[key]}: expected a probability in [0, 1)")
    algo = str(args.get("algo") or "lora").lower()
    if algo in REFUSED_ALGOS:
        raise UserError(f"--network_args algo={algo}: not supported with lycoris.kohya: {REFUSED_ALGOS[algo]}")
    if algo not in ALGOS:
        raise UserError(f"--network_args algo={algo}: unknown LyCORIS algorithm; valid: {', '.join(ALGOS)}")
    args["algo"] = algo
    return {k: v for k, v in args.items() if v is not None}


def _typed(name: str, key: str, value, inverted: bool):
    """One network_args value converted for lycoris (None when empty or 'none')."""
    if name in INT_ARGS:
        return arg_number({key: value}, key, int)
    if name in FLOAT_ARGS:
        return arg_number({key: value}, key, float)
    if name in BOOL_ARGS:
        word = str(value).strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise UserError(f"--network_args {key}={value}: expected true or false")
        return (word in TRUE_WORDS) != inverted
    return value


# --- presets -----------------------------------------------------------------------------------------

def resolve_preset(value: str | None, text_encoder, unet) -> dict:
    """The complete preset lycoris should apply for `preset=value` (a built-in name or a TOML file), fitted
    to these models (see the module docstring)."""
    value = value or "full"
    if value in PRESET:
        preset = PRESET[value]
    elif os.path.isfile(value):
        preset = read_preset(value)
        if preset is None:
            raise UserError(f"--network_args preset={value}: not a valid LyCORIS preset file")
    else:
        raise UserError(f"--network_args preset={value}: neither a preset ({', '.join(PRESET)}) nor a file")
    preset = {**BASE_PRESET, **preset}
    preset["unet_target_module"] = _diffusers_classes(preset["unet_target_module"], unet)
    parts = {"unet": text_encoder_list(unet), "text_encoder": text_encoder_list(text_encoder)}
    paths = {part: [p for m in models for p, _ in m.named_modules() if p] for part, models in parts.items()}
    suffix = functools.partial(_as_suffix, use_fnmatch=preset["use_fnmatch"])
    preset["name_algo_map"] = {suffix(k, paths["unet"] + paths["text_encoder"]): v
                               for k, v in preset["name_algo_map"].items()}
    for part, models in parts.items():
        key = f"{part}_target_name"
        names = [suffix(name, paths[part]) for name in preset[key]]
        classes = preset[f"{part}_target_module"]
        preset[key] = [n for n in names if not models or any(
            _reaches_unwrapped(m, classes, n, _matcher(preset)) for m in models)]
    return preset


def _matcher(preset: dict):
    """lycoris' rule for target names: fnmatch, or a regular expression matched from the path's start."""
    return fnmatch.fnmatch if preset["use_fnmatch"] else re.match


def _as_suffix(name: str, paths: list[str], use_fnmatch: bool) -> str:
    """lycoris matches target names from the start of a module path, so a name such as `to_k` (its ia3
    preset) finds nothing in a model whose layers sit deeper; then it becomes a pattern for every path
    ending in it."""
    match = fnmatch.fnmatch if use_fnmatch else re.match
    if any(p == name or match(name, p) for p in paths) or not any(p.endswith("." + name) for p in paths):
        return name
    return "*." + name if use_fnmatch else rf"(?:.*\.)?{re.escape(name)}$"


def _diffusers_classes(classes: list[str], unet) -> list[str]:
    """`classes` plus diffusers' spelling of kohya's U-Net classes among them, when `unet` uses it."""
    present = {type(m).__name__ for m in unet.modules()} if unet is not None else set()
    extra = [DIFFUSERS_CLASSES[c] for c in classes if DIFFUSERS_CLASSES.get(c) in present]
    return list(classes) + [c for c in extra if c not in classes]


def _reaches_unwrapped(model: torch.nn.Module, classes, name: str, match) -> bool:
    """Whether target `name` reaches a layer of `model` outside every targeted block (or nothing at all):
    lycoris wraps a block's layers, then the named ones again, and stops at the duplicate."""
    covered = set()
    for path, module in model.named_modules():
        if type(module).__name__ in classes:
            covered.update(".".join(p for p in (path, sub) if p) for sub, _ in module.named_modules())
    hits = [p for p, _ in model.named_modules() if p and (p == name or match(name, p))]
    return not hits or any(p not in covered for p in hits)


@contextlib.contextmanager
def _preset_applied(preset: dict):
    """Within the block lycoris builds networks with `preset` (its factories' own apply_preset call is
    turned off); afterwards its class attributes are as they were."""
    saved = {k: v for k, v in vars(KohyaNetwork).items() if k.isupper()}
    apply = vars(KohyaNetwork)["apply_preset"]
    apply.__func__(KohyaNetwork, preset)
    KohyaNetwork.apply_preset = classmethod(lambda cls, _preset: cls)
    try:
        yield
    finally:
        KohyaNetwork.apply_preset = apply
        for key, value in saved.items():
            setattr(KohyaNetwork, key, value)


# --- names ---------------------------------------------------------------------------------------------

def text_encoder_renames(text_encoder) -> dict[str, str]:
    """lycoris' name -> kohya's name for text-encoder layers that differ: a `CLIPTextModel` without its
    `text_model` level (transformers 5) has its paths rooted as in transformers 4 (networks/targets.py)."""
    encoders = text_encoder_list(text_encoder)
    # lycoris numbers the encoders whenever it is handed a list, as kohya does.
    prefixes = [f"{KohyaNetwork.LORA_PREFIX_TEXT_ENCODER}{i + 1}" for i in range(len(encoders))] \
        if isinstance(text_encoder, (list, tuple)) else [KohyaNetwork.LORA_PREFIX_TEXT_ENCODER]
    renames = {}
    for prefix, encoder in zip(prefixes, encoders):
        if hasattr(encoder, TEXT_ENCODER_ROOT.rstrip(".")):
            continue
        for path, _ in encoder.named_modules():
            if path:
                renames[lora_name(prefix, path)] = lora_name(prefix, TEXT_ENCODER_ROOT + path)
    return renames


def kohya_renames(text_encoder, unet) -> dict[str, str]:
    """lycoris' name -> kohya's name, for every layer where they differ (text encoders, SDXL's U-Net)."""
    return {**text_encoder_renames(text_encoder), **unet_renames(unet)}


def kohya_keys(weights_sd: dict, renames: dict[str, str]) -> dict:
    """`weights_sd` with lycoris' own names (short text-encoder names under transformers 5, SDXL U-Net layers
    by diffusers path) renamed to kohya's."""
    out = {}
    for key, value in weights_sd.items():
        name, dot, rest = key.partition(".")
        out[renames.get(name, name) + dot + rest] = value
    return out


def _model_layers(text_encoder, unet, renames: dict[str, str]) -> dict[str, torch.nn.Module]:
    """kohya name -> module for every module of the models (what a file's layer names refer to)."""
    layers = {}
    for path, module in unet.named_modules() if unet is not None else ():
        if path:
            name = lora_name(KohyaNetwork.LORA_PREFIX_UNET, path)
            layers[renames.get(name, name)] = module
    encoders = text_encoder_list(text_encoder)
    for i, encoder in enumerate(encoders):
        prefix = KohyaNetwork.LORA_PREFIX_TEXT_ENCODER + (str(i + 1) if isinstance(text_encoder, (list, tuple))
                                                          else "")
        for path, module in encoder.named_modules():
            if path:
                name = lora_name(prefix, path)
                layers[renames.get(name, name)] = module
    return layers


# --- factories -----------------------------------------------------------------------------------------

def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None,
                   **kwargs) -> "LycorisNetwork":
    """lycoris' kohya factory with checked arguments and a preset fitted to the models."""
    args = checked_args(kwargs, neuron_dropout)
    preset = resolve_preset(args.pop("preset", None), text_encoder, unet)
    with _preset_applied(preset):
        network = lycoris_kohya.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                               **args)
    return LycorisNetwork.adopt(network, text_encoder, unet)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs) -> tuple["LycorisNetwork", dict]:
    """A network holding the layers of a LyCORIS file (any algorithm per layer, shapes from the file), as
    lycoris' own loader builds it; the weights are in the layers already. Returns it and the state dict
    (with kohya's names)."""
    checked_args(kwargs)
    source = file or "network weights"
    renames = kohya_renames(text_encoder, unet)
    weights_sd = kohya_keys(read_weights(file) if weights_sd is None else weights_sd, renames)
    layers = _model_layers(text_encoder, unet, renames)
    names = list(dict.fromkeys(key.split(".")[0] for key in weights_sd if "." in key))
    unknown = [name for name in names if name not in layers]
    if len(unknown) == len(names):
        raise UserError(f"{source}: none of its layers belong to this model (a network for another model?)")
    if unknown:
        logger.warning("%s: %d layers not in this model are ignored (first: %s)", source, len(unknown), unknown[0])
    with _preset_applied({**BASE_PRESET, "unet_target_module": [], "unet_target_name": [],
                          "text_encoder_target_module": [], "text_encoder_target_name": []}):
        network = LycorisNetwork(text_encoder, unet, multiplier=multiplier, warn_on_unmatched=False)
    network.renames = renames
    loras = [_module_from_weights(source, weights_sd, name, layers[name]) for name in names if name in layers]
    for lora in loras:
        lora.multiplier = multiplier
    network.text_encoder_loras = [lo for lo in loras if lo.lora_name.startswith(KohyaNetwork.LORA_PREFIX_TEXT_ENCODER)]
    network.unet_loras = [lo for lo in loras if lo.lora_name.startswith(KohyaNetwork.LORA_PREFIX_UNET)]
    network.loras = network.text_encoder_loras + network.unet_loras
    return network, weights_sd


@torch.no_grad()
def _module_from_weights(source: str, weights_sd: dict, name: str, module: torch.nn.Module) -> LycorisBaseModule:
    """The lycoris layer for `name`, of the algorithm its keys show, holding the file's values."""
    algo, params = get_module(weights_sd, name)
    if algo is None:
        raise UserError(f"{source}: {name}: its keys match no LyCORIS algorithm")
    if algo is IA3Module:
        # lycoris passes both saved tensors to a method that takes one, and drops `on_input`.
        weight, on_input = params
        lora = IA3Module(name, module, 1.0, train_on_input=bool(on_input is not None and on_input.item()))
        lora.weight.copy_(weight)
        return lora
    try:
        lora = make_module(algo, params, name, module)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise UserError(f"{source}: {name}: cannot rebuild its {algo.__name__} layer ({exc})") from None
    if lora is None:
        raise UserError(f"{source}: {name}: lycoris cannot rebuild a {algo.__name__} layer from a file")
    return lora


# --- the network ------------------------------------------------------------------------------------------

class LycorisNetwork(KohyaNetwork):
    """lycoris' kohya network with sdtune's loading, saving and merging. lycoris' factory builds its own
    class, so `adopt` turns that object into this subclass (which adds methods, no state of its own but
    the renames to kohya's names)."""

    renames: dict[str, str] = {}

    @classmethod
    def adopt(cls, network: KohyaNetwork, text_encoder, unet=None) -> "LycorisNetwork":
        """`network` as this class, its layers named as kohya names them (before apply_to registers them)."""
        network.__class__ = cls
        network.renames = kohya_renames(text_encoder, unet)
        for lora in network.text_encoder_loras + network.unet_loras:
            lora.lora_name = network.renames.get(lora.lora_name, lora.lora_name)
        return network

    def load_weights(self, file: str) -> dict:
        """Load a saved file into the applied layers; a UserError when the file does not fit them."""
        weights_sd = kohya_keys(read_weights(file), self.renames)
        self._check_algorithms(file, weights_sd)
        check_weights_fit(file, weights_sd, self.state_dict(), "give the network_args the file was trained "
                          "with (algo, conv_dim, factor, ...) or use --dim_from_weights")
        _reset_full_layers(self.loras)
        missing, unexpected = self.load_state_dict(weights_sd, strict=False)
        info = {}
        if missing:
            info["missing keys"] = missing
        if unexpected:
            info["unexpected keys"] = unexpected
        return info

    def _check_algorithms(self, file: str, weights_sd: dict) -> None:
        """A UserError when a layer of the file holds another algorithm than this network's layer."""
        for lora in self.loras:
            algo, _ = get_module(weights_sd, lora.lora_name)
            if algo is not None and not isinstance(lora, algo):
                raise UserError(f"{file}: {lora.lora_name} holds a {algo.__name__} layer, this network has "
                                f"{type(lora).__name__}; give the network_args the file was trained with (algo)")

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """Write the layers as .safetensors atomically, with kohya's sshs_* hashes added to `metadata`."""
        from library.saving import add_model_hashes, save_safetensors

        if os.path.splitext(file)[1].lower() != ".safetensors":
            raise not_supported("save_model_as (only safetensors for networks)")
        tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        save_safetensors(tensors, file, add_model_hashes(tensors, metadata))

    @torch.no_grad()
    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """Bake each layer into its model weight at the layer's multiplier, giving what the layer computes."""
        for lora in self.text_encoder_loras + self.unet_loras:
            if isinstance(lora, (LohaModule, LokrModule)):
                _merge_rebuilt(lora)
            else:
                lora.merge_to(lora.multiplier)

    @property
    def apply_max_norm_regularization(self):
        """--scale_weight_norms, or None (the trainer refuses the option) when no layer of this algorithm
        has a max norm in lycoris (IA3, full, GLoRA): lycoris would skip them all without a word."""
        if not any(type(lora).apply_max_norm is not LycorisBaseModule.apply_max_norm for lora in self.loras):
            return None
        return self._max_norm

    def _max_norm(self, max_norm_value: float, device) -> tuple[int, float, float]:
        scaled, mean, top = KohyaNetwork.apply_max_norm_regularization(self, max_norm_value, device)
        return int(scaled), float(mean), float(top)


@torch.no_grad()
def _reset_full_layers(loras) -> None:
    """`full` layers load a file's difference onto their current weight: start from the original, so that
    loading twice (or after training) gives the file's weights, not the sum."""
    for lora in loras:
        if isinstance(lora, FullModule) and not lora.is_diff:
            lora.weight.copy_(lora.org_weight.to(lora.weight))
            if lora.bias is not None and lora.org_bias is not None:
                lora.bias.copy_(lora.org_bias[0].to(lora.bias))


def _merge_rebuilt(lora) -> None:
    """LoHa / LoKr: the weight their forward builds (lycoris' get_diff_weight scales by alpha/dim again)."""
    weight = lora.org_module[0].weight
    base = weight.detach().float()
    diff = lora.get_weight(lora.shape).float().to(base.device) * lora.scalar.float().to(base.device)
    if lora.wd:
        merged = lora.apply_weight_decompose(base + diff, lora.multiplier)
    else:
        merged = base + diff * lora.multiplier
    weight.copy_(merged.reshape(weight.shape).to(weight.dtype))
