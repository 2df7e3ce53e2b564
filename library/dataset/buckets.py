"""Aspect-ratio bucket arithmetic, as kohya sd-scripts does it: pure functions on (width, height) pairs.

Every size in this module is (width, height), the order kohya writes in `--resolution` and in the
`ss_bucket_info` metadata. An image is placed in a bucket, resized so that it covers the bucket
("resized size"), then center-cropped to the bucket.
"""

from __future__ import annotations

import math
from typing import Sequence

from library.errors import UserError

Size = tuple[int, int]


def parse_resolution(value) -> Size:
    """`--resolution` to (width, height): "512" -> (512, 512), "512,768" -> (512, 768).

    Also accepts an int or a 1-2 item list/tuple (a TOML config may give either).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str):
        parts = value.split(",")
    else:
        raise UserError(f"--resolution: expected 'SIZE' or 'WIDTH,HEIGHT', got {value!r}")
    try:
        sizes = [int(str(p).strip()) for p in parts]
    except ValueError:
        raise UserError(f"--resolution: expected 'SIZE' or 'WIDTH,HEIGHT' in pixels, got {value!r}") from None
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise UserError(f"--resolution: expected one or two positive sizes like 512 or 512,768, got {value!r}")
    return (sizes[0], sizes[-1])


MULTIRES_PREFIX = "multires:"


def is_multires(value) -> bool:
    """Whether a --resolution value is written as a list of sizes (three or more, or "multires:...")."""
    text = value.strip().lower() if isinstance(value, str) else ""
    return text.startswith(MULTIRES_PREFIX) or text.count(",") >= 2


def parse_resolutions(value) -> list[Size]:
    """`--resolution` to the list of training sizes, for multi-resolution training.

    One number is a square, two are kohya's "WIDTH,HEIGHT" (one size); three or more are a list of
    square sizes ("384,512,640"), and "multires:512,640" is a list of squares of any length. An int or a
    1-2 item list (TOML) keeps its single-size meaning.
    """
    if not is_multires(value):
        return [parse_resolution(value)]
    text = value.strip()
    body = text[len(MULTIRES_PREFIX):] if text.lower().startswith(MULTIRES_PREFIX) else text
    try:
        sides = [int(p.strip()) for p in body.split(",")]
    except ValueError:
        raise UserError(f"--resolution {value!r}: expected square sizes in pixels, e.g. multires:512,640") from None
    if min(sides) <= 0 or len(set(sides)) != len(sides):
        raise UserError(f"--resolution {value!r}: sizes must be positive and different, e.g. 384,512,640")
    return [(side, side) for side in sides]


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> list[Size]:
    """All bucket sizes of about max_reso's area, sorted; sides are multiples of `divisible`.

    kohya's construction: the square bucket of side floor(sqrt(area)) rounded down to `divisible`,
    then for every width from min_size to max_size (step `divisible`) the tallest height that keeps
    width * height <= area (capped at max_size, rounded down), with its transpose, if it is >= min_size.
    """
    max_area = max_reso[0] * max_reso[1]
    square = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(square, square)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def cover_size(image_size: Size, bucket: Size) -> Size:
    """The size to resize an image to so that it covers `bucket` while keeping its aspect ratio.

    The side whose ratio is tighter matches the bucket exactly; the other side overhangs and is
    cropped later. Rounded to the nearest pixel (kohya: int(x + 0.5)).
    """
    width, height = image_size
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height  # image is wider than the bucket: match heights
    else:
        scale = bucket[0] / width
    return (int(width * scale + 0.5), int(height * scale + 0.5))


def select_bucket(width: int, height: int, buckets: Sequence[Size]) -> tuple[Size, Size, float]:
    """Pick a predefined bucket for an image: (bucket, resized size, aspect-ratio error).

    An image whose exact size is a bucket keeps it; otherwise the bucket with the closest aspect
    ratio wins (the first in `buckets` order on a tie, as kohya's argmin). The error is
    bucket_ar - image_ar.
    """
    aspect = width / height
    if (width, height) in buckets:
        bucket = (width, height)
    else:
        bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
    return bucket, cover_size((width, height), bucket), bucket[0] / bucket[1] - aspect


def round_to_steps(x: float, steps: int) -> int:
    """Round to the nearest integer, then down to a multiple of `steps` (kohya's round_to_steps)."""
    value = int(x + 0.5)
    return value - value % steps


def no_upscale_bucket(width: int, height: int, max_area: int, steps: int) -> tuple[Size, Size, float]:
    """`--bucket_no_upscale`: a bucket made for this image, never larger than it.

    An image larger than max_area is first scaled down to that area, keeping its aspect ratio;
    of the two ways to round the result to `steps` (fix the width or fix the height), the one with
    the smaller aspect-ratio error wins. The bucket is the resized size rounded down to `steps`,
    so the image is only ever cropped, never padded. Returns (bucket, resized size, ar error).
    """
    aspect = width / height
    if width * height > max_area:
        resized_w = math.sqrt(max_area * aspect)
        resized_h = max_area / resized_w
        by_width = round_to_steps(resized_w, steps)
        height_for_width = round_to_steps(by_width / aspect, steps)
        by_height = round_to_steps(resized_h, steps)
        width_for_height = round_to_steps(by_height * aspect, steps)
        err_w = abs(by_width / height_for_width - aspect) if height_for_width else math.inf
        err_h = abs(width_for_height / by_height - aspect) if by_height else math.inf
        if err_w < err_h:
            resized = (by_width, int(by_width / aspect + 0.5))
        else:
            resized = (int(by_height * aspect + 0.5), by_height)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if min(bucket) == 0:
        return bucket, resized, math.inf
    return bucket, resized, bucket[0] / bucket[1] - aspect


def center_crop_offsets(resized: Size, bucket: Size) -> tuple[int, int]:
    """(left, top) of the bucket-sized window centered in the resized image (kohya: overhang // 2)."""
    return (max(0, resized[0] - bucket[0]) // 2, max(0, resized[1] - bucket[1]) // 2)


def kohya_crop_ltrb(bucket: Size, original_size: Size) -> tuple[float, ...]:
    """kohya's crop_ltrb value (BucketManager.get_crop_ltrb): the image's box inside the bucket when it is
    fitted rather than covered; SDXL conditions on it. Kept bit-for-bit, floats included."""
    bucket_ar, image_ar = bucket[0] / bucket[1], original_size[0] / original_size[1]
    if bucket_ar > image_ar:
        width, height = bucket[1] * image_ar, bucket[1]
    else:
        width, height = bucket[0], bucket[0] / image_ar
    left, top = (bucket[0] - width) // 2, (bucket[1] - height) // 2
    return (left, top, left + width, top + height)
