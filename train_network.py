"""Train a LoRA / LoCon (or any kohya network plug-in) with kohya sd-scripts' options.

    accelerate launch train_network.py --config_file my_lora.toml
    python train_network.py --pretrained_model_name_or_path model.safetensors --train_data_dir data ...
"""

import sys

from library.errors import run_cli
from library.trainer import run


def main(argv=None) -> int:
    return run_cli(lambda args: run(args, "train_network", "network"), argv)


if __name__ == "__main__":
    sys.exit(main())
