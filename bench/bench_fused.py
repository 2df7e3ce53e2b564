"""Benchmark: --fused_backward_pass against an ordinary step, on a model trained in full (where it matters).

A stack of Linear layers stands in for a model trained in full. For each optimizer the script runs the
same steps with and without the fused hooks (library/fused_backward.py) and prints one JSON line: seconds
per step once warm, the most gradient memory held at any moment (counted exactly: the bytes of the .grad
tensors alive, sampled after each gradient is accumulated), and on a GPU the peak allocated memory.

    .venv/bin/python bench/bench_fused.py [--layers 16] [--width 1024] [--steps 6] [--optimizers AdamW AdamW8bit]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library import optim  # noqa: E402
from library.config import default_config  # noqa: E402
from library.fused_backward import FusedBackward  # noqa: E402


def measure(name: str, fused: bool, layers: int, width: int, steps: int, device: str) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    params = list(model.parameters())
    cfg = default_config()
    cfg.optimizer_type, cfg.learning_rate = name, 1e-4
    opt = optim.build_optimizer(cfg, [{"params": params}])
    peak = [0]

    def count(_param) -> None:  # registered first, so it runs before the fused hook frees the gradient
        peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    hooks = FusedBackward(opt) if fused else None
    x = torch.randn(64, width, device=device)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        start = time.perf_counter()
        model(x).pow(2).mean().backward()
        if hooks is None:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    warm = times[1:] or times
    result = {"optimizer": name, "fused": fused, "tensors": len(params), "s_per_step": round(sum(warm) / len(warm), 4),
              "peak_grad_mb": round(peak[0] / 2**20, 1)}
    if device == "cuda":
        result["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--optimizers", nargs="+", default=["AdamW", "AdamW8bit"])
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in args.optimizers:
        for fused in (False, True):
            print(json.dumps(measure(name, fused, args.layers, args.width, args.steps, device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
