"""Print the metadata of a .safetensors file as pretty JSON.

    python tools/show_metadata.py lora.safetensors

Values that are JSON themselves (kohya's ``ss_tag_frequency``, ``ss_dataset_dirs``, ``ss_network_args``,
diffusers' ``lora_adapter_metadata``, ...) are expanded, so nested structures read as JSON too. Only the
header is read: no tensor is loaded, nothing pickled is opened.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import UserError, run_cli  # noqa: E402


def expand(value: str):
    """A metadata value, decoded when it is a JSON object or list (numbers and plain text stay strings)."""
    if value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def read_metadata(path: str) -> dict:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    return {key: expand(value) for key, value in sorted(metadata.items())}


def show(path: str) -> int:
    print(json.dumps(read_metadata(path), indent=2, ensure_ascii=False))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="show_metadata.py", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="a .safetensors file")
    args = parser.parse_args(argv)
    return run_cli(lambda _: show(args.file), [])


if __name__ == "__main__":
    sys.exit(main())
