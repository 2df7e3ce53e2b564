"""kohya's U-Net blocks: which LoRA layer sits in which block, per-block ranks and learning-rate weights.

kohya numbers the U-Net's blocks as the original (LDM) U-Net stacks them, whatever layout the model was
loaded in. SD 1.x / 2.x have 25 blocks; a LoRA layer's block follows from its name:

====  ==========  ================================================================================
 idx  name        layers (diffusers paths)
====  ==========  ================================================================================
   0  IN00        conv_in: no LoRA layer
 1-2  IN01-IN02   down_blocks.0 resnets.0/1 and attentions.0/1
   3  IN03        down_blocks.0.downsamplers
 4-9  IN04-IN09   the same for down_blocks.1 (4, 5, sampler 6) and down_blocks.2 (7, 8, sampler 9)
10-11 IN10-IN11   down_blocks.3 resnets.0/1
  12  MID         mid_block (resnets and attention)
13-15 OUT00-OUT02 up_blocks.0 resnets.0/1/2; its upsampler belongs to OUT02
16-24 OUT03-OUT11 up_blocks.1-3 resnets and attentions j -> 13 + 3 i + j, upsamplers with the third
====  ==========  ================================================================================

In an SD1.5 LoRA the attention layers sit in IN01, IN02, IN04, IN05, IN07, IN08, MID and OUT03-OUT11;
resnets and samplers (LoCon) fill the others. SDXL files name U-Net layers in the LDM layout
(``input_blocks_N``, ``middle_block_N``, ``output_blocks_N``): 23 blocks, 0 for the embeddings, 1-9
for input_blocks 0-8, 10-12 for middle_block 0-2, 13-21 for output_blocks 0-8, 22 for the output.

The learning-rate weights (``down_lr_weight``, ``mid_lr_weight``, ``up_lr_weight``) cover IN00-IN11,
MID and OUT00-OUT11 (SDXL: 9, 3 and 9 values, the embeddings and output keep weight 1).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Iterable

from library.errors import UserError
from networks.base import arg_number

logger = logging.getLogger(__name__)

_DIFFUSERS = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")
_LDM = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")
_LDM_FIRST = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}
# SDXL layers outside the numbered blocks (LyCORIS wraps them): the embeddings are block 0, the output 22.
_LDM_EDGE = {"lora_unet_time_embed_": 0, "lora_unet_label_emb_": 0, "lora_unet_out_": 22}

BLOCK_DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


@dataclass(frozen=True)
class Layout:
    """How many blocks a U-Net has, and how the learning-rate weight lists split them."""

    sdxl: bool

    @property
    def num_blocks(self) -> int:
        return 23 if self.sdxl else 25

    @property
    def num_updown(self) -> int:
        return 9 if self.sdxl else 12

    @property
    def num_mid(self) -> int:
        return 3 if self.sdxl else 1

    @property
    def names(self) -> str:
        return "BASE, IN00-IN08, MID00-MID02, OUT00-OUT08, OUT" if self.sdxl else "IN00-IN11, MID, OUT00-OUT11"


def layout_of(lora_names: Iterable[str]) -> Layout:
    """SDXL numbering when the U-Net layers are named in the LDM layout (kohya's SDXL files)."""
    return Layout(sdxl=any(_LDM.match(name) for name in lora_names))


def block_index(lora_name: str) -> int:
    """kohya's block number of a U-Net LoRA layer (see the module doc); -1 when it belongs to no block."""
    ldm = _LDM.match(lora_name)
    if ldm:
        return _LDM_FIRST[ldm.group(1)] + int(ldm.group(2))
    edge = next((index for prefix, index in _LDM_EDGE.items() if lora_name.startswith(prefix)), None)
    if edge is not None:
        return edge
    if "mid_block_" in lora_name:
        return 12
    match = _DIFFUSERS.search(lora_name)
    if not match:
        return -1
    side, level, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
    # A sampler closes its level: the third slot, where the original U-Net puts it.
    within = 3 * level + (2 if kind.endswith("samplers") else j)
    return 1 + within if side == "down" else 13 + within


# --- block_dims, block_alphas, conv_block_dims, conv_block_alphas -----------------------------------

def _number_list(key: str, text: str, kind: type, count: int, layout: Layout) -> list:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != count:
        raise UserError(f"--network_args {key}: expected {count} comma-separated values ({layout.names}), "
                        f"got {len(parts)}")
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        expected = "integers" if kind is int else "numbers"
        raise UserError(f"--network_args {key}={text}: expected {count} {expected} separated by commas") from None
    if min(values) < 0:
        raise UserError(f"--network_args {key}={text}: values must not be negative")
    return values


@dataclass
class BlockDims:
    """Rank and alpha per block, for Linear / 1x1 layers and for spatial convs (None: no LoCon)."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None

    @property
    def has_conv(self) -> bool:
        return bool(self.conv_dims) and max(self.conv_dims) > 0

    def dim_alpha(self, lora_name: str, spatial_conv: bool) -> tuple[int | None, float | None]:
        """The layer's rank and alpha; (None, None) for a conv when there is no LoCon."""
        index = block_index(lora_name)
        if index < 0:
            raise UserError(f"--network_args block-wise ranks: {lora_name} is in none of kohya's U-Net blocks "
                            "(a U-Net layout sdtune cannot number)")
        if spatial_conv:
            if self.conv_dims is None:
                return None, None
            return self.conv_dims[index], self.conv_alphas[index]
        return self.dims[index], self.alphas[index]

    def drop_untrained(self, lr_weights: list[float] | None) -> None:
        """Blocks whose learning-rate weight is 0 get no layers at all (kohya's rule)."""
        for i, weight in enumerate(lr_weights or []):
            if weight == 0:
                self.dims[i] = 0
                if self.conv_dims is not None:
                    self.conv_dims[i] = 0


def block_dims(kwargs: dict, layout: Layout, dim: int, alpha: float, conv_dim: int | None,
               conv_alpha: float | None, lr_weights: list[float] | None) -> BlockDims | None:
    """Per-block ranks from network_args, or None when no block-wise option is given.

    Unlike kohya, which reads block_alphas and conv_block_* only together with block_dims or the
    learning-rate weights, any of them switches block-wise ranks on: a key that is given is honoured.
    """
    if not any(kwargs.get(k) for k in BLOCK_DIM_KEYS) and lr_weights is None:
        return None
    n = layout.num_blocks

    def values(key, kind, default):
        text = kwargs.get(key)
        return _number_list(key, text, kind, n, layout) if text else [default] * n

    dims, alphas = values("block_dims", int, dim), values("block_alphas", float, alpha)
    conv_dims = conv_alphas = None
    if kwargs.get("conv_block_dims"):
        conv_dims = values("conv_block_dims", int, 0)
        conv_alphas = values("conv_block_alphas", float, conv_alpha or 1.0)
    elif conv_dim:
        conv_dims = [conv_dim] * n
        conv_alphas = values("conv_block_alphas", float, conv_alpha)
    elif kwargs.get("conv_block_alphas"):
        raise UserError("--network_args conv_block_alphas needs conv_block_dims or conv_dim")
    plan = BlockDims(dims, alphas, conv_dims, conv_alphas)
    plan.drop_untrained(lr_weights)
    return plan


# --- down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold ----------------------------

def preset_weights(text: str, count: int) -> list[float]:
    """kohya's named weight curves over `count` blocks, shallow to deep, plus an optional "+offset".

    sine rises from 0 to 1 as sin(pi/2 * i/(n-1)), cosine is sine reversed (1 down to 0), linear rises
    as i/(n-1), reverse_linear falls, zeros is 0 everywhere; "sine+0.5" adds 0.5 to each value.
    """
    name, _, offset_text = text.partition("+")
    name = name.strip()
    try:
        offset = float(offset_text) if offset_text.strip() else 0.0
    except ValueError:
        raise UserError(f"--network_args lr weight {text!r}: the part after '+' must be a number") from None
    steps = [i / (count - 1) for i in range(count)]
    curves = {
        "sine": [math.sin(math.pi / 2 * s) for s in steps],
        "cosine": [math.sin(math.pi / 2 * s) for s in reversed(steps)],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * count,
    }
    if name not in curves:
        raise UserError(f"--network_args lr weight {text!r}: give {count} numbers separated by commas or "
                        f"one of {', '.join(PRESETS)} (optionally +offset, e.g. sine+0.5)")
    return [v + offset for v in curves[name]]


def _weight_list(key: str, text: str, count: int, presets: bool) -> list[float]:
    """A list of `count` weights: a preset (down / up only) or numbers; empty entries are 0 (kohya)."""
    parts = [p.strip() for p in str(text).split(",")]
    if presets and len(parts) == 1 and parts[0][:1].isalpha():
        return preset_weights(parts[0], count)
    try:
        weights = [float(p) if p else 0.0 for p in parts]
    except ValueError:
        hint = f" or one of {', '.join(PRESETS)}" if presets else ""
        raise UserError(f"--network_args {key}={text}: expected numbers separated by commas{hint}") from None
    if len(weights) > count:
        logger.warning("--network_args %s: %d values, only the first %d are used", key, len(weights), count)
    elif len(weights) < count:
        logger.warning("--network_args %s: %d values, the last %d blocks get weight 1", key, len(weights),
                       count - len(weights))
    return (weights + [1.0] * count)[:count]


def block_lr_weights(kwargs: dict, layout: Layout) -> list[float] | None:
    """The learning-rate weight of every block (layout.num_blocks values), or None when none is given.

    Given weights at or below block_lr_zero_threshold (default 0) become 0: those blocks are not
    trained and get no LoRA layers.
    """
    given = {k: kwargs.get(k) for k in LR_WEIGHT_KEYS if kwargs.get(k)}
    threshold = arg_number(kwargs, "block_lr_zero_threshold", float, 0.0)
    if not given:
        if threshold:
            logger.warning("--network_args block_lr_zero_threshold does nothing without down/mid/up_lr_weight")
        return None
    weights: list[float] = []
    for key, count in (("down_lr_weight", layout.num_updown), ("mid_lr_weight", layout.num_mid),
                       ("up_lr_weight", layout.num_updown)):
        if key not in given:  # as in kohya, the threshold only reads the lists that were given
            weights += [1.0] * count
            continue
        part = _weight_list(key, given[key], count, presets=key != "mid_lr_weight")
        weights += [w if w > threshold else 0.0 for w in part]
    if layout.sdxl:  # the embeddings and the output layer have no weight of their own
        weights = [1.0] + weights + [1.0]
    logger.info("block learning-rate weights (%s): %s", layout.names, weights)
    return weights
