"""Convert a LoRA between kohya's key format and diffusers' (peft) format, losslessly, both ways.

    python tools/convert_lora.py --src_path lora.safetensors --dst_path lora_diffusers.safetensors --dst diffusers
    python tools/convert_lora.py --src_path lora_diffusers.safetensors --dst_path lora.safetensors --dst kohya

The source format is read from the keys. Weights are copied bit for bit; each layer's alpha goes into
diffusers' ``lora_adapter_metadata`` (peft's lora_alpha / alpha_pattern), which ``load_lora_weights``
reads, and comes back as the layer's ``.alpha`` (a diffusers file without that metadata gets alpha = rank,
the scale diffusers gives it). Other metadata is kept and the sshs_* hashes are recomputed. LoRA, LoCon
and DyLoRA files convert; LoHa / LoKr / DoRA files have no diffusers LoRA form and are refused.
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


def convert(args) -> int:
    from library.lora_convert import convert_file

    source = convert_file(args.src_path, args.dst_path, args.dst, args.overwrite)
    logger.info("converted %s (%s) to %s (%s)", args.src_path, source, args.dst_path, args.dst)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="convert_lora.py", description=__doc__.splitlines()[0])
    parser.add_argument("--src_path", required=True, help="the LoRA file to convert (.safetensors)")
    parser.add_argument("--dst_path", required=True, help="the file to write (.safetensors)")
    parser.add_argument("--dst", required=True, choices=("kohya", "diffusers"), help="the format to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --dst_path when it exists")
    args = parser.parse_args(argv)
    return run_cli(lambda _: convert(args), [])


if __name__ == "__main__":
    sys.exit(main())
