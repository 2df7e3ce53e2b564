"""Merge caption files into kohya's fine-tuning metadata JSON (kohya's finetune/merge_captions_to_metadata.py).

    python tools/merge_captions_to_metadata.py train_data meta_cap.json
    python tools/merge_captions_to_metadata.py train_data meta.json --in_json meta_tags.json --full_path

Each image's `<name>.caption` text goes under "caption"; entries already in the file keep their other
fields (see library/finetune_prep.py).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import run_cli  # noqa: E402


def build_parser(prog: str = "merge_captions_to_metadata.py", default_extension: str = ".caption",
                 what: str = "caption") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("train_data_dir", help="the folder of training images")
    parser.add_argument("out_json", help="the metadata file to write")
    parser.add_argument("--in_json", default=None,
                        help="the metadata file to add to (default: out_json when it exists)")
    parser.add_argument("--caption_extension", default=default_extension,
                        help=f"extension of the {what} files (default {default_extension})")
    parser.add_argument("--full_path", action="store_true",
                        help="key images by their path instead of their name (several folders in one file)")
    parser.add_argument("--recursive", action="store_true", help="also read sub-folders (needs --full_path)")
    parser.add_argument("--debug", action="store_true", help="print each key and its text")
    return parser


def merge_main(argv, parser: argparse.ArgumentParser, name: str) -> int:
    args = parser.parse_args(argv)

    def merge(_):
        from library.finetune_prep import merge_text_files

        if args.debug:
            import logging

            logging.getLogger("library.finetune_prep").setLevel(logging.DEBUG)
        merge_text_files(args.train_data_dir, args.out_json, args.in_json, args.caption_extension, name,
                         args.full_path, args.recursive)
        return 0

    return run_cli(merge, [])


def main(argv=None) -> int:
    parser = build_parser()
    parser.add_argument("--caption_extention", dest="caption_extension", help=argparse.SUPPRESS)  # kohya's old spelling
    return merge_main(argv, parser, "caption")


if __name__ == "__main__":
    sys.exit(main())
