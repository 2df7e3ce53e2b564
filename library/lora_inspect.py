"""Health check of a network file (tools/check_lora_weights.py): per-tensor statistics, per-layer verdicts.

A layer's change to its model is a product of factor tensors (LoRA: up @ down; LoHa: the Hadamard product
of two such products; LoKr: a Kronecker product), so one all-zero factor makes the whole change zero. That
gives each layer one verdict:

- ``broken``: a NaN or an infinity in any of its tensors (the layer poisons every image it touches);
- ``untrained``: a factor is all zeros, so the layer changes nothing (networks start that way: LoRA's up,
  LoHa's w2_a, LoKr's w2 begin at zero and move with the first optimizer step);
- ``underflowed``: some factors hold exact zeros among non-zero values. Trained float weights are
  practically never exactly zero; many of them mean small values were flushed to zero, typically by
  saving tiny weights as fp16 (smallest step about 6e-8);
- ``ok`` otherwise.

The file is read without loading anything pickled.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch

from library.errors import UserError

VERDICTS = ("broken", "untrained", "underflowed", "ok")
UNDERFLOW_FRACTION = 0.01  # exact zeros above this share of a layer's factor values count as underflow
SCALAR_KEYS = ("alpha", "dora_scale", "scale", "on_input")  # per-layer scalars, scales, flags: not factors


@dataclass(frozen=True)
class TensorStats:
    key: str
    shape: tuple[int, ...]
    dtype: str
    mean_abs: float
    min_abs: float
    zeros: int
    nonfinite: int
    numel: int

    def line(self) -> str:
        """kohya's CSV line (key, shape with `-`, mean |w|, min |w|) plus zero and NaN/inf counts."""
        shape = "(" + "-".join(map(str, self.shape)) + ")"
        return (f"{self.key},{shape},{self.mean_abs:.6g},{self.min_abs:.6g},"
                f"zeros={self.zeros}/{self.numel},nan_inf={self.nonfinite}")


@dataclass(frozen=True)
class LayerReport:
    name: str
    verdict: str
    reason: str


@dataclass(frozen=True)
class Report:
    algo: str
    tensors: list[TensorStats]
    layers: list[LayerReport]

    @property
    def counts(self) -> Counter:
        return Counter(layer.verdict for layer in self.layers)

    @property
    def broken(self) -> bool:
        return self.counts["broken"] > 0

    def summary(self) -> str:
        counts = self.counts
        parts = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
        count = len(self.layers)
        return f"{self.algo} network, {count} layer{'' if count == 1 else 's'}: {parts or 'none'}"


def tensor_stats(key: str, value: torch.Tensor) -> TensorStats:
    """Statistics of one tensor, computed in float32 (fp16/bf16 values are exact there)."""
    flat = value.detach().float().reshape(-1)
    finite = torch.isfinite(flat)
    magnitudes = flat[finite].abs()
    return TensorStats(
        key, tuple(value.shape), str(value.dtype).removeprefix("torch."),
        float(magnitudes.mean()) if magnitudes.numel() else float("nan"),
        float(magnitudes.min()) if magnitudes.numel() else float("nan"),
        int((flat == 0).sum()), int((~finite).sum()), flat.numel())


def is_factor(key: str) -> bool:
    """Whether a key (after the layer name) is a factor of the layer's change, not a scalar or scale."""
    return key.rsplit(".", 1)[0] not in SCALAR_KEYS and key not in SCALAR_KEYS and not key.endswith("bias")


def layer_verdict(name: str, stats: dict[str, TensorStats]) -> LayerReport:
    """The verdict of one layer from the statistics of its tensors (keys without the layer name)."""
    bad = [k for k, s in stats.items() if s.nonfinite]
    if bad:
        return LayerReport(name, "broken", f"NaN/inf in {', '.join(bad)}")
    factors = {k: s for k, s in stats.items() if is_factor(k)}
    zero = [k for k, s in factors.items() if s.numel and s.zeros == s.numel]
    if zero:
        return LayerReport(name, "untrained", f"all zero: {', '.join(zero)}")
    zeros = sum(s.zeros for s in factors.values())
    total = sum(s.numel for s in factors.values())
    if total and zeros / total > UNDERFLOW_FRACTION:
        return LayerReport(name, "underflowed", f"{zeros} of {total} values exactly zero")
    return LayerReport(name, "ok", "")


def inspect_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Report:
    """Statistics of every tensor and a verdict for every layer (keys `layer.rest`)."""
    from networks.detect import detect_algorithm

    stats = {key: tensor_stats(key, value) for key, value in tensors.items()}
    by_layer: dict[str, dict[str, TensorStats]] = {}
    for key, stat in stats.items():
        layer, _, rest = key.partition(".")
        by_layer.setdefault(layer, {})[rest or key] = stat
    layers = [layer_verdict(name, layer_stats) for name, layer_stats in by_layer.items()]
    return Report(detect_algorithm(tensors, metadata).algo, list(stats.values()), layers)


def read_network_file(path: str, flag: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file; a one-line UserError when it is missing or not one."""
    from safetensors import SafetensorError, safe_open

    where = f"{flag} {path}".strip()
    if not os.path.isfile(path):
        raise UserError(f"{where}: file not found")
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise UserError(f"{where}: give a .safetensors file (pickled .ckpt / .pt files are not opened)")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{where}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def check_file(path: str) -> Report:
    """The report of a network file; a UserError when it holds no network layers sdtune recognises."""
    tensors, metadata = read_network_file(path)
    report = inspect_state_dict(tensors, metadata)
    if report.algo == "unknown":
        raise UserError(f"{path}: holds no network layers (LoRA, LoCon, DyLoRA, LoHa, LoKr, ...) to check")
    return report
