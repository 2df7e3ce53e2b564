"""Cut a DyLoRA file into fixed-rank LoRA files: one per rank unit, 2 unit, ... below the file's rank.

    python tools/extract_lora_from_dylora.py --model dylora.safetensors --save_to out/lora.safetensors --unit 4

writes out/lora-0004.safetensors, out/lora-0008.safetensors, ... (kohya's names). The rank-r file holds
the first r rows of every ``lora_down`` and the first r columns of every ``lora_up``, with the source's
``alpha`` kept, so it is exactly the network networks.dylora trained at rank r (layers of rank r or less
are copied whole). Metadata is the source's, with ``ss_network_dim`` set to r, kohya's
"split from DyLoRA" training comment and hashes of the new file. Pickled input is not read.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from library.errors import UserError, run_cli  # noqa: E402

logger = logging.getLogger(__name__)

OUTPUT_EXTENSIONS = (".safetensors", ".ckpt", ".pt")


def max_rank(state_dict: dict[str, torch.Tensor]) -> int:
    """The largest rank (rows of a lora_down) in a LoRA state dict; 0 when it has no lora_down."""
    return max((v.shape[0] for k, v in state_dict.items() if k.endswith(".lora_down.weight")), default=0)


def cut_to_rank(state_dict: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The LoRA of the first `rank` ranks: lora_down rows and lora_up columns cut, everything else kept."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("lora_down.weight"):
            value = value[:rank]
        elif key.endswith("lora_up.weight"):
            value = value[:, :rank]
        out[key] = value.contiguous()
    return out


def split_ranks(full_rank: int, unit: int) -> list[int]:
    """kohya's ranks: unit, 2 unit, ... strictly below the file's rank (the file itself is the full one)."""
    return list(range(unit, full_rank, unit))


def output_path(save_to: str, rank: int) -> str:
    stem, ext = os.path.splitext(save_to)
    return f"{stem}-{rank:04d}{ext}"


def read_dylora(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict and metadata of a LoRA-format .safetensors file; UserError when it is not one."""
    from library.lora_inspect import read_network_file

    tensors, metadata = read_network_file(path, "--model")
    foreign = [k for k in tensors if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if foreign or not max_rank(tensors):
        example = f" (key {foreign[0]})" if foreign else ""
        raise UserError(f"--model {path}: not a LoRA / DyLoRA file{example}; only lora_down / lora_up / alpha "
                        "files can be split")
    return tensors, metadata


def check_source(path: str, metadata: dict[str, str], unit: int) -> None:
    """Warnings (not errors) when the file was not trained as a DyLoRA with a unit that divides `unit`."""
    import json

    module = metadata.get("ss_network_module")
    if module and module != "networks.dylora":
        logger.warning("%s was trained with %s, not networks.dylora: its first ranks are not trained to stand "
                       "alone (tools/resize_lora.py finds the best low-rank approximation instead)", path, module)
    try:
        trained = int(json.loads(metadata.get("ss_network_args") or "{}").get("unit", 0))
    except (ValueError, TypeError, AttributeError):
        trained = 0
    if trained and unit % trained:
        logger.warning("%s was trained with unit=%d: ranks that are not multiples of it were never trained "
                       "as a cut", path, trained)


def split(model: str, save_to: str, unit: int) -> list[str]:
    """Write one file per rank; returns their paths. Everything is checked before the first write."""
    from library.saving import add_model_hashes, save_safetensors, save_torch_file

    if unit is None or unit < 1:
        raise UserError(f"--unit {unit}: give the rank step, a positive integer (the unit the DyLoRA was trained with)")
    if not save_to or os.path.splitext(save_to)[1].lower() not in OUTPUT_EXTENSIONS:
        raise UserError(f"--save_to {save_to}: give a file name ending in .safetensors (or .ckpt / .pt)")
    tensors, metadata = read_dylora(model)
    full = max_rank(tensors)
    ranks = split_ranks(full, unit)
    if not ranks:
        raise UserError(f"--unit {unit}: the file's rank is {full}, so there is no smaller rank to cut out; "
                        "give a unit below it")
    check_source(model, metadata, unit)
    folder = os.path.dirname(os.path.abspath(save_to))
    if not os.path.isdir(folder):
        raise UserError(f"--save_to {save_to}: folder {folder} does not exist")
    logger.info("%s: rank %d, cutting ranks %s", model, full, ", ".join(map(str, ranks)))

    comment = metadata.get("ss_training_comment", "")
    written = []
    for rank in ranks:
        cut = cut_to_rank(tensors, rank)
        path = output_path(save_to, rank)
        if path.lower().endswith(".safetensors"):
            meta = dict(metadata, ss_network_dim=str(rank),
                        ss_training_comment=f"split from DyLoRA, rank {full} to {rank}; {comment}")
            save_safetensors(cut, path, add_model_hashes(cut, meta))
        else:
            save_torch_file(cut, path)
        logger.info("wrote %s", path)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="extract_lora_from_dylora.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the DyLoRA file to split (.safetensors)")
    parser.add_argument("--save_to", required=True,
                        help="base name of the files to write: NAME.safetensors gives NAME-0004.safetensors, ...")
    parser.add_argument("--unit", type=int, required=True, help="the rank step (the unit the DyLoRA was trained with)")
    args = parser.parse_args(argv)
    return run_cli(lambda _: split(args.model, args.save_to, args.unit) and 0, [])


if __name__ == "__main__":
    sys.exit(main())
