"""Merge LoRA files into one LoRA of a chosen rank: the exact sum of their changes, cut by SVD.

    python tools/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 \
        --new_rank 16 --new_conv_rank 8 --save_to ab.safetensors

Each layer's ratio-weighted sum of changes (optionally weighted per block with --lbws, kohya's 17- or
26-value lists) is factored by SVD and the top --new_rank singular vectors kept (--new_conv_rank for 3x3
convolutions, default --new_rank), alpha = rank. Unlike kohya no value clamping is done, so a rank at or
above the sum's true rank reproduces it exactly.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library import merging  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402


def merge(args: argparse.Namespace) -> None:
    ratios = merging.check_ratios(args.models, args.ratios)
    lbws = merging.parse_lbws(args.lbws, len(args.models))
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    for flag, value in (("--new_rank", args.new_rank), ("--new_conv_rank", conv_rank)):
        if value < 1:
            raise UserError(f"{flag} {value}: give a positive rank")
    merging.check_save_to(args.save_to, args.models)
    nets = [merging.read_network(path) for path in args.models]
    deltas = merging.summed_deltas(nets, ratios, lbws, args.device)
    tensors = merging.svd_merge(deltas, args.new_rank, conv_rank)
    metadata = merging.lora_metadata(nets, ratios, tensors, args.save_to, not args.no_metadata)
    save_dtype = merging.DTYPES[args.save_precision or "float"]
    merging.save_lora(tensors, args.save_to, save_dtype, metadata)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd_merge_lora.py", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="LoRA / LoCon files (.safetensors)")
    parser.add_argument("--ratios", nargs="+", type=float, help="one ratio per model (default 1.0 each)")
    parser.add_argument("--lbws", nargs="+", help="per model, a JSON list of 17 or 26 block weights")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the merged LoRA (default 4)")
    parser.add_argument("--new_conv_rank", type=int, help="rank for 3x3 convolutions (default --new_rank)")
    parser.add_argument("--save_to", required=True, help="output .safetensors file")
    merging.add_output_args(parser, "dtype written (default float)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda _: merge(args), [])


if __name__ == "__main__":
    sys.exit(main())
