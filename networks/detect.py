"""What a network file holds (LoRA, LoCon, LoHa, LoKr, ...), read from its key names alone.

Every algorithm stores a layer's weights under names of its own: layer `lora_unet_..._proj_in` of a
LoHa file holds `.hada_w1_a`, of a LoKr file `.lokr_w1` or `.lokr_w1_a`, of a LoRA `.lora_up.weight`
(LyCORIS calls these telling names `weight_list_det`). `ALGORITHMS` is that table, with the network
modules able to load each algorithm, so a `--network_weights` file given to the wrong
`--network_module` is refused with the right one named, instead of loading nothing in silence.

LoRA, LoCon and DyLoRA files share their keys: LoCon is LoRA on 3x3 convolutions too, and DyLoRA is
saved as a plain LoRA; the `ss_network_module` / `ss_network_args` metadata that kohya's trainer (and
sdtune) writes tells DyLoRA apart.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import torch

from library.errors import UserError

SDTUNE_LORA_MODULES = ("networks.lora", "networks.dylora")
LYCORIS = "lycoris.kohya"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
LORA_KEYS = {"lora_up.weight", "lora_down.weight", "alpha"}  # what networks.lora and kohya's LoRA hold


@dataclass(frozen=True)
class Algorithm:
    """One row of the registry: how a layer of this algorithm is recognised and who can load it."""

    name: str
    markers: tuple[str, ...]  # a layer holding one of these keys uses this algorithm
    ranks: tuple[tuple[str, int], ...] = ()  # (key, axis) whose size is the rank; the first present counts
    lycoris_algos: tuple[str, ...] = ()  # lycoris.kohya `algo=` values that load it; the first is suggested
    sdtune_modules: tuple[str, ...] = ()  # sdtune's own modules that load it
    marker_ndim: int | None = None  # the marker's dimensions, where two algorithms share a key name
    prefix: str | None = None  # a layer-name prefix the algorithm requires
    size_name: str = "rank"  # what the size read by `ranks` is called (OFT: its block size)

    def matches(self, layer: str, keys: Mapping[str, tuple[int, ...]]) -> bool:
        if self.prefix is not None and not layer.startswith(self.prefix):
            return False
        return any(marker in keys and (self.marker_ndim is None or len(keys[marker]) == self.marker_ndim)
                   for marker in self.markers)

    def rank(self, keys: Mapping[str, tuple[int, ...]]) -> int | None:
        for key, axis in self.ranks:
            if key in keys and len(keys[key]) > abs(axis):
                return int(keys[key][axis])
        return None


# Order matters: the first row that matches a layer names its algorithm.
ALGORITHMS = (
    # sd-scripts' own OFT (networks.oft): `oft_unet_*` layers, which lycoris cannot load.
    Algorithm("oft", ("oft_blocks",), (("oft_blocks", -1),), prefix="oft_", size_name="block size"),
    Algorithm("boft", ("oft_blocks",), (("oft_blocks", -1),), ("boft",), marker_ndim=4, size_name="block size"),
    Algorithm("diag-oft", ("oft_blocks",), (("oft_blocks", -1),), ("diag-oft",), marker_ndim=3,
              size_name="block size"),
    Algorithm("loha", ("hada_w1_a",), (("hada_w1_b", 0),), ("loha",)),
    Algorithm("lokr", ("lokr_w1", "lokr_w1_a"), (("lokr_w1_a", 1), ("lokr_w2_a", 1)), ("lokr",)),
    Algorithm("ia3", ("on_input",), (), ("ia3",)),
    Algorithm("full", ("diff",), (), ("full",)),
    Algorithm("glora", ("a1.weight",), (("a1.weight", 1),), ("glora",)),
    Algorithm("norm", ("w_norm",), (), ()),  # lycoris' train_norm layers, beside another algorithm
    Algorithm("lora", ("lora_up.weight",), (("lora_down.weight", 0),), ("lora", "locon"), SDTUNE_LORA_MODULES),
)
BY_NAME = {algo.name: algo for algo in ALGORITHMS}


@dataclass(frozen=True)
class Detected:
    """What a file holds. `algo` is the main algorithm: lora, locon, dylora, loha, lokr, ia3, full, glora,
    diag-oft, boft, norm, oft, or unknown when no layer is recognised."""

    algo: str
    layers: dict[str, int]  # algorithm -> number of layers (a LyCORIS file may add norm layers)
    text_encoder_layers: int
    unet_layers: int
    ranks: tuple[int, ...]  # distinct ranks of the main algorithm's layers (convolutions apart)
    conv_ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    sdtune_modules: tuple[str, ...]  # sdtune modules that can load the file
    lycoris_algos: tuple[str, ...]  # lycoris.kohya algo= values that can load it
    written_by: str | None = None  # ss_network_module from the metadata
    unit: int | None = None  # DyLoRA's unit, from ss_network_args

    @property
    def module_hint(self) -> str:
        """The options that load this file, e.g. `--network_module lycoris.kohya --network_args algo=loha`."""
        if self.sdtune_modules:
            module = self.written_by if self.written_by in self.sdtune_modules else self.sdtune_modules[0]
            return f"--network_module {module}"
        if self.lycoris_algos:
            algo = self.algo if self.algo in self.lycoris_algos else self.lycoris_algos[0]
            extra = " train_norm=True" if self.layers.get("norm") and self.algo != "norm" else ""
            return f"--network_module {LYCORIS} --network_args algo={algo}{extra}"
        if self.algo == "norm":
            return f"--network_module {LYCORIS} --network_args train_norm=True"
        if self.algo == "oft":
            return "--network_module networks.oft (sd-scripts' OFT; not part of sdtune)"
        return "a network module that knows its keys"

    def summary(self) -> str:
        """One line, e.g. `loha network: 24 layers (8 text encoder, 16 U-Net), rank 4, conv rank 2, alpha 1`."""
        where = (f" ({self.text_encoder_layers} text encoder, {self.unet_layers} U-Net)"
                 if self.text_encoder_layers or self.unet_layers else "")
        count = sum(self.layers.values())
        parts = [f"{self.algo} network: {count} layer{'' if count == 1 else 's'}{where}"]
        size = BY_NAME.get(_base_name(self.algo), BY_NAME["lora"]).size_name
        if self.ranks:
            parts.append(f"{size} " + "/".join(map(str, self.ranks)))
        if self.conv_ranks:
            parts.append(f"conv {size} " + "/".join(map(str, self.conv_ranks)))
        if self.alphas:
            parts.append("alpha " + "/".join(f"{a:g}" for a in self.alphas))
        if self.unit:
            parts.append(f"unit {self.unit}")
        extras = [f"{count} {name}" for name, count in self.layers.items() if name != _base_name(self.algo)]
        if extras:
            parts.append("plus layers: " + ", ".join(extras))
        return ", ".join(parts)

    def loads_with(self, module: str, kwargs: Mapping[str, str], from_weights: bool = False) -> bool | None:
        """Whether `--network_module module` with `kwargs` loads this file; None when sdtune cannot tell
        (a module it does not know). `from_weights`: the network is shaped after the file
        (create_network_from_weights), so lycoris' `algo=` does not matter."""
        if module in SDTUNE_LORA_MODULES:
            return module in self.sdtune_modules
        if module.split(".")[0] == "lycoris":
            if from_weights:
                return bool(self.lycoris_algos) or self.algo == "norm"
            # a preset may map some layers to another algorithm: any algorithm of the file will do
            return any(lycoris_algo(kwargs) in BY_NAME[name].lycoris_algos for name in self.layers)
        return None


