"""Atomic file writes, safetensors saving and the model hashes that A1111 and kohya tools read.

Every file sdtune writes goes through `_atomic_write`: the bytes land in a temporary file next to the
target, are flushed to disk, and only then replace the target with `os.replace`. An interrupted or
failed save therefore leaves any earlier file exactly as it was and no temporary file behind.

Hash formats (all hex strings, as kohya sd-scripts and the A1111 web UI compute them):
- `file_sha256`: SHA-256 of the whole file (A1111's "new" model hash, kohya's `ss_new_sd_model_hash`).
- `model_hash`: A1111's legacy hash: first 8 hex digits of SHA-256 over the 64 KiB that start 1 MiB into
  the file (kohya's `ss_sd_model_hash`).
- `precalculate_safetensors_hashes`: sd-webui-additional-networks' `sshs_model_hash` (SHA-256 of the
  safetensors data section, i.e. everything after the header) and `sshs_legacy_hash` (the legacy hash of
  the serialized file), computed on a serialization that keeps only the `ss_*` metadata, so that editing
  other metadata later does not change them.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from typing import BinaryIO, Callable, Mapping

import safetensors.torch
import torch

_BLOCK = 1024 * 1024
# A1111's legacy hash reads 64 KiB starting 1 MiB into the file.
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` for a temp file in `path`'s folder, fsync it, then rename it onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model is an ordinary file
        os.replace(tmp_path, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written temp file next to the user's files.
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_folder(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable where the platform allows opening a folder (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""

    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    _atomic_write(path, write)


def partial_folder(path: str) -> str:
    """Where a folder is written before `replace_folder` moves it to `path` (the same name in every process)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.partial")


def replace_folder(source: str, target: str) -> None:
    """Move the finished folder `source` to `target`, replacing any older `target` only once `source` is
    complete: a crash at any point leaves either the old folder or the new one under its name (or beside it)."""
    old = None
    if os.path.exists(target):
        old = partial_folder(target) + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(target, old)
    os.rename(source, target)
    _fsync_folder(os.path.dirname(os.path.abspath(target)))
    if old is not None:
        shutil.rmtree(old)


def save_torch_file(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """`torch.save` of a plain state dict (kohya's .ckpt / .pt network files, which carry no metadata), atomically."""
    prepared = _prepare_tensors(tensors)
    _atomic_write(path, lambda tmp_path: torch.save(prepared, tmp_path))


def atomic_write_npz(path: str, arrays: Mapping[str, "numpy.ndarray"]) -> None:
    """Write `arrays` as an uncompressed .npz (numpy.savez) to `path` atomically."""
    import numpy

    def write(tmp_path: str) -> None:
        with open(tmp_path, "wb") as handle:  # a handle: given a name, savez would append ".npz"
            numpy.savez(handle, **arrays)

    _atomic_write(path, write)


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    """safetensors metadata is str -> str; anything else is a programming error, caught before writing."""
    if metadata is None:
        return None
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"safetensors metadata must map str to str; {key!r} -> {type(value).__name__} {value!r}"
            )
    return dict(metadata)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses shared storage)."""
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen_storages and storage.nbytes() > 0:
            tensor = tensor.clone()
        else:
            seen_storages.add(key)
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            # A view into a larger buffer: safetensors would reject it; keep only its own bytes.
            tensor = tensor.clone()
        prepared[name] = tensor
    return prepared


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None
) -> None:
    """Save `tensors` with `metadata` (str -> str) to `path` atomically.

    Tensors are moved to the CPU and made contiguous first; metadata with a non-str key or value raises
    TypeError before anything is written.
    """
    checked = _check_metadata(metadata)
    prepared = _prepare_tensors(tensors)
    _atomic_write(path, lambda tmp_path: safetensors.torch.save_file(prepared, tmp_path, checked))


def _legacy_hash(stream: BinaryIO) -> str:
    stream.seek(_LEGACY_OFFSET)
    return hashlib.sha256(stream.read(_LEGACY_LENGTH)).hexdigest()[:8]


def _data_section_sha256(stream: BinaryIO) -> str:
    """SHA-256 of a safetensors stream after its 8-byte length prefix and JSON header."""
    stream.seek(0)
    header_length = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_length)
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(_BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()


def precalculate_safetensors_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya computes them before saving a network.

    Only `ss_*` metadata is kept in the serialization that is hashed. The whole file is serialized in
    memory, which is fine for networks and embeddings (kohya does the same).
    """
    training_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    buffer = io.BytesIO(safetensors.torch.save(_prepare_tensors(tensors), _check_metadata(training_only)))
    return _data_section_sha256(buffer), _legacy_hash(buffer)


def add_model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of `metadata` with `sshs_model_hash` / `sshs_legacy_hash` for exactly these tensors.

    Call it on the tensors as they will be written (after any dtype conversion): the hashes depend on
    the bytes. kohya's network `save_weights` does this for every .safetensors network file.
    """
    result = dict(metadata or {})
    result["sshs_model_hash"], result["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, result)
    return result


def model_hash(path: str) -> str:
    """A1111's legacy 8-hex model hash of a file (SHA-256 of 64 KiB at offset 1 MiB)."""
    with open(path, "rb") as handle:
        return _legacy_hash(handle)


def file_sha256(path: str) -> str:
    """SHA-256 of a whole file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} when it has none), without loading tensors."""
    with safetensors.safe_open(path, framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})
