"""Check a network file: statistics of every tensor and a verdict for every layer.

    python tools/check_lora_weights.py lora.safetensors [-s]

prints, as kohya's script does, one CSV line per LoRA weight (key, shape, mean |w|, min |w|), with the
count of exact zeros and of NaN/inf added; ``-s`` / ``--show_all_keys`` lists every tensor (alphas, LyCORIS
factors, ...). Then each layer that is not ok (broken: NaN/inf; untrained: a factor all zero, so the layer
changes nothing; underflowed: many exact zeros, e.g. tiny weights saved as fp16), and a summary. Works on
LoRA, LoCon, DyLoRA, LoHa, LoKr and other LyCORIS files. Exit code 1 when a layer is broken.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.errors import run_cli  # noqa: E402

LORA_WEIGHTS = ("lora_up", "lora_down")  # what kohya's script lists without -s


def report_lines(report, show_all_keys: bool) -> list[str]:
    """The lines to print: tensors, layers that are not ok (every layer with -s), the summary."""
    tensors = [t for t in report.tensors if show_all_keys or any(w in t.key for w in LORA_WEIGHTS)]
    lines = [f"number of LoRA weight tensors: {sum(any(w in t.key for w in LORA_WEIGHTS) for t in report.tensors)}"]
    if show_all_keys:
        lines.append(f"number of all tensors: {len(report.tensors)}")
    lines += [t.line() for t in tensors]
    lines += [f"{layer.verdict}: {layer.name}" + (f" ({layer.reason})" if layer.reason else "")
              for layer in report.layers if show_all_keys or layer.verdict != "ok"]
    lines.append(report.summary())
    return lines


def check(path: str, show_all_keys: bool) -> int:
    from library.lora_inspect import check_file

    report = check_file(path)
    print("\n".join(report_lines(report, show_all_keys)))
    return 1 if report.broken else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="check_lora_weights.py", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the network file to check (.safetensors)")
    parser.add_argument("-s", "--show_all_keys", action="store_true",
                        help="list every tensor and every layer, not only LoRA weights and layers with a problem")
    args = parser.parse_args(argv)
    return run_cli(lambda _: check(args.file, args.show_all_keys), [])


if __name__ == "__main__":
    sys.exit(main())
