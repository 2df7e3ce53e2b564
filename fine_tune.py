"""Fine-tune the whole model (U-Net, and the text encoders with --train_text_encoder) with kohya
sd-scripts' fine_tune.py / sdxl_train.py options; saves a checkpoint (library/full_model.py).

    accelerate launch fine_tune.py --config_file my_finetune.toml
    python fine_tune.py --pretrained_model_name_or_path model.safetensors --in_json meta.json \
        --train_data_dir images --output_dir out --learning_rate 1e-6 ...
"""

import sys

from library.errors import run_cli
from library.trainer import run


def main(argv=None) -> int:
    return run_cli(lambda args: run(args, "fine_tune", "full"), argv)


if __name__ == "__main__":
    sys.exit(main())
