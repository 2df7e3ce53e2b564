"""Extract a LoRA from the difference of two SD 1.x / 2.x / SDXL models (kohya's extract_lora_from_models.py).

    python tools/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \
        --save_to out/lora.safetensors --dim 32 [--conv_dim 16]

Each LoRA layer gets the rank-`dim` approximation of (tuned - original), clamped as kohya does, with
alpha = rank. Models are single files or diffusers folders; their family is detected (kohya's --v2 /
--sdxl are accepted and checked). SDXL LoRAs get kohya's SDXL names (lora_te1_, lora_te2_, lora_unet_
with the LDM block names). The math: library/extract.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import run_cli  # noqa: E402

logger = logging.getLogger(__name__)
PRECISION_CHOICES = ["float", "fp16", "bf16"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extract_lora_from_models.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model_org", required=True, help="the original model: .safetensors file or diffusers folder")
    parser.add_argument("--model_tuned", required=True, help="the fine-tuned model; the LoRA is tuned minus original")
    parser.add_argument("--save_to", required=True, help="the LoRA file to write (.safetensors)")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None,
                        help="rank for the U-Net's 3x3 convs (LoCon); default: no conv layers")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clamp both factors to this quantile of their values (default 0.99; 1 = no clamp)")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="leave the text encoder out when none of its weights moved more than this (default 0.01)")
    parser.add_argument("--device", default=None, help="device for the SVDs, e.g. cuda (default cpu)")
    parser.add_argument("--load_precision", choices=PRECISION_CHOICES, default=None,
                        help="hold the models in this precision (default: float32)")
    parser.add_argument("--save_precision", choices=PRECISION_CHOICES, default=None,
                        help="precision of the saved LoRA (default float)")
    parser.add_argument("--no_metadata", action="store_true",
                        help="write only the ss_* keys, not the ModelSpec (modelspec.*) ones")
    parser.add_argument("--v2", action="store_true", help="kohya: the models are SD 2.x (checked, not needed)")
    parser.add_argument("--sdxl", action="store_true", help="kohya: the models are SDXL (checked, not needed)")
    parser.add_argument("--v_parameterization", action="store_true", default=None,
                        help="mark the LoRA as made for a v-prediction model (metadata only)")
    parser.add_argument("--full_svd", action="store_true",
                        help="sdtune: kohya's full SVD per layer instead of the faster randomized one")
    for flag in ("--load_original_model_to", "--load_tuned_model_to"):
        parser.add_argument(flag, default=None, help="kohya: a device for SDXL loading; ignored (models load on "
                            "the CPU, one component at a time)")
    parser.add_argument("--mem_eff_safe_open", action="store_true",
                        help="kohya's low-memory reader; files are always read one component at a time here")
    return parser


def run(args: argparse.Namespace) -> int:
    from library.extract import ExtractSettings, extract

    for flag in ("load_original_model_to", "load_tuned_model_to"):
        if getattr(args, flag):
            logger.warning("--%s: ignored; models load on the CPU one component at a time, --device sets "
                           "where the SVDs run", flag)
    settings = ExtractSettings(dim=args.dim, conv_dim=args.conv_dim or None, clamp_quantile=args.clamp_quantile,
                               min_diff=args.min_diff, device=args.device, full_svd=args.full_svd)
    extract(args.model_org, args.model_tuned, args.save_to, settings, v2=args.v2, sdxl=args.sdxl,
            v_parameterization=bool(args.v_parameterization), load_precision=args.load_precision,
            save_precision=args.save_precision, no_metadata=args.no_metadata)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda _: run(args), [])


if __name__ == "__main__":
    sys.exit(main())
