"""Is an image file usable? A cheap check at scan time, so a bad file stops the run before training.

Decoding every image would take seconds per hundred images; instead each file's header is read (its
size, as bucketing needs anyway) and its last bytes are compared with the end its format requires:
PNG ends with an IEND chunk, JPEG with the EOI marker, WebP and BMP store their own length. A
download or copy cut short fails that test. Only a file that fails it is decoded in full, because
some writers append data after the end marker (phone "motion photos" put a video after the JPEG);
such a file is fine if it decodes. Damage in the middle of an intact-looking file is not seen here:
it stops the run when the image is first decoded (caching or training), naming the file.

The size bucketing needs comes from the same scan (inspect_image), so each header is read once.
"""

from __future__ import annotations

import os
import struct

import imagesize
from PIL import Image

from library.dataset.buckets import Size
from library.dataset.images import image_size
from library.errors import UserError

_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk with its CRC
_JPEG_END = b"\xff\xd9"
_TAIL_BYTES = 16


def _read_ends(path: str) -> tuple[bytes, bytes, int]:
    """The first and last 16 bytes of the file, and its length."""
    with open(path, "rb") as handle:
        head = handle.read(_TAIL_BYTES)
        length = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, length - _TAIL_BYTES))
        return head, handle.read(_TAIL_BYTES), length


def ends_complete(path: str) -> bool:
    """Whether the file ends where its format says it should (formats without such a rule: True)."""
    head, tail, length = _read_ends(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".png":
        return tail.endswith(_PNG_END)
    if ext in (".jpg", ".jpeg"):
        return tail.endswith(_JPEG_END)
    if ext == ".webp" and head[:4] == b"RIFF":  # RIFF size counts the bytes after its first 8
        return length >= 8 + struct.unpack("<I", head[4:8])[0]
    if ext == ".bmp" and head[:2] == b"BM":  # bfSize: the whole file, 0 from some writers
        return length >= struct.unpack("<I", head[2:6])[0]
    return True


def _decode_error(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return str(exc) or type(exc).__name__
    return None


UNREADABLE = "unreadable: not an image, or a damaged one"


def inspect_image(path: str) -> tuple[Size | None, str | None]:
    """(size as the image is seen, None) for a usable image, else (None, why it cannot be used).

    The size is images.image_size's (EXIF orientation applied), read once here for both questions."""
    try:
        size = image_size(path)
    except UserError:
        size = None  # PIL opens some formats (WebP) by decoding: a cut file fails here already
    try:
        if size is not None and ends_complete(path):
            return size, None
        width, height = imagesize.get(path)  # only on this slow path: is there a header at all?
    except OSError:
        return None, UNREADABLE
    if width <= 0 or height <= 0:
        return None, UNREADABLE
    error = _decode_error(path)
    if error is None and size is not None:
        return size, None
    return None, f"truncated or damaged: {error or 'its header cannot be read'}"


def image_problem(path: str) -> str | None:
    """Why the image cannot be used, or None (see inspect_image)."""
    return inspect_image(path)[1]
