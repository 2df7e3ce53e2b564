"""DyLoRA in kohya's format (``--network_module networks.dylora``): one LoRA trained at every rank at once.

DyLoRA (Valipour et al., 2022, arXiv:2210.07558) orders a LoRA's ranks by importance, so that its first
``r`` ranks are a good LoRA of rank ``r`` for every ``r`` that is a multiple of ``unit``: a DyLoRA of
dim 16 and unit 4 holds LoRAs of rank 4, 8, 12 and 16. The file is an ordinary LoRA of rank ``dim``
(``lora_down`` / ``lora_up`` / ``alpha``, networks/lora.py), so every LoRA loader reads it; the smaller
ranks are cut out with tools/extract_lora_from_dylora.py.

Training: the ranks of each layer are kept in chunks of ``unit``. Each training forward of a layer draws
a chunk ``b`` (uniform over ``0 .. dim/unit - 1``, from torch's global RNG) and adds
``up[:, :r] @ down[:r] * alpha / r`` with ``r = (b + 1) * unit``: the chunks below ``b`` take part
frozen, chunk ``b`` learns, the chunks above are not used. Each chunk is its own parameter, so the
optimizer (momentum, weight decay) only moves the chunk that got a gradient. In eval mode (samples,
inference) all ranks run, with ``alpha / dim``, as a loader of the file runs them. The rank-``r`` cut
of a file, with the file's alpha kept (kohya's extractor keeps it), is then exactly the network that
was trained at rank ``r``.

Where kohya's networks/dylora.py differs, and why sdtune does not follow it:

- kohya adds *all* ranks in every training forward, scaled by ``alpha / dim * sqrt(dim / r)``; only
  the gradient is restricted to chunk ``b``. The lower-rank cuts are then never what the loss saw.
  sdtune uses the first ``r`` ranks and ``alpha / r``, as the paper (its equation 7) and LyCORIS do.
- kohya draws ``b`` with Python's ``random``; torch's RNG is saved and restored with training state
  and replayed by gradient checkpointing, so the recomputed forward uses the same ``b``.
- kohya silently ignores ``--network_dropout``, ``rank_dropout``, ``module_dropout`` and ``conv_alpha``,
  and requires ``conv_dim`` to equal ``--network_dim``; sdtune honours them and accepts any
  ``conv_dim`` that is a multiple of ``unit``.

``--network_args``: unit, conv_dim, conv_alpha, rank_dropout, module_dropout, loraplus_lr_ratio,
loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F

from library.errors import UserError
from networks.base import arg_number
from networks.lora import (LoRAModule, LoRANetwork, _network_options, _set_loraplus, dims_from_weights,
                           lora_delta, read_weights, rename_layers)
from networks.targets import unet_renames

logger = logging.getLogger(__name__)

NETWORK_ARGS = ("unit", "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "loraplus_lr_ratio",
                "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
DIM_ARGS = ("conv_dim", "conv_alpha")


class DyLoRAModule(LoRAModule):
    """A LoRA layer whose ranks are trained in chunks of `unit` (see the module doc).

    ``lora_down`` / ``lora_up`` are lists of chunks, shaped as slices of a LoRA's weights; the layer's
    state dict joins them into the usual ``lora_down.weight`` / ``lora_up.weight`` and loading splits them.
    """

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, unit: int = 1):
        if unit < 1 or int(lora_dim) % unit:
            raise UserError(f"DyLoRA: {lora_name} has rank {lora_dim}, not a multiple of --network_args unit={unit}")
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout)
        self.unit = unit
        # LoRA's initialisation (its bound depends on the input size only), split into chunks.
        down, up = self.lora_down.weight.detach(), self.lora_up.weight.detach()
        del self.lora_down, self.lora_up
        self.lora_down = torch.nn.ParameterList([c.clone() for c in down.split(unit, dim=0)])
        self.lora_up = torch.nn.ParameterList([c.clone() for c in up.split(unit, dim=1)])
        self.is_conv = isinstance(org_module, torch.nn.Conv2d)
        self.register_state_dict_post_hook(_join_chunks)
        self.register_load_state_dict_pre_hook(_split_chunks)

    @property
    def down_weight(self) -> torch.Tensor:
        return torch.cat(tuple(self.lora_down), dim=0)

    @property
    def up_weight(self) -> torch.Tensor:
        return torch.cat(tuple(self.lora_up), dim=1)

    def active_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) for this forward: every rank at inference; in training the first (b + 1) * unit
        ranks for a random chunk b, the ones below b detached so that only chunk b learns."""
        if not self.training:
            return self.down_weight, self.up_weight
        b = int(torch.randint(len(self.lora_down), (1,), device="cpu").item())
        downs, ups = list(self.lora_down), list(self.lora_up)  # (slicing a ParameterList builds a new module)
        down = torch.cat([c.detach() for c in downs[:b]] + [downs[b]], dim=0)
        up = torch.cat([c.detach() for c in ups[:b]] + [ups[b]], dim=1)
        return down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.org_forward(x)
        if self.module_dropout and self.training and torch.rand(1).item() < self.module_dropout:
            return base
        down, up = self.active_weights()
        if self.is_conv:
            org = self.org_module
            lx = F.conv2d(x, down, stride=org.stride, padding=org.padding)
        else:
            lx = F.linear(x, down)
        if self.dropout and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale * self.lora_dim / down.shape[0]  # alpha / r: the paper's scale at the rank in use
        if self.rank_dropout and self.training:
            lx = lx * self._rank_mask(lx)
            scale = scale / (1.0 - self.rank_dropout)
        change = F.conv2d(lx, up) if self.is_conv else F.linear(lx, up)
        return base + change * (self.multiplier * scale)

    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The full-rank weight change (as a loader applies the file), shaped like the wrapped weight."""
        multiplier = self.multiplier if multiplier is None else multiplier
        return lora_delta(self.up_weight, self.down_weight, self.scale * multiplier)


def _join_chunks(module: DyLoRAModule, state_dict: dict, prefix: str, _local_metadata) -> None:
    """State-dict hook: the chunk keys (`lora_down.0`, ...) become kohya's `lora_down.weight` / `lora_up.weight`."""
    for name, dim in (("lora_down", 0), ("lora_up", 1)):
        chunks = [state_dict.pop(f"{prefix}{name}.{i}") for i in range(len(getattr(module, name)))]
        state_dict[f"{prefix}{name}.weight"] = torch.cat(chunks, dim=dim).detach()


