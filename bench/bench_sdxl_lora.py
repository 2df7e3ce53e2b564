"""Benchmark: a LoRA run on the real SDXL base 1.0 architecture (random weights), as issue 7 asks.

CPU (default): 256 px, batch 1, LoRA rank 4, U-Net only, AdamW fp32, cached latents, 3 steps: the
smallest run that still goes through every SDXL block at a real size. GPU (--gpu): 1024 px with the
low-memory path people use on consumer cards (--gradient_checkpointing, --cache_text_encoder_outputs,
--fp8_base or a bf16 base with --base bf16, --mixed_precision bf16, AdamW8bit).

Prints one JSON line: seconds per step once warm, the first step, wall time (load + caching + training
+ save), the child's peak RSS and, on a GPU, peak CUDA memory. The model folder is built once under
--work (~14 GB on disk; building it holds the 10 GB fp32 U-Net in memory) and reused.

    .venv/bin/python bench/bench_sdxl_lora.py [--work .bench] [--steps 3] [--resolution 256]
    .venv/bin/python bench/bench_sdxl_lora.py --gpu [--base fp8|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Runs the training in a child process that can report the CUDA peak after main() returns.
CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import train_network
rc = train_network.main(sys.argv[2:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(f"BENCH cuda_peak_bytes {peak}", flush=True)
sys.exit(rc)
"""


def prepare(work: str, resolution: int, size: str = "sdxl", images: int = 4) -> dict:
    """The model folder (built once; "tiny" for a quick check of the flags) and `images` captioned random
    images at `resolution`."""
    import numpy as np
    from PIL import Image

    from library.models.synthetic_sdxl import build_sdxl_pipeline_folder

    folder = os.path.join(work, size)
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        build_sdxl_pipeline_folder(folder, size=size, seed=0)
    data = os.path.join(work, f"data_sdxl_{resolution}", "1_bench")
    if not os.path.isdir(data):
        os.makedirs(data)
        rng = np.random.default_rng(0)
        for i in range(images):
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(data, f"{i}.png"))
            with open(os.path.join(data, f"{i}.caption"), "w") as f:
                f.write(f"a photo of bench image {i}")
    return {"folder": folder, "data": os.path.dirname(data)}


def train_argv(args, paths: dict, out: str) -> list[str]:
    """kohya's SDXL LoRA flags for this benchmark (U-Net only, as most SDXL LoRAs are trained)."""
    argv = ["--pretrained_model_name_or_path", paths["folder"], "--train_data_dir", paths["data"],
            "--output_dir", out, "--resolution", str(args.resolution), "--train_batch_size", "1",
            "--network_module", "networks.lora", "--network_dim", "4", "--network_train_unet_only",
            "--cache_latents", "--max_train_steps", str(args.steps), "--seed", "0", "--sdpa",
            "--max_data_loader_n_workers", "0"]
    if not args.low_memory:
        return argv + ["--optimizer_type", "AdamW", "--mixed_precision", "no"]
    argv += ["--gradient_checkpointing", "--cache_text_encoder_outputs", "--optimizer_type", "AdamW8bit",
             "--mixed_precision", "bf16"]
    return argv + (["--fp8_base"] if args.base == "fp8" else [])


def run_once(argv: list[str]) -> dict:
    """Train in a child process; wall time and peak RSS come from the OS, step time from the log."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, REPO, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"training failed:\n{output[-3000:]}")
    speed = re.search(r"speed: (\d+) steps, first ([\d.]+) s, ([\d.]+) s/step after", output)
    cuda = re.search(r"BENCH cuda_peak_bytes (\d+)", output)
    result = {"s_per_step": float(speed.group(3)), "first_step_s": float(speed.group(2)),
              "wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}
    if cuda and int(cuda.group(1)):
        result["peak_cuda_gb"] = round(int(cuda.group(1)) / 2**30, 2)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(REPO, ".bench"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, help="image side in px (default 256 on CPU, 1024 with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="1024 px with the low-memory path (needs CUDA)")
    parser.add_argument("--low_memory", action="store_true", help="the low-memory path without --gpu")
    parser.add_argument("--size", choices=["sdxl", "tiny"], default="sdxl",
                        help="tiny: the test model, to check the flags in seconds")
    parser.add_argument("--base", choices=["fp8", "bf16"], default="fp8",
                        help="base weights of the low-memory path: fp8 (--fp8_base) or bf16")
    args = parser.parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device")
    args.low_memory = args.low_memory or args.gpu
    args.resolution = args.resolution or (1024 if args.gpu else 256)
    paths = prepare(args.work, args.resolution, args.size)
    result = run_once(train_argv(args, paths, os.path.join(args.work, "out_sdxl")))
    setup = "low_memory_" + args.base if args.low_memory else "fp32_adamw"
    print(json.dumps({"bench": f"{args.size}_lora_{args.resolution}px", "setup": setup, "steps": args.steps, **result,
                      "cpus": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
