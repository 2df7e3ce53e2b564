"""Reading images: size without decoding, decode + resize + center crop, pixels in [-1, 1].

Cameras store portrait photos as landscape pixels plus an EXIF orientation tag; viewers (and users)
see them upright, so sizes and pixels both follow the tag. It is read for the formats that carry it
in practice (JPEG, WebP, TIFF): for those, PIL opens the header (~0.1 ms), the rest keep imagesize.
"""

from __future__ import annotations

import imagesize
import numpy as np
import torch
from PIL import Image, ImageOps

from library.dataset.buckets import Size, center_crop_offsets
from library.errors import UserError


EXIF_FORMATS = (".jpg", ".jpeg", ".webp", ".tif", ".tiff")
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # orientations that turn the stored image by 90 degrees


def _follows_exif(path: str) -> bool:
    return path.lower().endswith(EXIF_FORMATS)


def _exif_size(path: str) -> Size:
    """Stored size and EXIF orientation from one PIL header read, turned as the image is seen."""
    try:
        with Image.open(path) as image:
            (width, height), orientation = image.size, int(image.getexif().get(_ORIENTATION_TAG, 1))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def image_size(path: str) -> Size:
    """(width, height) as the image is seen (EXIF orientation applied), without decoding the pixels."""
    if _follows_exif(path):
        width, height = _exif_size(path)
    else:
        try:
            width, height = imagesize.get(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
    if width <= 0 or height <= 0:
        raise UserError(f"cannot read the size of image {path}: not a valid image file; remove or re-save it")
    return (int(width), int(height))


def load_rgb(path: str) -> Image.Image:
    """Decode an image as RGB (an alpha channel is dropped, as kohya does without --alpha_mask)."""
    try:
        with Image.open(path) as image:
            image.load()
            if _follows_exif(path):
                image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}") from None


def resize_and_crop(image: Image.Image, resized: Size, bucket: Size) -> Image.Image:
    """Resize to `resized` (covering `bucket`), then cut the centered bucket-sized window.

    Downscaling uses area averaging (BOX, like kohya's cv2.INTER_AREA); upscaling uses Lanczos.
    """
    if image.size != tuple(resized):
        shrinking = resized[0] * resized[1] < image.size[0] * image.size[1]
        method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
        image = image.resize(tuple(resized), method)
    left, top = center_crop_offsets(image.size, bucket)
    if image.size != tuple(bucket):
        image = image.crop((left, top, left + bucket[0], top + bucket[1]))
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) with 0 -> -1.0 and 255 -> 1.0."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_pixels(path: str, resized: Size, bucket: Size) -> torch.Tensor:
    """The training pixels of one image: decoded, resized, center-cropped to `bucket`, in [-1, 1]."""
    return to_tensor(resize_and_crop(load_rgb(path), resized, bucket))
