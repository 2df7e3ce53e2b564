"""Merge networks into an SD 1.x / 2.x / SDXL checkpoint, or LoRA files into one LoRA (library/merging.py).

    python tools/merge_lora.py --sd_model model.safetensors --models a.safetensors b.safetensors \
        --ratios 0.7 -0.3 --save_to merged.safetensors
    python tools/merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors

With --sd_model every wrapped weight becomes W + ratio * delta, exactly as the network computes it
(LoRA, LoCon, DyLoRA, and LyCORIS files); the model is written in the input's layout (single file or
diffusers folder); its family (SD 1.x, 2.x, SDXL) is read from the model, and kohya's --v2 / --sdxl are
accepted and checked against it. Without it, LoRA files are merged by stacking their ranks: the result's
rank is the sum and its delta is exactly the ratio-weighted sum. --kohya_average gives kohya's merge of the factors instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library import merging  # noqa: E402
from library.errors import UserError, not_supported, run_cli  # noqa: E402

logger = logging.getLogger(__name__)


def merge(args: argparse.Namespace) -> None:
    """Check everything, read the inputs, merge, write."""
    if args.shuffle:
        raise not_supported("shuffle")
    if args.concat and args.kohya_average:
        raise UserError("--concat and --kohya_average: give one (concatenation is the default)")
    ratios = merging.check_ratios(args.models, args.ratios)
    if args.precision != "float":
        logger.info("--precision %s: sdtune computes every merge in float32 (exact); --save_precision sets "
                    "the written dtype", args.precision)
    save_dtype = merging.DTYPES.get(args.save_precision)
    if args.sd_model:
        _into_checkpoint(args, ratios, save_dtype)
    else:
        _into_lora(args, ratios, save_dtype)


def _into_checkpoint(args, ratios, save_dtype) -> None:
    # a folder model may be written as a folder or as one file; a file model only as a file
    suffixes = ("",) if os.path.isdir(args.sd_model) else (".safetensors",)
    merging.check_save_to(args.save_to, [args.sd_model] + args.models, suffixes)
    from library.models import files

    files.check_local_path(args.sd_model, "--sd_model")  # family flags are checked before anything is read
    files.check_family_flags(args.sd_model, files.detect_family(args.sd_model), args.v2, args.sdxl, "--sd_model")
    nets = [merging.read_network(path) for path in args.models]
    ckpt = merging.load_checkpoint(args.sd_model, args.v2, args.sdxl)
    merging.merge_into_model(ckpt.text_encoder, ckpt.unet, nets, ratios, args.device)
    merging.save_checkpoint(ckpt, args.save_to, save_dtype)


def _into_lora(args, ratios, save_dtype) -> None:
    merging.check_save_to(args.save_to, args.models)
    nets = [merging.read_network(path) for path in args.models]
    if args.kohya_average:
        logger.warning("--kohya_average: the factors are added, so the result is NOT the sum of the networks' "
                       "changes (it scales with ratio squared and mixes the networks); see sd-scripts #586")
        tensors = merging.average_loras(nets, ratios)
    else:
        tensors = merging.concat_loras(nets, ratios)
    metadata = merging.lora_metadata(nets, ratios, tensors, args.save_to, not args.no_metadata)
    merging.save_lora(tensors, args.save_to, save_dtype or merging.DTYPES["float"], metadata)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="merge_lora.py", description=__doc__.splitlines()[0])
    parser.add_argument("--sd_model", help="SD 1.x / 2.x / SDXL model to merge into (.safetensors or diffusers "
                        "folder; the family is detected); "
                        "without it the networks are merged into one LoRA")
    parser.add_argument("--models", nargs="+", required=True, help="network files (.safetensors)")
    parser.add_argument("--ratios", nargs="+", type=float, help="one ratio per model (default 1.0 each)")
    parser.add_argument("--save_to", required=True, help="output .safetensors file, or folder for a folder model")
    merging.add_output_args(parser, "dtype written (default: the input's for a model, float for a LoRA)")
    parser.add_argument("--concat", action="store_true", help="stack the ranks (the default; kept for kohya)")
    parser.add_argument("--kohya_average", action="store_true",
                        help="kohya's default LoRA merge: add the factors (not the sum of the changes)")
    parser.add_argument("--shuffle", action="store_true", help="kohya's rank shuffle (refused)")
    parser.add_argument("--v2", action="store_true", help="kohya: --sd_model is SD 2.x (checked, not needed)")
    parser.add_argument("--sdxl", action="store_true", help="kohya's sdxl_merge_lora.py: --sd_model is SDXL "
                        "(checked, not needed)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda _: merge(args), [])


if __name__ == "__main__":
    sys.exit(main())
