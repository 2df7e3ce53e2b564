"""Change the rank of a LoRA / LoCon / DyLoRA file: the best low-rank approximation of every layer.

A layer's change is ``delta = up @ down * alpha / r`` with ``up`` (o, r) and ``down`` (r, n), where a
convolution's ``down`` (r, i, k, k) is flattened to n = i*k*k columns as kohya does. kohya's
networks/resize_lora.py multiplies the factors out into the o x n matrix and runs a full SVD on it. The
same singular values and vectors come from the factors alone: with ``up = Qu Ru`` and ``down^T = Qd Rd``
(thin QR), ``up @ down = Qu (Ru Rd^T) Qd^T``, so the SVD of the r x r core ``Ru Rd^T = Uc S Vc^T``
gives ``U = Qu Uc`` and ``V = Qd Vc``. The work is O((o + n) r^2) instead of O(o n min(o, n)), and
no o x n matrix is ever built. The singular values kohya also sees beyond r are zero.

The new rank per layer follows kohya's rules (`choose_rank`); the new alpha keeps the layer's scale
``alpha / rank``, so the resized file is used with the same multiplier.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

MIN_SV = 1e-6  # kohya: a layer whose largest singular value is this small is a zero layer, kept at rank 1
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
RESIZABLE = ("lora", "locon", "dylora")
SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def core_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(Qu, Uc, S, Vc^T, Qd) of the module docstring: ``up2 @ down2 == Qu Uc diag(S) Vc^T Qd^T``, with
    S of length min(o, r, n). Computed in float64: the cost is small, and the extra digits keep the
    retained fractions exact to far below what a report shows."""
    up2 = up.reshape(up.shape[0], -1).double()
    down2 = down.reshape(down.shape[0], -1).double()
    q_up, r_up = torch.linalg.qr(up2)  # (o, a), (a, r)
    q_down, r_down = torch.linalg.qr(down2.T)  # (n, b), (b, r)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up, u_core, s, vh_core, q_down


