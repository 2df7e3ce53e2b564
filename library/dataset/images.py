"""Reading images: size without decoding, decode + resize + center crop, pixels in [-1, 1]."""

from __future__ import annotations

import imagesize
import numpy as np
import torch
from PIL import Image

from library.dataset.buckets import Size, center_crop_offsets
from library.errors import UserError


def image_size(path: str) -> Size:
    """(width, height) read from the file header, without decoding the pixels."""
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
