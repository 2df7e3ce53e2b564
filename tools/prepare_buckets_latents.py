"""Give each fine-tuning image its bucket and encode its latents (kohya's finetune/prepare_buckets_latents.py).

    python tools/prepare_buckets_latents.py train_data meta_clean.json meta_lat.json model.safetensors \\
        --max_resolution 512,512 --batch_size 4 --mixed_precision fp16

Writes "train_resolution" [width, height] into each image's metadata entry and the latents into sdtune's
(and kohya's) cache file next to the image, `<name>_<W>x<H>_sd.npz` (`_sdxl.npz` for SDXL). Training with
`--in_json meta_lat.json --cache_latents_to_disk` and the same VAE, --mixed_precision and --no_half_vae
then reads them instead of encoding (see library/finetune_prep.py).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prepare_buckets_latents.py", description=__doc__.splitlines()[0])
    parser.add_argument("train_data_dir", help="the folder of training images")
    parser.add_argument("in_json", help="the metadata file to add the buckets to (from merge_*_to_metadata.py)")
    parser.add_argument("out_json", help="the metadata file to write (may be in_json itself)")
    parser.add_argument("model_name_or_path", help="the model whose VAE encodes the latents (SD 1.x, 2.x or SDXL; "
                                                   "a diffusers folder or a single file)")
    parser.add_argument("--v2", action="store_true", help="accepted for kohya's scripts; the family is detected")
    parser.add_argument("--vae", default=None, help="another VAE (as training's --vae)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per encoder call (default 1)")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="accepted for kohya's scripts and ignored")
    parser.add_argument("--max_resolution", default="512,512",
                        help="the training size, WIDTH,HEIGHT (default 512,512): buckets have about its area")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    parser.add_argument("--bucket_reso_steps", type=int, default=64,
                        help="bucket sides are multiples of this (default 64; SD 1.x / 2.x need 64, SDXL 32)")
    parser.add_argument("--bucket_no_upscale", action="store_true",
                        help="a bucket made for each image, never larger than it")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                        help="the VAE's dtype; use the training run's, or it encodes again (default no)")
    parser.add_argument("--no_half_vae", action="store_true",
                        help="keep the VAE in float32 whatever --mixed_precision says (as training's option)")
    parser.add_argument("--device", default=None, help="where to encode (default cuda when there is one)")
    parser.add_argument("--full_path", action="store_true", help="key images by their path (as the merge tools)")
    parser.add_argument("--flip_aug", action="store_true", help="also store the latents of the mirrored images")
    parser.add_argument("--alpha_mask", default="", help="not supported yet")
    parser.add_argument("--skip_existing", action="store_true",
                        help="keep latents already cached for this bucket, VAE and image instead of encoding again")
    parser.add_argument("--recursive", action="store_true", help="also read sub-folders (needs --full_path)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def prepare(_):
        from library.finetune_prep import prepare_buckets_latents

        prepare_buckets_latents(args)
        return 0

    return run_cli(prepare, [])


if __name__ == "__main__":
    sys.exit(main())
