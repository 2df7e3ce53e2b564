"""Train a textual-inversion embedding with kohya sd-scripts' train_textual_inversion.py options.

    accelerate launch train_textual_inversion.py --config_file my_embedding.toml
    python train_textual_inversion.py --pretrained_model_name_or_path model.safetensors --train_data_dir data \
        --token_string mychar --init_word girl --num_vectors_per_token 4 ...
"""

import sys

from library.errors import run_cli
from library.trainer import run


def main(argv=None) -> int:
    return run_cli(lambda args: run(args, "train_textual_inversion", "embedding"), argv)


if __name__ == "__main__":
    sys.exit(main())
