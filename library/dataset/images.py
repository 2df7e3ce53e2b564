"""Reading images: size without decoding, decode + resize + crop + augmentation, pixels in [-1, 1].

Cameras store portrait photos as landscape pixels plus an EXIF orientation tag; viewers (and users)
see them upright, so sizes and pixels both follow the tag. It is read for the formats that carry it
in practice (JPEG, WebP, TIFF): for those, PIL opens the header (~0.1 ms), the rest keep imagesize.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import imagesize
import numpy as np
import torch
from PIL import Image, ImageOps

from library.dataset.buckets import Size, center_crop_offsets
from library.errors import UserError


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # matched case-insensitively

# kohya v0.10's --resize_interpolation names. kohya resizes with cv2 except for lanczos and box; sdtune
# resizes with PIL only, so each cv2 filter maps to its PIL counterpart (cv2's INTER_AREA is an area
# average: PIL's BOX; cv2's INTER_NEAREST_EXACT picks the same pixels as PIL's NEAREST).
INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}

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


@dataclass(frozen=True)
class Augmentation:
    """How training pixels are made from an image besides its bucket: kohya's per-sample augmentations.

    `flip` mirrors half of the samples, `color` is kohya's weak colour jitter (color_aug), `random_crop`
    cuts a random bucket-sized window instead of the centred one, `interpolation` overrides the resize
    filter (None: area average when shrinking, Lanczos when enlarging, as kohya), `face_crop_range`
    (face_crop_aug_range) crops images named with face coordinates around the face (see face_crop_window).
    """

    flip: bool = False
    color: bool = False
    random_crop: bool = False
    interpolation: str | None = None
    face_crop_range: tuple[float, float] | None = None

    @classmethod
    def from_cfg(cls, cfg) -> "Augmentation":
        interpolation = getattr(cfg, "resize_interpolation", None) or None
        if interpolation is not None and interpolation not in INTERPOLATIONS:
            raise UserError(f"--resize_interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        return cls(bool(getattr(cfg, "flip_aug", False)), bool(getattr(cfg, "color_aug", False)),
                   bool(getattr(cfg, "random_crop", False)), interpolation,
                   parse_face_crop_range(getattr(cfg, "face_crop_aug_range", None)))

    @property
    def changes_pixels_per_sample(self) -> bool:
        """True when one image gives other pixels at each draw, so latents encoded once cannot stand in."""
        return self.color or self.random_crop or self.face_crop_range is not None


PLAIN = Augmentation()


def parse_face_crop_range(value) -> tuple[float, float] | None:
    """--face_crop_aug_range "2.0,4.0" (or a TOML [2.0, 4.0]) -> (2.0, 4.0); None or "" -> None."""
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        low, high = (float(part) for part in parts)
    except (TypeError, ValueError):
        raise UserError(f"--face_crop_aug_range {value!r}: expected two numbers, e.g. 2.0,4.0") from None
    if not 0 < low <= high:
        raise UserError(f"--face_crop_aug_range {value!r}: expected 0 < low <= high, e.g. 2.0,4.0")
    return (low, high)


def face_box(path: str) -> tuple[int, int, int, int] | None:
    """(centre x, centre y, width, height) of the face from kohya's face-crop file naming
    `name_cx_cy_w_h.png` (pixels of the image as seen), or None when the name does not carry one."""
    parts = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(parts) < 5:
        return None
    try:
        cx, cy, width, height = (int(part) for part in parts[-4:])
    except ValueError:
        return None
    return (cx, cy, width, height) if cx > 0 and max(width, height) > 0 else None


def resample_filter(interpolation: str | None, shrinking: bool) -> Image.Resampling:
    """The PIL filter for a resize: the named one, else area averaging (BOX, like kohya's cv2.INTER_AREA)
    when shrinking and Lanczos when enlarging."""
    if interpolation is None:
        return Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return INTERPOLATIONS[interpolation]  # names were checked by Augmentation.from_cfg


def random_crop_offsets(resized: Size, bucket: Size, rng: random.Random) -> tuple[int, int]:
    """(left, top) of a random bucket-sized window inside the resized image: each side's overhang drawn
    uniformly from 0..overhang inclusive, width first (kohya's random_crop)."""
    left = rng.randint(0, max(0, resized[0] - bucket[0]))
    top = rng.randint(0, max(0, resized[1] - bucket[1]))
    return (left, top)


def face_crop_window(size: Size, face: tuple[int, int, int, int], bucket: Size, crop_range: tuple[float, float],
                     random_crop: bool, rng: random.Random) -> tuple[Size, tuple[int, int]]:
    """kohya's face crop (crop_target): the size to resize the image to and the (left, top) of the
    bucket-sized window, so that the bucket's short side is `factor` face sizes, factor drawn uniformly
    from crop_range. The scale never enlarges (kohya) unless the image must grow to cover the bucket
    (kohya stops there instead); the window is centred on the face, jittered by up to 1/20 of the face
    for a range and a face of at least 40 px and a tenth of the short side, or with random_crop shifted
    by a triangular draw that often shows background. Heights are drawn before widths, as kohya does.
    """
    (width, height), (cx, cy, face_w, face_h) = size, face
    face_size, short = max(face_w, face_h), min(bucket)
    cover = max(bucket[0] / width, bucket[1] / height)
    low = max(cover, min(1.0, short / (face_size * crop_range[1])))
    high = max(low, min(1.0, short / (face_size * crop_range[0])))
    scale = low if low >= high else rng.uniform(low, high)
    resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
    starts = {}
    for axis, target, length, centre in ((1, bucket[1], resized[1], int(cy * scale + 0.5)),
                                         (0, bucket[0], resized[0], int(cx * scale + 0.5))):
        start = centre - target // 2
        if random_crop:
            reach = max(length - centre, centre)
            start += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif crop_range[0] != crop_range[1] and face_size > short // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        starts[axis] = max(0, min(start, length - target))
    return resized, (starts[0], starts[1])


def resize_and_crop(image: Image.Image, resized: Size, bucket: Size, interpolation: str | None = None,
                    offsets: tuple[int, int] | None = None) -> Image.Image:
    """Resize to `resized` (covering `bucket`), then cut the bucket-sized window at `offsets` (default:
    centred). The filter is `interpolation` when given, else see resample_filter."""
    if image.size != tuple(resized):
        shrinking = resized[0] * resized[1] < image.size[0] * image.size[1]
        image = image.resize(tuple(resized), resample_filter(interpolation, shrinking))
    left, top = offsets if offsets is not None else center_crop_offsets(image.size, bucket)
    if image.size != tuple(bucket):
        image = image.crop((left, top, left + bucket[0], top + bucket[1]))
    return image


# kohya's color_aug (AugHelper, after albumentations' OneOf(HueSaturationValue(8, 0, 0), RandomGamma((95, 105)),
# p=0.33)): a third of the samples change, half of those by a hue shift of up to 8 OpenCV hue units
# (2 degrees each, so +-16 degrees), the other half by a gamma in [0.95, 1.05].
COLOR_AUG_P = 0.33
HUE_SHIFT_DEGREES = 16.0
GAMMA_RANGE = (0.95, 1.05)


def color_aug(image: Image.Image, rng: random.Random) -> Image.Image:
    """kohya's weak colour augmentation (see the constants above), with PIL and numpy instead of cv2.

    The gamma is applied to values scaled to 0..1, as albumentations' RandomGamma (which kohya meant to
    replace) does; kohya raises the raw 0..255 values to the power, which shifts brightness by up to a
    quarter instead of bending the tone curve.
    """
    if rng.random() > COLOR_AUG_P:
        return image
    if rng.random() > 0.5:
        degrees = rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES)
        hsv = np.asarray(image.convert("HSV")).copy()  # PIL's hue: 255 units a full turn (255 is red again)
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(degrees * 255 / 360)) % 255
        return Image.frombytes("HSV", image.size, hsv.tobytes()).convert("RGB")
    gamma = rng.uniform(*GAMMA_RANGE)
    table = [min(255, round(255 * (v / 255) ** gamma)) for v in range(256)]
    return image.point(table * 3)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) with 0 -> -1.0 and 255 -> 1.0."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_pixels(path: str, resized: Size, bucket: Size, augment: Augmentation = PLAIN,
                rng: random.Random | None = None, flip: bool = False) -> torch.Tensor:
    """The training pixels of one image in [-1, 1]: decoded, resized, cropped to `bucket`, then (kohya's
    order) colour-augmented and mirrored. `rng` draws the crop window and the colour change; it is needed
    when augment.random_crop, augment.color or augment.face_crop_range is on. With face_crop_range, an
    image named with face coordinates is resized and cut by face_crop_window instead. Whether to flip
    is the caller's draw."""
    if augment.changes_pixels_per_sample and rng is None:
        raise ValueError("random_crop, color_aug and face_crop_aug_range need a random source")
    face = face_box(path) if augment.face_crop_range else None
    image = load_rgb(path)
    if face is not None:
        resized, offsets = face_crop_window(image.size, face, bucket, augment.face_crop_range, augment.random_crop, rng)
    else:
        offsets = random_crop_offsets(resized, bucket, rng) if augment.random_crop else None
    image = resize_and_crop(image, resized, bucket, augment.interpolation, offsets)
    if augment.color:
        image = color_aug(image, rng)
    if flip:
        image = ImageOps.mirror(image)
    return to_tensor(image)