def _base_name(algo: str) -> str:
    """The registry row an algorithm name belongs to (LoCon and DyLoRA are LoRA rows)."""
    return "lora" if algo in ("locon", "dylora") else algo


def lycoris_algo(kwargs: Mapping[str, str]) -> str:
    """The algorithm lycoris.kohya builds for these `--network_args` (its default is lora)."""
    return (kwargs.get("algo") or "lora").lower()


def _shape(value) -> tuple[int, ...]:
    return tuple(int(n) for n in (value.shape if isinstance(value, torch.Tensor) else value))


def _layers(state_dict: Mapping) -> dict[str, dict[str, tuple[int, ...]]]:
    """Keys grouped by layer: {"lora_unet_x": {"lora_up.weight": shape, ...}}; keys without a dot are skipped."""
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in state_dict.items():
        layer, dot, rest = key.partition(".")
        if dot:
            layers.setdefault(layer, {})[rest] = _shape(value)
    return layers


def _network_args(metadata: Mapping[str, str]) -> dict:
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except (TypeError, ValueError):
        return {}
    return args if isinstance(args, dict) else {}


def _is_spatial_conv(keys: Mapping[str, tuple[int, ...]]) -> bool:
    """A LoRA layer on a convolution with a kernel larger than 1x1 (what makes a LoRA a LoCon)."""
    down = keys.get("lora_down.weight", ())
    return len(down) == 4 and tuple(down[2:]) != (1, 1) or "lora_mid.weight" in keys


