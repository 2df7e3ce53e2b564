"""Dataset folders in kohya's DreamBooth layout: `<train_data_dir>/<repeats>_<concept>/image.png`.

Each sub-folder is a subset: the number before the first `_` is how many times its images are
seen per epoch, the rest of the name is the class token, the caption of any image without a
caption file. `--reg_data_dir` has the same layout; its subsets hold regularisation images.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from library.dataset.captions import normalize_extension, read_caption
from library.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LAYOUT = "<train_data_dir>/<repeats>_<concept>/image.png + image.caption"


@dataclass
class Subset:
    """One `<repeats>_<concept>` folder: its images and their resolved captions."""

    image_dir: str
    num_repeats: int
    class_tokens: str
    is_reg: bool = False
    image_paths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    num_caption_files: int = 0

    @property
    def name(self) -> str:
        """The folder name, the key kohya uses in ss_dataset_dirs and ss_tag_frequency."""
        return os.path.basename(os.path.normpath(self.image_dir))

    @property
    def img_count(self) -> int:
        return len(self.image_paths)


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """`10_my concept` -> (10, "my concept"); None when the name does not start with a number."""
    head, _, rest = name.partition("_")
    try:
        return int(head), rest
    except ValueError:
        return None


def list_images(folder: str) -> list[str]:
    """Image files directly in `folder` (not recursive), extensions matched case-insensitively, sorted."""
    names = sorted(os.listdir(folder))
    return [
        os.path.join(folder, n)
        for n in names
        if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, n))
    ]


def load_subset(image_dir: str, num_repeats: int, class_tokens: str, caption_extension: str, is_reg=False) -> Subset:
    """Read one folder: image paths and captions (caption file, else the class token)."""
    subset = Subset(image_dir, num_repeats, class_tokens, is_reg)
    missing = 0
    for path in list_images(image_dir):
        caption = read_caption(path, caption_extension)
        if caption is None:
            missing += 1
            caption = class_tokens
        else:
            subset.num_caption_files += 1
        subset.image_paths.append(path)
        subset.captions.append(caption)
    if missing:
        used = f"the class token '{class_tokens}'" if class_tokens else "an empty caption"
        logger.warning("%d of %d images in %s have no %s file: they use %s",
                       missing, subset.img_count, image_dir, caption_extension, used)
    return subset


def _has_txt_captions(subsets: list[Subset]) -> bool:
    return any(os.path.isfile(os.path.splitext(p)[0] + ".txt") for s in subsets for p in s.image_paths)


def discover_subsets(train_data_dir: str, caption_extension: str = ".caption", is_reg: bool = False) -> list[Subset]:
    """Every `<repeats>_<concept>` sub-folder of train_data_dir that holds images, sorted by name.

    Folders whose name does not start with a number, or with fewer than 1 repeat, are skipped with
    a warning. Raises UserError when the folder is missing. With is_reg (the folder of --reg_data_dir)
    the subsets are regularisation images, and a folder without any only warns, as in kohya:
    training without regularisation images is a normal run.
    """
    option = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not train_data_dir or not os.path.isdir(train_data_dir):
        raise UserError(f"{option} {train_data_dir}: folder not found (expected layout: {LAYOUT})")
    extension = normalize_extension(caption_extension)
    subsets = []
    for name in sorted(os.listdir(train_data_dir)):
        folder = os.path.join(train_data_dir, name)
        if os.path.isdir(folder):
            subset = _folder_subset(folder, name, extension, is_reg)
            if subset is not None:
                subsets.append(subset)
    loose = " (images directly in it are not used: move them into a sub-folder)" if list_images(train_data_dir) else ""
    if not subsets and is_reg:
        logger.warning("no regularization images found in %s%s; expected layout: %s", train_data_dir, loose, LAYOUT)
    elif not subsets:
        raise UserError(f"no training images found in {train_data_dir}{loose}; expected layout: {LAYOUT}")
    if extension != ".txt" and not any(s.num_caption_files for s in subsets) and _has_txt_captions(subsets):
        logger.warning("no %s caption files found, but .txt files are next to the images: "
                       "pass --caption_extension .txt to use them", extension)
    return subsets


def _folder_subset(folder: str, name: str, extension: str, is_reg: bool) -> Subset | None:
    """The subset of one sub-folder, or None (with a warning) when kohya would skip it."""
    parsed = parse_folder_name(name)
    if parsed is None:
        logger.warning("skipping folder %s: its name does not start with a repeat count like 10_%s", folder, name)
        return None
    if parsed[0] < 1:
        logger.warning("skipping folder %s: repeat count %d is less than 1", folder, parsed[0])
        return None
    subset = load_subset(folder, parsed[0], parsed[1], extension, is_reg)
    if not subset.image_paths:
        logger.warning("skipping folder %s: no images (%s)", folder, " ".join(IMAGE_EXTENSIONS))
        return None
    return subset
