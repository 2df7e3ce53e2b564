"""Loss masks: which parts of an image the loss learns from (white = learn, black = ignore, grey between).

Three sources, as the tools people come from write them:
- kohya's `conditioning_data_dir` (with --masked_loss): a folder holding, for every image, an image of
  the same stem (any image extension) and size whose red channel is the mask, 255 = learn;
- OneTrainer's `<stem>-masklabel.png` next to the image (read with --masked_loss);
- the image's own alpha channel (kohya's --alpha_mask; an image without one is learnt everywhere).
They are tried in that order. A dataset config sets alpha_mask and conditioning_data_dir per subset, so
each record may carry its own MaskSource. A mask goes through the same resize, crop
and flip as its image, then is area-averaged down to the latent size (kohya's `mode="area"`), so a
dataset item carries a (1, H/8, W/8) mask in [0, 1] per sample.

OneTrainer's unmasked probability (a share of the samples trained with no mask at all) is drawn here,
per occurrence, so it works the same with cached latents and for every model.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from library.dataset.buckets import Size
from library.dataset.images import IMAGE_EXTENSIONS, _follows_exif, resize_and_crop
from library.errors import UserError

logger = logging.getLogger(__name__)

MASK_SUFFIX = "-masklabel.png"
LATENT_STRIDE = 8


def mask_path(image_path: str) -> str:
    """OneTrainer's mask file of an image: `<stem>-masklabel.png` in the same folder."""
    return os.path.splitext(image_path)[0] + MASK_SUFFIX


def is_mask_file(name: str) -> bool:
    """A mask file is never a training image of its own."""
    return name.lower().endswith(MASK_SUFFIX)


@dataclass(frozen=True)
class MaskSource:
    """Where masks come from (see the module doc) and the share of samples trained without one.
    `conditioning` maps image paths to their conditioning_data_dir mask (see conditioning_masks)."""

    masklabel: bool = False
    alpha: bool = False
    unmasked_probability: float = 0.0
    conditioning: Mapping[str, str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_cfg(cls, cfg, check_face_crop: bool = True) -> "MaskSource":
        """The run's mask source (--masked_loss, --alpha_mask, the unmasked probability); with
        check_face_crop, --face_crop_aug_range is refused alongside (a dataset config checks per subset)."""
        probability = float(getattr(cfg, "masked_loss_unmasked_probability", 0.0) or 0.0)
        if not 0.0 <= probability <= 1.0:
            raise UserError(f"--masked_loss_unmasked_probability {probability}: expected a value from 0 to 1")
        weight = float(getattr(cfg, "masked_loss_unmasked_weight", 0.0) or 0.0)
        if not 0.0 <= weight <= 1.0:
            raise UserError(f"--masked_loss_unmasked_weight {weight}: expected a value from 0 to 1")
        source = cls(bool(getattr(cfg, "masked_loss", False)), bool(getattr(cfg, "alpha_mask", False)), probability)
        if check_face_crop:
            source.check_face_crop(getattr(cfg, "face_crop_aug_range", None), "--")
        return source

    def check_face_crop(self, face_crop_range, where: str = "") -> None:
        """The mask follows resize, crop and flip, but not the face-crop window yet. `where` starts the
        message (a dataset config's file and table, or "--" for the command line)."""
        if self.enabled and face_crop_range:
            raise UserError(f"{where}face_crop_aug_range cannot be combined with masks (--masked_loss, "
                            "alpha_mask, conditioning_data_dir) yet")

    @property
    def enabled(self) -> bool:
        return self.masklabel or self.alpha or self.conditioning is not None

    def kind(self, image_path: str) -> str:
        """'conditioning', 'masklabel', 'alpha' or 'none' (learnt everywhere) for one image."""
        if self.conditioning is not None and image_path in self.conditioning:
            return "conditioning"
        if self.masklabel and os.path.isfile(mask_path(image_path)):
            return "masklabel"
        return "alpha" if self.alpha else "none"

    def mask_file(self, image_path: str) -> str | None:
        """The file holding an image's mask, when it is not the image itself."""
        kind = self.kind(image_path)
        if kind == "conditioning":
            return self.conditioning[image_path]
        return mask_path(image_path) if kind == "masklabel" else None

    def identity(self, image_path: str) -> dict:
        """What decides an image's mask besides its own bytes: a latent cache holding another is stale."""
        kind, path = self.kind(image_path), self.mask_file(image_path)
        if path is None:
            return {"kind": kind}
        info = os.stat(path)
        return {"kind": kind, "bytes": info.st_size, "mtime_ns": info.st_mtime_ns}

    def load(self, image_path: str, image_size: Size) -> Image.Image | None:
        """The mask at the image's size (mode "L"), or None where the image is learnt everywhere."""
        kind = self.kind(image_path)
        if kind in ("conditioning", "masklabel"):
            return _read_mask_file(self.mask_file(image_path), image_size, red=kind == "conditioning")
        if kind == "alpha":
            return _read_alpha(image_path)
        return None

    def drops_mask(self, rng: random.Random) -> bool:
        """Whether this occurrence trains without its mask (OneTrainer's unmasked probability)."""
        return self.unmasked_probability > 0 and rng.random() < self.unmasked_probability


NO_MASKS = MaskSource()


def conditioning_masks(image_paths: list[str], folder: str, where: str = "") -> dict[str, str]:
    """kohya's conditioning_data_dir: {image path: its mask}, the image of the same stem in `folder`
    (any image extension; the first in name order when there are several). An image without one is an
    error naming it, as in kohya; files that belong to no image only warn (kohya refuses them too, but
    an unused mask changes nothing)."""
    if not os.path.isdir(folder):
        raise UserError(f"{where}conditioning_data_dir {folder}: folder not found")
    by_stem: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, name)):
            by_stem.setdefault(stem, os.path.join(folder, name))
    found, missing = {}, []
    for path in image_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in by_stem:
            found[path] = by_stem[stem]
        else:
            missing.append(path)
    if missing:
        more = f" ({len(missing) - 1} more images have none)" if len(missing) > 1 else ""
        stem = os.path.splitext(os.path.basename(missing[0]))[0]
        raise UserError(f"{where}no mask for image {missing[0]} in conditioning_data_dir {folder}: add "
                        f"{stem}.png (its red channel is the mask){more}")
    unused = sorted(set(by_stem.values()) - set(found.values()))
    if unused:
        logger.warning("%d files in conditioning_data_dir %s belong to no training image and are not used: %s",
                       len(unused), folder, ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""))
    return found


