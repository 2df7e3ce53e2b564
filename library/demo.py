"""The built-in demo: a tiny SD1 model and a generated dataset, then the quickstart LoRA.

    python -m library.demo          # what `make demo` runs
"""

from __future__ import annotations

import logging
import os
import sys

import train_network
from library.dataset.demo_data import make_demo_dataset
from library.models.synthetic import build_sd1_pipeline_folder

logger = logging.getLogger(__name__)
DEMO_DIR = ".demo"
CONFIG = "configs/quickstart.toml"


def prepare(root: str = DEMO_DIR) -> None:
    """Write the demo model and dataset under `root` (once; they are deterministic)."""
    model_dir = os.path.join(root, "model")
    if not os.path.exists(os.path.join(model_dir, "model_index.json")):
        build_sd1_pipeline_folder(model_dir, size="tiny", seed=0)
    data_dir = os.path.join(root, "data")
    if not os.path.isdir(data_dir):
        make_demo_dataset(data_dir, seed=0)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prepare()
    code = train_network.main(["--config_file", CONFIG, *(argv or [])])
    if code == 0:
        print(f"demo LoRA: {DEMO_DIR}/output/quickstart.safetensors; logs: tensorboard --logdir {DEMO_DIR}/logs")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
