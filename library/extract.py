"""Extract a LoRA from two models: the low-rank approximation of ``tuned - original`` per LoRA layer.

For every layer kohya's LoRA wraps (networks/targets.py; with ``conv_dim`` also the U-Net's resnets and
samplers, LoCon), the weight difference is flattened to a matrix (out, in * k * k) and approximated at
rank ``dim`` (``conv_dim`` for 3x3 convs): ``up = U * S``, ``down = Vh`` of its truncated SVD. As kohya
does, both factors are then clamped to the ``clamp_quantile`` quantile of their joined values, alpha is
the layer's rank (so the scale alpha / rank is 1), and the text encoder is left out when no weight of
it moved more than ``min_diff``.

The truncated SVD is randomized (``torch.svd_lowrank``, Halko et al.) rather than kohya's full
``torch.linalg.svd``: it costs about ``rank + 10`` matrix passes instead of a full decomposition, and a
difference of rank <= ``dim`` is recovered exactly. ``full_svd`` uses kohya's full decomposition. The
random sketch is seeded, so the same inputs give the same file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OVERSAMPLE = 10  # extra sketch columns of the randomized SVD: its error shrinks fast with them
POWER_ITERATIONS = 2  # subspace iterations; sharpen the sketch when the spectrum decays slowly
SKETCH_SEED = 0


@dataclass
class ExtractSettings:
    """kohya's flags of extract_lora_from_models.py that shape the result."""

    dim: int = 4
    conv_dim: int | None = None
    clamp_quantile: float = 0.99
    min_diff: float = 0.01
    device: str | None = None
    full_svd: bool = False

    def check(self) -> None:
        """UserError for values kohya's math cannot use; called before any model is loaded."""
        if self.dim < 1:
            raise UserError(f"--dim {self.dim}: give the LoRA rank, a positive integer")
        if self.conv_dim is not None and self.conv_dim < 0:
            raise UserError(f"--conv_dim {self.conv_dim}: give the rank of the 3x3 convs, a positive integer")
        if not 0.0 < self.clamp_quantile <= 1.0:
            raise UserError(f"--clamp_quantile {self.clamp_quantile}: give a quantile in (0, 1]; 1 clamps nothing")
        if self.min_diff < 0:
            raise UserError(f"--min_diff {self.min_diff}: give a non-negative weight difference")
        try:
            torch.empty(0, device=self.device or "cpu")
        except (RuntimeError, AssertionError) as exc:
            raise UserError(f"--device {self.device}: not usable here ({str(exc).splitlines()[0]})") from None


def precision(flag: str, value: str | None) -> torch.dtype | None:
    """The dtype of a --load_precision / --save_precision value (None keeps the stored one)."""
    if value is None:
        return None
    if value not in PRECISIONS:
        raise UserError(f"{flag} {value}: give one of {', '.join(PRECISIONS)}")
    return PRECISIONS[value]


def model_family(path: str, flag: str, v2: bool = False, sdxl: bool = False) -> str:
    """The family of a single file or diffusers folder, from its keys / configs only (no load); kohya's
    --v2 / --sdxl are checked against it. UserError for a missing path or another kind of file."""
    from library.models import files

    files.check_local_path(path, flag)
    family = files.detect_family(path)
    files.check_family_flags(path, family, v2=v2, sdxl=sdxl, flag=flag)
    return family


def load_model(family: str, path: str, dtype: torch.dtype | None = None) -> tuple[list, torch.nn.Module]:
    """(text_encoders, unet) of the model at `path`, cast to `dtype` when given (kohya's --load_precision)."""
    from library.models import single_file

    logger.info("loading %s", path)
    if os.path.isdir(path):
        parts = single_file.load_folder(family, path, with_vae=False)
    else:
        parts = single_file.load_components(family, path, with_vae=False)
    text_encoders, unet = parts["text_encoders"], parts["unet"]
    if dtype is not None:
        for module in (*text_encoders, unet):
            for param in module.parameters():
                param.data = param.data.to(dtype)
    return text_encoders, unet


