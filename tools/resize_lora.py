"""Change the rank of a LoRA / LoCon / DyLoRA file (kohya's networks/resize_lora.py options).

    python tools/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 8
    python tools/resize_lora.py --model big.safetensors --save_to dyn.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each layer becomes its best approximation of the new rank (exact SVD, computed from the low-rank factors,
see library/lora_rank.py); alpha is set so that alpha / rank, the layer's scale, is unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import run_cli  # noqa: E402
from library.lora_rank import DYNAMIC_METHODS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resize_lora.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the LoRA / LoCon / DyLoRA file to resize (.safetensors)")
    parser.add_argument("--save_to", required=True,
                        help="the file to write (.safetensors; .ckpt / .pt carry no metadata)")
    parser.add_argument("--new_rank", type=int, default=4,
                        help="rank of the linear layers; with --dynamic_method, the largest rank allowed (default 4)")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="the same for convolution layers (1x1 included, as in kohya); default: --new_rank")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                        help="dtype of the written weights (default float)")
    parser.add_argument("--device", default=None, help="where to compute, e.g. cuda (default cpu; cpu is fast here)")
    parser.add_argument("--verbose", action="store_true",
                        help="print each layer's retained share of its singular values and the average")
    parser.add_argument("--dynamic_method", choices=list(DYNAMIC_METHODS), default=None,
                        help="choose each layer's rank from its singular values: sv_ratio (keep values above "
                             "the largest / param), sv_fro (keep this Frobenius fraction), sv_cumulative "
                             "(keep this fraction of the sum of singular values)")
    parser.add_argument("--dynamic_param", type=float, default=None, help="the target of --dynamic_method")
    parser.add_argument("--svd_lowrank_niter", type=int, default=2,
                        help="accepted for kohya's scripts and ignored: the SVD here is always exact")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def resize(_):
        from library.lora_rank import resize_file

        resize_file(args.model, args.save_to, args.new_rank, args.new_conv_rank, args.dynamic_method,
                    args.dynamic_param, args.save_precision, args.device, args.verbose)
        return 0

    return run_cli(resize, [])


if __name__ == "__main__":
    sys.exit(main())
