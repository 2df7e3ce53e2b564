"""Merge tag files (e.g. from a WD14 tagger) into kohya's fine-tuning metadata JSON (kohya's
finetune/merge_dd_tags_to_metadata.py).

    python tools/merge_dd_tags_to_metadata.py train_data meta_clean.json --in_json meta_cap.json

Each image's `<name>.txt` text goes under "tags"; entries already in the file keep their other fields,
so captions and tags end up in one file (see library/finetune_prep.py).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.merge_captions_to_metadata import build_parser, merge_main  # noqa: E402


def main(argv=None) -> int:
    parser = build_parser("merge_dd_tags_to_metadata.py", ".txt", "tag")
    parser.description = __doc__.splitlines()[0]
    return merge_main(argv, parser, "tags")


if __name__ == "__main__":
    sys.exit(main())