def _split_chunks(module: DyLoRAModule, state_dict: dict, prefix: str, *_args) -> None:
    """Load hook: kohya's `lora_down.weight` / `lora_up.weight` split into this layer's chunks."""
    for name, dim in (("lora_down", 0), ("lora_up", 1)):
        weight = state_dict.pop(f"{prefix}{name}.weight", None)
        if weight is None:
            continue
        for i, chunk in enumerate(weight.split(module.unit, dim=dim)):
            state_dict[f"{prefix}{name}.{i}"] = chunk


class DyLoRANetwork(LoRANetwork):
    """LoRANetwork with DyLoRA layers: naming, layer choice, saving, loading and merging are LoRA's."""

    module_class = DyLoRAModule

    def __init__(self, text_encoder, unet, unit: int = 1, **kwargs):
        super().__init__(text_encoder, unet, module_kwargs={"unit": unit}, **kwargs)
        self.unit = unit


def _unit(kwargs: dict, default: int = 1) -> int:
    unit = arg_number(kwargs, "unit", int, default)
    if unit < 1:
        raise UserError(f"--network_args unit={unit}: expected a positive integer (the rank step, e.g. 4)")
    return unit


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae,
                   text_encoder, unet, neuron_dropout: float | None = None, **kwargs) -> DyLoRANetwork:
    """kohya's factory: a fresh DyLoRA (with conv_dim also over the UNet's 3x3 convs)."""
    options = _network_options(kwargs, neuron_dropout, NETWORK_ARGS)
    unit = _unit(kwargs)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = arg_number(kwargs, "conv_dim", int) or None
    conv_alpha = arg_number(kwargs, "conv_alpha", float, 1.0)
    for name, dim in (("--network_dim", network_dim), ("--network_args conv_dim", conv_dim)):
        if dim is not None and (dim < 1 or dim % unit):
            raise UserError(f"{name} {dim}: must be a positive multiple of --network_args unit={unit}")
    logger.info("DyLoRA: dim %d, alpha %s, unit %d%s", network_dim, network_alpha, unit,
                f", conv_dim {conv_dim}, conv_alpha {conv_alpha}" if conv_dim else "")
    network = DyLoRANetwork(text_encoder, unet, unit=unit, multiplier=multiplier, lora_dim=network_dim,
                            alpha=network_alpha, conv_lora_dim=conv_dim, conv_alpha=conv_alpha if conv_dim else None,
                            **options)
    _set_loraplus(network, kwargs)
    return network


def file_unit(file: str | None) -> int | None:
    """The `unit` a DyLoRA file was trained with, from its ss_network_args metadata (None when unknown)."""
    if not file:
        return None
    from library.saving import read_safetensors_metadata

    try:
        args = json.loads(read_safetensors_metadata(file).get("ss_network_args") or "{}")
        return int(args["unit"]) if isinstance(args, dict) and "unit" in args else None
    except (ValueError, TypeError, OSError):
        return None


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet,
                                weights_sd: dict | None = None, for_inference: bool = False,
                                **kwargs) -> tuple[DyLoRANetwork, dict]:
    """kohya's factory: a DyLoRA shaped after a saved file (ranks, alphas, LoCon layers); weights are not
    loaded here. `unit` comes from --network_args, else from the file's metadata, else 1."""
    if weights_sd is None:
        weights_sd = read_weights(file)
    weights_sd = rename_layers(weights_sd, unet_renames(unet))
    options = _network_options(kwargs, None, NETWORK_ARGS)
    unit = _unit(kwargs, file_unit(file) or 1)
    ignored = [key for key in DIM_ARGS if kwargs.get(key)]
    if ignored:
        logger.warning("%s: ranks and alphas come from the file; --network_args %s ignored", file or "weights",
                       ", ".join(ignored))
    dims, alphas = dims_from_weights(weights_sd)
    for name, dim in dims.items():
        if dim % unit:
            raise UserError(f"{file or 'weights'}: {name} has rank {dim}, not a multiple of unit={unit}; "
                            "give the unit it was trained with (--network_args unit=N)")
    network = DyLoRANetwork(text_encoder, unet, unit=unit, multiplier=multiplier, modules_dim=dims,
                            modules_alpha=alphas, **options)
    _set_loraplus(network, kwargs)
    return network, weights_sd
