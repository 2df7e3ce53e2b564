"""Benchmark: a LoRA run on the real SD1.5 architecture (random weights), as issue 2 specifies.

256 px, batch 1, LoRA rank 4, AdamW fp32, cached latents, 8 images, 10 steps; from a diffusers folder
and from a single-file checkpoint. Prints one JSON line per run: seconds per step once warm, wall time
(load + caching + training + save) and the child's peak RSS, next to kohya sd-scripts' figures on the
same kind of machine.

These shared 2-vCPU machines change speed over time (the same run measured 7.6 and 4.3 s/step forty
minutes apart), so each run is preceded by a probe: one plain SD1.5 UNet forward (32x32 latents,
batch 1, fp32, no grad, best of 3), measured in its own process. kohya's figures come from a machine
where that forward took about 1 s (shared/FACTS.md); `normalized_ratio` divides our figure by the
probe and kohya's by that second: an estimate of the ratio on equal hardware.

    .venv/bin/python bench/bench_sd15_lora.py [--work .bench] [--steps 10]
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

KOHYA = {"s_per_step": 3.2, "wall_s": 58.0, "peak_rss_gb": {"folder": 7.26, "single_file": 8.86}}
KOHYA_PROBE_S = 1.0  # the UNet forward on the machine kohya's figures were taken on (FACTS.md: "~1 s")

PROBE = """
import sys, time, torch
from diffusers import UNet2DConditionModel
unet = UNet2DConditionModel.from_pretrained(sys.argv[1]).requires_grad_(False).eval()
x, t, c = torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.randn(1, 77, 768)
times = []
with torch.no_grad():
    unet(x, t, c)
    for _ in range(3):
        start = time.perf_counter()
        unet(x, t, c)
        times.append(time.perf_counter() - start)
print(min(times))
"""


def probe_unet_forward(folder: str) -> float:
    """Seconds for one SD1.5 UNet forward on this machine right now (see the module doc)."""
    out = subprocess.run([sys.executable, "-c", PROBE, os.path.join(folder, "unet")], capture_output=True,
                         text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 3)


def prepare(work: str) -> dict:
    """The sd15 model as a folder and as a single file, and 8 captioned 256 px images (built once)."""
    import numpy as np
    from PIL import Image

    from library.models.synthetic import build_sd1_pipeline_folder, write_sd1_single_file

    folder = os.path.join(work, "sd15")
    single = os.path.join(work, "sd15.safetensors")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        build_sd1_pipeline_folder(folder, size="sd15", seed=0)
    if not os.path.exists(single):
        write_sd1_single_file(folder, single)
    data = os.path.join(work, "data", "1_bench")
    if not os.path.isdir(data):
        os.makedirs(data)
        rng = np.random.default_rng(0)
        for i in range(8):
            pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(data, f"{i}.png"))
            with open(os.path.join(data, f"{i}.caption"), "w") as f:
                f.write(f"a photo of bench image {i}")
    return {"folder": folder, "single_file": single, "data": os.path.dirname(data)}


def run_once(model: str, data: str, out: str, steps: int) -> dict:
    """Train in a child process; wall time and peak RSS come from the OS, step time from the log."""
    argv = [sys.executable, os.path.join(REPO, "train_network.py"),
            "--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--resolution", "256", "--train_batch_size", "1", "--network_module", "networks.lora",
            "--network_dim", "4", "--optimizer_type", "AdamW", "--mixed_precision", "no", "--cache_latents",
            "--max_train_steps", str(steps), "--seed", "0", "--sdpa", "--max_data_loader_n_workers", "0"]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"training failed:\n{output[-3000:]}")
    speed = re.search(r"speed: (\d+) steps, first ([\d.]+) s, ([\d.]+) s/step after", output)
    return {"s_per_step": float(speed.group(3)), "first_step_s": float(speed.group(2)),
            "wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(REPO, ".bench"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", choices=["folder", "single_file"])
    args = parser.parse_args(argv)
    paths = prepare(args.work)
    for source in ("folder", "single_file"):
        if args.only and source != args.only:
            continue
        probe = probe_unet_forward(paths["folder"])
        result = run_once(paths[source], paths["data"], os.path.join(args.work, "out", source), args.steps)
        kohya = {"s_per_step": KOHYA["s_per_step"], "wall_s": KOHYA["wall_s"],
                 "peak_rss_gb": KOHYA["peak_rss_gb"][source]}
        ratios = {k: round(result[k] / kohya[k], 2) for k in kohya}
        speed = probe / KOHYA_PROBE_S  # > 1: this machine is slower now than kohya's was
        normalized = {k: round(result[k] / speed / kohya[k], 2) for k in ("s_per_step", "wall_s")}
        print(json.dumps({"bench": "sd15_lora_256px", "source": source, "steps": args.steps, **result,
                          "probe_unet_forward_s": probe, "kohya": kohya, "ratio_to_kohya": ratios,
                          "normalized_ratio": normalized, "cpus": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