def factor_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (o, q), S (q,), Vh (q, n)) with ``U diag(S) Vh == up2 @ down2``, from the factors alone."""
    q_up, u_core, s, vh_core, q_down = core_svd(up, down)
    return q_up @ u_core, s, vh_core @ q_down.T


def _first_reaching(fractions: torch.Tensor, target: float) -> int:
    """Index of the first cumulative fraction >= target (torch.searchsorted, as kohya), clamped to the list."""
    index = int(torch.searchsorted(fractions, torch.tensor(target, dtype=fractions.dtype)))
    return max(0, min(index, len(fractions) - 1))


def dynamic_rank(s: torch.Tensor, method: str, param: float) -> int:
    """kohya's rank for `--dynamic_method`, from singular values `s` (descending):

    - sv_ratio: the number of values larger than ``s[0] / param`` (at least 1);
    - sv_cumulative: the smallest k whose ``sum(s[:k]) / sum(s)`` reaches param;
    - sv_fro: the smallest k whose retained Frobenius fraction ``sqrt(sum(s[:k]^2) / sum(s^2))`` reaches param.

    "Reaches" includes the value that crosses the target: kohya finds the first cumulative fraction that
    is >= the target and keeps that value too (index + 1), so the target is always met, never undershot.
    """
    if method == "sv_ratio":
        count = int(torch.sum(s > s[0] / param))
        return max(1, min(count, len(s)))
    if method == "sv_cumulative":
        return _first_reaching(torch.cumsum(s, 0) / torch.sum(s), param) + 1
    if method == "sv_fro":
        squares = s.pow(2)
        return _first_reaching(torch.cumsum(squares, 0) / torch.sum(squares), param ** 2) + 1
    raise ValueError(f"unknown dynamic method {method!r}")


def choose_rank(s: torch.Tensor, cap: int, method: str | None = None, param: float | None = None) -> int:
    """The new rank of a layer with singular values `s`: `cap` (--new_rank / --new_conv_rank), or the
    dynamic rank capped at it; 1 for a zero layer (kohya's rules). Never above the layer's true rank
    len(s): kohya would pad with directions of singular value 0, which change nothing but the file size."""
    if float(s[0]) <= MIN_SV:
        return 1
    rank = dynamic_rank(s, method, param) if method else cap
    return max(1, min(rank, cap, len(s)))


@dataclass
class ResizedLayer:
    """One layer's outcome; `fro_retained` and `sum_retained` are fractions of the layer's delta kept."""

    name: str
    old_rank: int
    new_rank: int
    alpha: float
    fro_retained: float
    sum_retained: float
    max_ratio: float  # s[0] / s[new_rank - 1]
    down: torch.Tensor
    up: torch.Tensor

    def report(self, dynamic: bool) -> str:
        line = (f"{self.name:75} | sum(S) retained: {self.sum_retained:.1%}, fro retained: "
                f"{self.fro_retained:.1%}, max(S) ratio: {self.max_ratio:0.1f}")
        return line + (f", dynamic | dim: {self.new_rank}, alpha: {self.alpha}" if dynamic else "")


def resize_layer(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float | None, cap: int,
                 method: str | None = None, param: float | None = None) -> ResizedLayer:
    """The best rank-k approximation of one layer (k from `choose_rank`), factored as kohya writes it:
    ``up = U[:, :k] diag(S[:k])``, ``down = Vh[:k]``, alpha = old scale * k."""
    old_rank = down.shape[0]
    if up.shape[1] != old_rank or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)) or up.dim() != down.dim():
        raise UserError(f"layer {name}: lora_up {tuple(up.shape)} does not fit lora_down {tuple(down.shape)}")
    scale = 1.0 if alpha is None else float(alpha) / old_rank
    q_up, u_core, s, vh_core, q_down = core_svd(up, down)
    k = choose_rank(s, cap, method, param)
    u, vh = q_up @ u_core[:, :k], vh_core[:k] @ q_down.T  # only the kept directions are formed
    total_sq, total = float(s.pow(2).sum()), float(s.sum())
    fro = math.sqrt(float(s[:k].pow(2).sum()) / total_sq) if total_sq > 0 else float("nan")
    kept_sum = float(s[:k].sum()) / total if total > 0 else float("nan")
    ratio = float(s[0] / s[k - 1]) if float(s[k - 1]) > 0 else float("inf")
    new_up = (u * s[:k]).float().reshape(up.shape[0], k, *up.shape[2:])
    new_down = vh.float().reshape(k, *down.shape[1:])
    return ResizedLayer(name, old_rank, k, float(scale * k), fro, kept_sum, ratio, new_down, new_up)


def lora_layers(state_dict: Mapping[str, torch.Tensor], path: str) -> list[str]:
    """Layer names of a LoRA state dict; UserError naming the first key that is not LoRA's or a half pair."""
    names = []
    for key in state_dict:
        if not key.endswith(LORA_SUFFIXES):
            raise UserError(f"--model {path}: key {key} is not a LoRA key (lora_down / lora_up / alpha); "
                            "only plain LoRA, LoCon and DyLoRA layers can be resized")
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            if f"{name}.lora_up.weight" not in state_dict:
                raise UserError(f"--model {path}: layer {name} has a lora_down but no lora_up")
            names.append(name)
    if not names:
        raise UserError(f"--model {path}: holds no LoRA layers")
    return names


def resize_state_dict(state_dict: Mapping[str, torch.Tensor], new_rank: int, new_conv_rank: int,
                      method: str | None = None, param: float | None = None, device: str = "cpu",
                      path: str = "", progress: bool = True) -> tuple[dict[str, torch.Tensor], list[ResizedLayer]]:
    """Every layer resized (4-D layers, convolutions of any kernel, capped by `new_conv_rank` as in
    kohya); keys that are not LoRA layers' are refused. Returns the new state dict (float32) and per-layer outcomes."""
    from tqdm import tqdm

    out: dict[str, torch.Tensor] = {}
    layers = []
    for name in tqdm(lora_layers(state_dict, path), desc="resizing", unit="layer", disable=not progress):
        down = state_dict[f"{name}.lora_down.weight"].to(device)
        up = state_dict[f"{name}.lora_up.weight"].to(device)
        alpha = state_dict.get(f"{name}.alpha")
        cap = new_conv_rank if down.dim() == 4 else new_rank
        layer = resize_layer(name, up, down, None if alpha is None else float(alpha), cap, method, param)
        out[f"{name}.lora_down.weight"] = layer.down.cpu().contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(layer.alpha)
        layers.append(layer)
    return out, layers


def resized_metadata(metadata: Mapping[str, str], layers: list[ResizedLayer], new_rank: int, new_conv_rank: int,
                     method: str | None, param: float | None) -> dict[str, str]:
    """The source's metadata with kohya's updates: dim / alpha ("Dynamic" for a dynamic resize; alpha is the
    last layer's, as kohya writes it) and a training comment put in front of the old one. Hashes come later."""
    meta = dict(metadata)
    old_dim = max(layer.old_rank for layer in layers)
    comment = meta.get("ss_training_comment", "")
    if method:
        meta["ss_training_comment"] = f"Dynamic resize with {method}: {param} from {old_dim}; {comment}"
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    else:
        conv = "" if new_rank == new_conv_rank else f" (conv: {new_conv_rank})"
        meta["ss_training_comment"] = f"dimension is resized from {old_dim} to {new_rank}{conv}; {comment}"
        meta["ss_network_dim"] = str(new_rank)
        meta["ss_network_alpha"] = str(layers[-1].alpha)
    return meta


def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (float32) and metadata of a LoRA / LoCon / DyLoRA .safetensors file; UserError otherwise,
    naming what the file holds (LoHa, LoKr, ... are not factored as up @ down and cannot be resized here)."""
    from library.lora_inspect import read_network_file
    from networks.detect import detect_algorithm

    tensors, metadata = read_network_file(path, "--model")
    detected = detect_algorithm(tensors, metadata)
    if detected.algo not in RESIZABLE:
        what = "no network layers sdtune recognises" if detected.algo == "unknown" else f"a {detected.summary()}"
        raise UserError(f"--model {path}: holds {what}; only LoRA, LoCon and DyLoRA files can be resized")
    return {k: v.float() for k, v in tensors.items()}, metadata


def check_request(model: str, save_to: str | None, new_rank: int, new_conv_rank: int, method: str | None,
                  param: float | None) -> None:
    """UserError for a bad combination of options, before anything is read or written."""
    if not save_to or os.path.splitext(save_to)[1].lower() not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise UserError(f"--save_to {save_to}: give a file name ending in .safetensors (or .ckpt / .pt / .pth)")
    if os.path.exists(save_to) and os.path.exists(model) and os.path.samefile(save_to, model):
        raise UserError(f"--save_to {save_to}: is the --model file; give another name (the input is never overwritten)")
    folder = os.path.dirname(os.path.abspath(save_to))
    if not os.path.isdir(folder):
        raise UserError(f"--save_to {save_to}: folder {folder} does not exist")
    for flag, value in (("--new_rank", new_rank), ("--new_conv_rank", new_conv_rank)):
        if value < 1:
            raise UserError(f"{flag} {value}: give a rank of 1 or more")
    if method and not param:
        raise UserError(f"--dynamic_method {method} needs --dynamic_param (e.g. 0.9 for sv_fro)")
    if method and param < 0:
        raise UserError(f"--dynamic_param {param}: give a positive number")
    if method in ("sv_fro", "sv_cumulative") and param > 1:
        raise UserError(f"--dynamic_param {param}: {method} takes the fraction to keep, in (0, 1]")


def resize_file(model: str, save_to: str, new_rank: int = 4, new_conv_rank: int | None = None,
                method: str | None = None, param: float | None = None, save_precision: str | None = None,
                device: str | None = None, verbose: bool = False) -> list[ResizedLayer]:
    """Read `model`, resize every layer, write `save_to` atomically (metadata updated, hashes recomputed)."""
    from library.saving import add_model_hashes, save_safetensors, save_torch_file

    new_conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    check_request(model, save_to, new_rank, new_conv_rank, method, param)
    if param is not None and not method:
        logger.warning("--dynamic_param is ignored without --dynamic_method")
        param = None
    device = _device(device)
    tensors, metadata = read_lora_file(model)
    if method:
        logger.info("choosing ranks with %s %s, at most %d (conv %d)", method, param, new_rank, new_conv_rank)
    with torch.no_grad():
        resized, layers = resize_state_dict(tensors, new_rank, new_conv_rank, method, param, device, model)
    if verbose:
        _print_report(layers, bool(method))
    dtype = SAVE_DTYPES[save_precision]
    resized = {k: v.to(dtype) for k, v in resized.items()}
    if save_to.lower().endswith(".safetensors"):
        meta = resized_metadata(metadata, layers, new_rank, new_conv_rank, method, param)
        save_safetensors(resized, save_to, add_model_hashes(resized, meta))
    else:
        save_torch_file(resized, save_to)
    logger.info("wrote %s (%d layers, ranks %s)", save_to, len(layers),
                "/".join(map(str, sorted({layer.new_rank for layer in layers}))))
    return layers


def _device(device: str | None) -> str:
    if not device:
        return "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"--device {device}: not usable here ({str(exc).splitlines()[0]})") from None
    return device


def _print_report(layers: list[ResizedLayer], dynamic: bool) -> None:
    """kohya's --verbose: a line per layer, then the mean and spread of the retained Frobenius fractions."""
    from tqdm import tqdm

    for layer in layers:
        tqdm.write(layer.report(dynamic))
    fro = torch.tensor([layer.fro_retained for layer in layers if not math.isnan(layer.fro_retained)],
                       dtype=torch.float64)
    if len(fro):
        print(f"Average Frobenius norm retention: {float(fro.mean()):.2%} | std: {float(fro.std(correction=0)):0.3f}")