@dataclass(frozen=True)
class LayerPair:
    name: str
    org: torch.Tensor
    tuned: torch.Tensor
    is_unet: bool

    def diff(self, device: str | None = None) -> torch.Tensor:
        """tuned - original in float32 (on `device`), computed when needed so only one is held at a time."""
        return self.tuned.to(device or "cpu", torch.float32) - self.org.to(device or "cpu", torch.float32)


def paired_layers(org: tuple, tuned: tuple, with_conv: bool) -> list[LayerPair]:
    """The LoRA layers of both (text encoder(s), unet) pairs, matched by kohya name; UserError when they
    differ. Text encoders are a module or a list (SDXL: lora_te1_ / lora_te2_ names)."""
    from networks.targets import network_layers

    layers_o = network_layers(org[0], org[1], with_conv)
    layers_t = {layer.name: layer for layer in network_layers(tuned[0], tuned[1], with_conv)}
    pairs = []
    for layer in layers_o:
        twin = layers_t.get(layer.name)
        if twin is None or twin.module.weight.shape != layer.module.weight.shape:
            raise UserError(f"--model_tuned: layer {layer.name} is missing or shaped differently from "
                            "--model_org; both models must have the same architecture")
        pairs.append(LayerPair(layer.name, layer.module.weight.detach(), twin.module.weight.detach(),
                               layer.is_unet))
    return pairs


def text_encoder_changed(pairs: list[LayerPair], min_diff: float) -> bool:
    """kohya's test: some text encoder weight moved by more than min_diff."""
    for pair in pairs:
        if not pair.is_unet and float(pair.diff().abs().max()) > min_diff:
            logger.info("text encoder differs (%s moved by more than %g)", pair.name, min_diff)
            return True
    return False


