"""Benchmark: resizing an SD1.5 LoRA with library.lora_rank (SVD from the factors) against the full-matrix
path kohya's networks/resize_lora.py runs (multiply up @ down out, torch.linalg.svd of the o x n delta with
full matrices, as kohya calls it), on the same file, in the same run, on the CPU.

The file is a LoRA of the SD1.5 architecture (library.models.synthetic size "sd15", 264 layers; with
`--conv_rank`, LoCon layers too) with random weights. Each path runs in its own process, so its peak
resident memory (ru_maxrss, above what the loaded file already takes) is its own.

The full path takes minutes per large layer on a small CPU, so by default it is timed on one layer of each
distinct shape and the total is the sum over all layers of the time of their shape ("extrapolated": true);
`--full_baseline` times every layer. Our path always runs on every layer, file reading and writing included.

Prints one JSON line per rank and path, then the speed-up.

    .venv/bin/python bench/bench_resize_lora.py [--ranks 4,32] [--new_rank 2] [--threads 1] [--work .bench/resize]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_file(path: str, rank: int, conv_rank: int) -> None:
    """An SD1.5 LoRA (LoCon when conv_rank) with random up and down weights, as networks.lora saves it."""
    import torch

    from library.models.synthetic import build_sd1_components
    from networks.lora import create_network

    comps = build_sd1_components("sd15", empty=True)
    net = create_network(1.0, rank, rank / 2, None, comps["text_encoder"], comps["unet"],
                         conv_dim=str(conv_rank), conv_alpha=str(max(conv_rank, 1) / 2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    net.save_weights(path, None, {"ss_network_dim": str(rank)})


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_ours(path: str, new_rank: int) -> dict:
    import safetensors.torch  # noqa: F401  (imports are not timed: the full path has them loaded too)
    import tqdm  # noqa: F401

    import library.saving  # noqa: F401
    import networks.detect  # noqa: F401
    from library.lora_rank import resize_file

    out = path.replace(".safetensors", "-resized.safetensors")
    base = _peak_mib()
    start = time.perf_counter()
    layers = resize_file(path, out, new_rank=new_rank)
    return {"seconds": time.perf_counter() - start, "layers": len(layers), "timed_layers": len(layers),
            "extrapolated": False, "peak_mib_above_start": _peak_mib() - base}


def child_full(path: str, new_rank: int, every_layer: bool) -> dict:
    """kohya's math: delta = up @ down (float32), full SVD, truncate. One layer per shape unless every_layer."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(path)
    names = [k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")]
    shape_of = {n: (sd[f"{n}.lora_up.weight"].shape[0], sd[f"{n}.lora_down.weight"][0].numel()) for n in names}
    base = _peak_mib()
    seconds_by_shape: dict[tuple, float] = {}
    total = 0.0
    for name in names:
        shape = shape_of[name]
        if shape in seconds_by_shape and not every_layer:
            total += seconds_by_shape[shape]
            continue
        start = time.perf_counter()
        up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
        delta = up.flatten(1) @ down.flatten(1)
        u, s, vh = torch.linalg.svd(delta)
        _ = (u[:, :new_rank] * s[:new_rank]).contiguous(), vh[:new_rank].contiguous()
        del u, s, vh, delta
        seconds = time.perf_counter() - start
        seconds_by_shape[shape] = seconds
        total += seconds
    timed = len(names) if every_layer else len(seconds_by_shape)
    return {"seconds": total, "layers": len(names), "timed_layers": timed, "extrapolated": not every_layer,
            "peak_mib_above_start": _peak_mib() - base}


def run_child(mode: str, path: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--file", path, "--new_rank", str(args.new_rank)]
    if args.full_baseline:
        cmd.append("--full_baseline")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="4,32", help="ranks of the source files, comma-separated")
    parser.add_argument("--conv_rank", type=int, default=0, help="LoCon rank of the source files (0: plain LoRA)")
    parser.add_argument("--new_rank", type=int, default=2)
    parser.add_argument("--work", default=os.path.join(REPO, ".bench", "resize"))
    parser.add_argument("--full_baseline", action="store_true", help="time the full-matrix path on every layer")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both paths (default: torch's)")
    parser.add_argument("--child", choices=["ours", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import logging

    logging.disable(logging.WARNING)
    if args.child and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child == "ours":
        os.environ.setdefault("TQDM_DISABLE", "1")
        print(json.dumps(child_ours(args.file, args.new_rank)))
        return
    if args.child == "full":
        print(json.dumps(child_full(args.file, args.new_rank, args.full_baseline)))
        return

    import torch

    os.makedirs(args.work, exist_ok=True)
    for rank in (int(r) for r in args.ranks.split(",")):
        path = os.path.join(args.work, f"sd15-r{rank}-c{args.conv_rank}.safetensors")
        if not os.path.exists(path):
            build_file(path, rank, args.conv_rank)
        common = {"rank": rank, "conv_rank": args.conv_rank, "new_rank": args.new_rank,
                  "threads": args.threads or torch.get_num_threads(), "file_mib": round(os.path.getsize(path) / 2 ** 20, 1)}
        results = {}
        for mode in ("ours", "full"):
            results[mode] = run_child(mode, path, args)
            print(json.dumps({**common, "path": mode, **results[mode]}), flush=True)
        print(json.dumps({**common, "speedup": round(results["full"]["seconds"] / results["ours"]["seconds"], 1)}),
              flush=True)


if __name__ == "__main__":
    main()
