"""The subsets a command line names when there is no --dataset_config, as kohya's train_network builds them.

- `--train_data_dir` holds `<repeats>_<concept>` folders (DreamBooth style), `--reg_data_dir` likewise;
- `--in_json meta.json` makes one fine-tuning subset instead: its entries' images under
  `--train_data_dir`, `--dataset_repeats` repeats each (kohya ignores --reg_data_dir then, with a warning);
- `--conditioning_data_dir` (with `--masked_loss`) holds kohya's mask images for the training images:
  for a `<repeats>_<concept>` folder, in the sub-folder of the same name when there is one, else directly
  in it (kohya's train_network reads it only from a dataset config).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from library.dataset.folders import Subset, discover_subsets
from library.dataset.masks import MaskSource, conditioning_masks
from library.errors import UserError

logger = logging.getLogger(__name__)


def command_line_subsets(cfg, masks: MaskSource) -> list[Subset]:
    """The subsets of --train_data_dir / --reg_data_dir, or of --in_json; `masks` is the run's mask source,
    which --conditioning_data_dir extends for the training subsets."""
    skip = bool(getattr(cfg, "skip_bad_images", False))
    if getattr(cfg, "in_json", None):
        subsets = [_metadata_subset(cfg, skip)]
    else:
        if not getattr(cfg, "train_data_dir", None):
            raise UserError("--train_data_dir is required: a folder holding <repeats>_<concept> sub-folders of images")
        extension = getattr(cfg, "caption_extension", ".caption") or ".caption"
        subsets = discover_subsets(cfg.train_data_dir, extension, skip_bad_images=skip)
        if getattr(cfg, "reg_data_dir", None):  # "" is off, as GUI-written files hold it
            subsets += discover_subsets(cfg.reg_data_dir, extension, is_reg=True, skip_bad_images=skip)
    attach_conditioning(cfg, [s for s in subsets if not s.is_reg], masks)
    return subsets


def _metadata_subset(cfg, skip_bad_images: bool) -> Subset:
    from library.dataset.finetune import load_metadata_subset
    from library.dataset.folders import warn_skipped_images

    if getattr(cfg, "reg_data_dir", None):
        logger.warning("--reg_data_dir is ignored with --in_json, as in kohya: fine-tuning subsets have no "
                       "regularization images")
    repeats = int(getattr(cfg, "dataset_repeats", 1) or 1)
    if repeats < 1:
        raise UserError(f"--dataset_repeats {repeats}: must be at least 1")
    subset = load_metadata_subset(cfg.in_json, getattr(cfg, "train_data_dir", None), repeats,
                                  getattr(cfg, "caption_separator", ",") or ",", skip_bad_images, "--in_json ")
    warn_skipped_images([subset])
    if not subset.image_paths:
        raise UserError(f"--in_json {cfg.in_json}: no usable images in it")
    return subset


def attach_conditioning(cfg, subsets: list[Subset], masks: MaskSource) -> None:
    """Give `subsets` the masks of --conditioning_data_dir (see the module doc); one line when an image
    has none."""
    folder = getattr(cfg, "conditioning_data_dir", None)
    if not folder:
        return
    if not getattr(cfg, "masked_loss", False):
        raise UserError("--conditioning_data_dir holds loss masks: add --masked_loss to train with them")
    if not os.path.isdir(folder):
        raise UserError(f"--conditioning_data_dir {folder}: folder not found")
    groups: dict[str, list[Subset]] = {}
    for subset in subsets:
        own = os.path.join(folder, os.path.basename(os.path.normpath(subset.image_dir or "")))
        groups.setdefault(own if subset.image_dir and os.path.isdir(own) else folder, []).append(subset)
    for mask_dir, members in groups.items():
        found = conditioning_masks([p for s in members for p in s.image_paths], mask_dir)
        for subset in members:
            subset.masks = replace(masks, conditioning=found)