def low_rank(mat: torch.Tensor, rank: int, full_svd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(U * S, Vh) of the best rank-`rank` approximation of a 2-D matrix, as kohya splits it."""
    small = min(mat.shape)
    sketch = min(rank + OVERSAMPLE, small)
    if full_svd or 2 * sketch >= small:  # a small matrix: the full SVD is cheaper than a sketch
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[mat.device] if mat.device.type == "cuda" else []):
            torch.manual_seed(SKETCH_SEED)
            u, s, v = torch.svd_lowrank(mat, q=sketch, niter=POWER_ITERATIONS)
        vh = v.T
    return u[:, :rank] * s[:rank], vh[:rank]


def clamp_factors(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's clamp: both factors into [-q, q], q the `quantile` of their joined (signed) values.

    A quantile of 1 clamps nothing (kohya would still cut negative values below minus the maximum).
    """
    if quantile >= 1.0:
        return up, down
    joined = torch.cat([up.flatten(), down.flatten()])
    if joined.numel() > 2**24:  # torch.quantile's size limit; a strided sample gives the same cut
        joined = joined[:: joined.numel() // 2**24 + 1]
    high = torch.quantile(joined, quantile)
    return up.clamp(-high, high), down.clamp(-high, high)


def extract_layer(diff: torch.Tensor, rank: int, settings: ExtractSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_up, lora_down) of one layer's weight difference, shaped as networks.lora saves them (on CPU)."""
    out_dim, in_dim = diff.shape[:2]
    rank = min(rank, out_dim, in_dim)  # kohya: a LoRA rank never exceeds the layer's own sizes
    up, down = low_rank(diff.flatten(1), rank, settings.full_svd)
    up, down = clamp_factors(up, down, settings.clamp_quantile)
    if diff.dim() == 4:
        up = up.reshape(out_dim, rank, 1, 1)
        down = down.reshape(rank, *diff.shape[1:])
    return up.cpu().contiguous(), down.cpu().contiguous()


def layer_rank(pair: LayerPair, settings: ExtractSettings) -> int:
    """conv_dim for 3x3 convs (LoCon), dim for everything else."""
    spatial = pair.org.dim() == 4 and tuple(pair.org.shape[2:]) != (1, 1)
    return settings.conv_dim if spatial and settings.conv_dim else settings.dim


def extract_state_dict(pairs: list[LayerPair], settings: ExtractSettings,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LoRA state dict (lora_up, lora_down, alpha = rank per layer) approximating every pair's difference."""
    from tqdm import tqdm

    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for pair in tqdm(pairs, desc="extracting", unit="layer"):
            up, down = extract_layer(pair.diff(settings.device), layer_rank(pair, settings), settings)
            state[pair.name + ".lora_up.weight"] = up.to(dtype or up.dtype)
            state[pair.name + ".lora_down.weight"] = down.to(dtype or down.dtype)
            state[pair.name + ".alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype or torch.float32)
    return state


def build_metadata(save_to: str, settings: ExtractSettings, v_prediction: bool, no_metadata: bool,
                   family: str = "sd1") -> dict[str, str]:
    """kohya's minimum ss_* keys for an extracted LoRA, plus the ModelSpec keys unless --no_metadata."""
    from library.metadata import FAMILIES, build_modelspec

    net_args = {}
    if settings.conv_dim:
        net_args = {"conv_dim": str(settings.conv_dim), "conv_alpha": str(float(settings.conv_dim))}
    metadata = {
        "ss_v2": str(FAMILIES[family].v2),
        "ss_base_model_version": FAMILIES[family].version(v_prediction),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings.dim),
        "ss_network_alpha": str(float(settings.dim)),
        "ss_network_args": json.dumps(net_args),
    }
    if not no_metadata:
        title = os.path.splitext(os.path.basename(save_to))[0]
        metadata.update(build_modelspec(SimpleNamespace(metadata_title=title), family_name=family,
                                        v_prediction=v_prediction, method="network", timestamp=time.time()))
    return metadata


def check_paths(model_org: str, model_tuned: str, save_to: str) -> None:
    """UserError for an output that is not .safetensors or would overwrite one of the models."""
    if os.path.splitext(save_to)[1].lower() != ".safetensors":
        raise UserError(f"--save_to {save_to}: give a file name ending in .safetensors")
    for flag, path in (("--model_org", model_org), ("--model_tuned", model_tuned)):
        if os.path.abspath(save_to) == os.path.abspath(path):
            raise UserError(f"--save_to {save_to} is {flag}: give another file name (the models are never overwritten)")


def extract(model_org: str, model_tuned: str, save_to: str, settings: ExtractSettings, *, v2: bool = False,
            sdxl: bool = False, v_parameterization: bool = False, load_precision: str | None = None,
            save_precision: str | None = None, no_metadata: bool = False) -> dict[str, torch.Tensor]:
    """Write the LoRA of `model_tuned - model_org` to `save_to` (atomically); returns its state dict."""
    from library.saving import add_model_hashes, save_safetensors

    settings.check()
    load_dtype = precision("--load_precision", load_precision)
    save_dtype = precision("--save_precision", save_precision)
    check_paths(model_org, model_tuned, save_to)
    family = model_family(model_org, "--model_org", v2, sdxl)
    if model_family(model_tuned, "--model_tuned", v2, sdxl) != family:
        raise UserError(f"--model_tuned {model_tuned} is not of the family of --model_org ({family}); "
                        "both models must have the same architecture")
    org = load_model(family, model_org, load_dtype)
    tuned = load_model(family, model_tuned, load_dtype)
    pairs = paired_layers(_encoders(org), _encoders(tuned), with_conv=bool(settings.conv_dim))
    if not text_encoder_changed(pairs, settings.min_diff):
        logger.warning("text encoder unchanged (no weight moved by more than --min_diff %g): U-Net only",
                       settings.min_diff)
        pairs = [pair for pair in pairs if pair.is_unet]
    state = extract_state_dict(pairs, settings, save_dtype)
    metadata = build_metadata(save_to, settings, v_parameterization, no_metadata, family)
    folder = os.path.dirname(os.path.abspath(save_to))
    os.makedirs(folder, exist_ok=True)
    save_safetensors(state, save_to, add_model_hashes(state, metadata))
    logger.info("wrote %s (%d layers)", save_to, len(pairs))
    return state


def _encoders(model: tuple) -> tuple:
    """(text encoder or list of them, unet): what networks.targets takes."""
    text_encoders, unet = model
    return (text_encoders[0] if len(text_encoders) == 1 else list(text_encoders)), unet