def _read_mask_file(path: str, image_size: Size, red: bool = False) -> Image.Image:
    """A mask image as mode "L": its grey value, or its red channel (kohya's conditioning images)."""
    try:
        with Image.open(path) as image:
            image.load()
            mask = image.convert("RGB").getchannel("R") if red else image.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode mask {path}: {exc}") from None
    if mask.size != tuple(image_size):
        raise UserError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is "
                        f"{image_size[0]}x{image_size[1]}: make them the same size")
    return mask


def _read_alpha(path: str) -> Image.Image | None:
    """The alpha channel as the image is seen (EXIF orientation applied); None without one."""
    try:
        with Image.open(path) as image:
            image.load()
            if _follows_exif(path):
                image = ImageOps.exif_transpose(image)
            if "A" not in image.getbands() and "transparency" not in image.info:
                return None
            return image.convert("RGBA").getchannel("A")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}") from None


def mask_pixels(mask: Image.Image, resized: Size, bucket: Size, interpolation: str | None = None,
                offsets: tuple[int, int] | None = None, flip: bool = False) -> torch.Tensor:
    """A mask resized, cropped and mirrored as its image is (images.load_pixels): (H, W) in [0, 1]."""
    mask = resize_and_crop(mask, resized, bucket, interpolation, offsets)
    if flip:
        mask = ImageOps.mirror(mask)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def to_latent_size(mask: torch.Tensor, stride: int = LATENT_STRIDE) -> torch.Tensor:
    """(H, W) pixel mask -> (1, H/stride, W/stride): the area average of each latent cell's pixels."""
    height, width = mask.shape[-2:]
    small = F.interpolate(mask.reshape(1, 1, height, width).float(), size=(height // stride, width // stride),
                          mode="area")
    return small[0]


def full_mask(bucket: Size, stride: int = LATENT_STRIDE) -> torch.Tensor:
    """The latent-size mask of an image learnt everywhere."""
    return torch.ones(1, bucket[1] // stride, bucket[0] // stride)


def latent_mask(source: MaskSource, image_path: str, image_size: Size, resized: Size, bucket: Size,
                interpolation: str | None = None, offsets: tuple[int, int] | None = None,
                flip: bool = False) -> torch.Tensor:
    """One image's latent-size mask (1, h, w): ones where the source gives none."""
    mask = source.load(image_path, image_size)
    if mask is None:
        return full_mask(bucket)
    return to_latent_size(mask_pixels(mask, resized, bucket, interpolation, offsets, flip))
