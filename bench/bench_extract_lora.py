"""Benchmark: tools/extract_lora_from_models.py's SVD (randomized, library/extract.py) against kohya's math
(a full torch.linalg.svd per layer) on the SD1.5 architecture.

The layers are those kohya's LoRA extracts from SD1.5 (text encoder + U-Net transformer layers; with
`--conv_dim` also the resnets and samplers, LoCon), their shapes read from an empty (meta) SD1.5 model.
Each layer's difference `tuned - original` is made in turn, so only one is held at a time:
`white` is i.i.d. noise (a flat spectrum: the hard case for a randomized SVD), `decay` noise with
singular values falling as 0.97^k (closer to what fine-tuning leaves). Not timed: making the difference.

Each method runs in its own child process, so its peak resident memory (ru_maxrss, minus the child's
memory before the first layer) is its own. The randomized method runs on every layer; the full SVD is
timed once per distinct layer shape and its total extrapolated by the number of layers of that shape
(`--full_all` times every layer instead). Also reported: the Frobenius error of the rank-`dim`
approximation relative to the optimal one (the full SVD's), over the distinct shapes.

    .venv/bin/python bench/bench_extract_lora.py [--dim 32] [--conv_dim 0] [--spectrum white|decay]
        [--threads 1] [--device cpu]

Prints one JSON line per method and one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def sd15_layer_shapes(with_conv: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(kohya name, weight shape) of every layer kohya's LoRA (LoCon) extracts from SD1.5."""
    from library.models.synthetic import build_sd1_components
    from networks.targets import network_layers

    comps = build_sd1_components("sd15", empty=True)
    return [(layer.name, tuple(layer.module.weight.shape))
            for layer in network_layers(comps["text_encoder"], comps["unet"], with_conv)]


def make_diff(shape: tuple[int, ...], spectrum: str, seed: int, device: str):
    """A reproducible stand-in for tuned - original of one layer (see the module doc)."""
    import torch

    gen = torch.Generator(device).manual_seed(seed)
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    if spectrum == "white":
        mat = torch.randn(rows, cols, generator=gen, device=device) * 1e-3
    else:
        k = min(rows, cols)
        u = torch.linalg.qr(torch.randn(rows, k, generator=gen, device=device))[0]
        v = torch.linalg.qr(torch.randn(cols, k, generator=gen, device=device))[0]
        mat = (u * 0.97 ** torch.arange(k, device=device, dtype=torch.float32)) @ v.T * 1e-2
    return mat.reshape(shape)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def approximation_error(shape: tuple[int, ...], index: int, args) -> float:
    """Frobenius error of our rank-r approximation over the optimal (full SVD) one, for one layer."""
    import torch

    from library.extract import low_rank

    mat = make_diff(shape, args.spectrum, index, args.device).flatten(1)
    rank = args.conv_dim if args.conv_dim and len(shape) == 4 and shape[2:] != (1, 1) else args.dim
    rank = min(rank, *mat.shape)
    ours = torch.linalg.norm(mat - torch.matmul(*low_rank(mat, rank)))
    best = torch.linalg.norm(mat - torch.matmul(*low_rank(mat, rank, full_svd=True)))
    return float(ours / best)


def child(args) -> dict:
    """One method over the layers; returns its figures (run in a child process)."""
    import torch

    from library.extract import ExtractSettings, extract_layer

    torch.set_num_threads(args.threads)
    full = args.method == "full"
    settings = ExtractSettings(dim=args.dim, conv_dim=args.conv_dim or None, device=args.device, full_svd=full)
    layers = sd15_layer_shapes(bool(args.conv_dim))
    counts = Counter(shape for _, shape in layers)
    first_of_shape = {}
    for index, (_, shape) in enumerate(layers):
        first_of_shape.setdefault(shape, index)
    run = range(len(layers)) if (not full or args.full_all) else sorted(first_of_shape.values())
    base = current_rss_mib()
    seconds, per_shape, errors = 0.0, {}, []
    with torch.no_grad():
        for index in run:
            _, shape = layers[index]
            diff = make_diff(shape, args.spectrum, index, args.device)
            rank = args.conv_dim if args.conv_dim and len(shape) == 4 and shape[2:] != (1, 1) else args.dim
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            extract_layer(diff, rank, settings)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            took = time.perf_counter() - start
            seconds += took
            per_shape.setdefault(shape, took)
            del diff
    peak = rss_mib() - base  # before the error pass, whose full SVDs are not this method's cost
    if args.errors:
        errors = [approximation_error(layers[i][1], i, args) for i in sorted(first_of_shape.values())]
    extrapolated = sum(per_shape[s] * n for s, n in counts.items()) if full and not args.full_all else seconds
    result = {
        "method": "full torch.linalg.svd (kohya)" if full else "randomized torch.svd_lowrank (sdtune)",
        "layers": len(layers), "layers_timed": len(run), "distinct_shapes": len(counts),
        "dim": args.dim, "conv_dim": args.conv_dim or None, "spectrum": args.spectrum, "device": args.device,
        "threads": args.threads, "seconds_timed": round(seconds, 2), "seconds_all_layers": round(extrapolated, 2),
        "extrapolated": full and not args.full_all,
        "peak_extra_rss_mib": round(peak, 1),
        "slowest_shape": max(per_shape, key=per_shape.get), "slowest_shape_s": round(max(per_shape.values()), 3),
    }
    if errors:
        result["error_vs_optimal_mean"] = round(sum(errors) / len(errors), 4)
        result["error_vs_optimal_max"] = round(max(errors), 4)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--conv_dim", type=int, default=0)
    parser.add_argument("--spectrum", choices=("white", "decay"), default="white")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full_all", action="store_true", help="time the full SVD on every layer")
    parser.add_argument("--method", choices=("randomized", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--errors", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:  # the child
        print(json.dumps(child(args)), flush=True)
        return 0
    results = []
    for method in ("randomized", "full"):
        argv = [sys.executable, os.path.abspath(__file__), "--method", method, "--dim", str(args.dim),
                "--conv_dim", str(args.conv_dim), "--spectrum", args.spectrum, "--threads", str(args.threads),
                "--device", args.device] + (["--full_all"] if args.full_all else []) + \
               (["--errors"] if method == "randomized" else [])
        line = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(line, flush=True)
        results.append(json.loads(line))
    ours, full = results
    print(json.dumps({"summary": True, "speedup_all_layers": round(full["seconds_all_layers"]
                                                                   / ours["seconds_all_layers"], 1),
                      "error_vs_optimal_mean": ours.get("error_vs_optimal_mean"),
                      "error_vs_optimal_max": ours.get("error_vs_optimal_max")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