def detect_algorithm(state_dict: Mapping, metadata: Mapping[str, str] | None = None) -> Detected:
    """The algorithm of a network state dict (tensors, or shapes as tuples) and its `ss_*` metadata.
    The main algorithm is the one most layers use (norm layers only ride along with another)."""
    metadata = metadata or {}
    written_by = metadata.get("ss_network_module")
    layers = _layers(state_dict)
    per_layer = {layer: algo for layer in layers
                 if (algo := next((a for a in ALGORITHMS if a.matches(layer, layers[layer])), None))}
    counts = Counter(algo.name for algo in per_layer.values())
    main = max((n for n in counts if n != "norm"), key=lambda n: counts[n], default="norm" if counts else None)
    if main is None:
        return Detected("unknown", {}, 0, 0, (), (), (), (), (), written_by)
    row = BY_NAME[main]
    own = {layer: layers[layer] for layer, algo in per_layer.items() if algo is row}
    ranks, conv_ranks, alphas = _sizes(row, own, state_dict)
    algo, sdtune_modules, unit = main, row.sdtune_modules, None
    if main == "lora":
        algo, unit = _lora_kind(own, written_by, _network_args(metadata))
        # DoRA scales, Tucker cores, layers of other algorithms: only lycoris loads the whole file
        if set(counts) != {"lora"} or any(set(keys) - LORA_KEYS for keys in own.values()):
            sdtune_modules = ()
    te_layers = sum(1 for layer in per_layer if layer.startswith(TEXT_ENCODER_PREFIXES))
    unet_layers = sum(1 for layer in per_layer if layer.startswith("lora_unet_"))
    return Detected(algo, dict(counts), te_layers, unet_layers, ranks, conv_ranks, alphas, sdtune_modules,
                    row.lycoris_algos, written_by, unit)


def _sizes(row: Algorithm, own: Mapping[str, Mapping], state_dict: Mapping) -> tuple[tuple, tuple, tuple]:
    """Distinct ranks of linear layers, of spatial convolutions, and distinct alphas (when given as tensors)."""
    ranks, conv_ranks, alphas = set(), set(), set()
    for layer, keys in own.items():
        rank = row.rank(keys)
        if rank is not None:
            (conv_ranks if _is_spatial_conv(keys) else ranks).add(rank)
        alpha = state_dict.get(f"{layer}.alpha")
        if isinstance(alpha, torch.Tensor):  # given as a shape, its value is unknown
            alphas.add(round(float(alpha.float().item()), 6))
    return tuple(sorted(ranks)), tuple(sorted(conv_ranks)), tuple(sorted(alphas))


def _lora_kind(own: Mapping[str, Mapping], written_by: str | None, args: dict) -> tuple[str, int | None]:
    """lora, locon (3x3 convolutions too) or dylora (only the metadata tells), and DyLoRA's unit."""
    if (written_by or "").endswith("dylora") or str(args.get("algo", "")).lower() == "dylora":
        return "dylora", _int_or_none(args.get("unit"))
    return ("locon" if any(_is_spatial_conv(keys) for keys in own.values()) else "lora"), None


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def describe_file(path: str) -> Detected:
    """What the network file at `path` holds. Only the header and the alphas are read, not the weights."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise UserError(f"{path}: only .safetensors files can be inspected (pickled files are not opened)")
    try:
        with safe_open(path, framework="pt") as f:
            entries = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            entries.update({key: f.get_tensor(key) for key in entries if key.endswith(".alpha")})
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    return detect_algorithm(entries, metadata)


def check_weights_module(path: str | None, module: str, kwargs: Mapping[str, str], flag: str = "--network_weights",
                         from_weights: bool = False) -> Detected | None:
    """A UserError when `--network_module module` (with `kwargs`) cannot load the network file `path`,
    naming what the file holds and the options that load it. Files that are missing or not .safetensors
    are left to the module's own loader (which reports them); so are modules sdtune does not know."""
    if not path or not os.path.isfile(path) or os.path.splitext(path)[1].lower() != ".safetensors":
        return None
    detected = describe_file(path)
    verdict = detected.loads_with(module, kwargs, from_weights)
    if verdict is None or verdict:
        return detected
    given = f"--network_module {module}"
    if module.split(".")[0] == "lycoris" and not from_weights:
        given += f" (algo={lycoris_algo(kwargs)})"
    if detected.algo == "unknown":
        raise UserError(f"{flag} {path}: holds no network layers sdtune recognises; {given} cannot load it")
    raise UserError(f"{flag} {path}: holds a {detected.summary()}; {given} cannot load it: use {detected.module_hint}")
