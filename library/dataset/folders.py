"""Dataset folders in kohya's DreamBooth layout: `<train_data_dir>/<repeats>_<concept>/image.png`.

Each sub-folder is a subset: the number before the first `_` is how many times its images are
seen per epoch, the rest of the name is the class token, the caption of any image without a
caption file. `--reg_data_dir` has the same layout; its subsets hold regularisation images.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from library.dataset.buckets import Size
from library.dataset.captions import normalize_extension, read_caption
from library.dataset.image_check import inspect_image
from library.dataset.images import IMAGE_EXTENSIONS, Augmentation
from library.dataset.masks import MaskSource, is_mask_file
from library.errors import UserError

logger = logging.getLogger(__name__)

LAYOUT = "<train_data_dir>/<repeats>_<concept>/image.png + image.caption"


@dataclass
class Subset:
    """One `<repeats>_<concept>` folder (or one metadata_file, see finetune.py): its images, their sizes
    (as seen, from the scan) and their resolved captions; a dataset config may give it its own
    augmentation and mask settings (None: the dataset's)."""

    image_dir: str | None
    num_repeats: int
    class_tokens: str
    is_reg: bool = False
    image_paths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    num_caption_files: int = 0
    skipped_images: list[str] = field(default_factory=list)  # "path (why)", left out by --skip_bad_images
    sizes: list[Size] = field(default_factory=list)  # one per image, read while checking it
    metadata_file: str | None = None  # a fine-tuning subset's metadata JSON
    tag_texts: list[str] | None = None  # what ss_tag_frequency counts when not the captions (fine-tuning)
    buckets: list[Size] | None = None  # the metadata's train_resolution per image, when every entry has one
    augment: Augmentation | None = None
    masks: MaskSource | None = None

    @property
    def name(self) -> str:
        """The key kohya uses in ss_dataset_dirs and ss_tag_frequency: the folder name, or the
        metadata file's name for a fine-tuning subset."""
        return os.path.basename(os.path.normpath(self.metadata_file or self.image_dir))

    @property
    def label(self) -> str:
        """Where the subset comes from, as the report shows it: the metadata file, else the folder."""
        return self.metadata_file or self.image_dir

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
        and not is_mask_file(n)  # OneTrainer's <stem>-masklabel.png belongs to <stem>'s image
    ]


def usable_images(paths: list[str], skip_bad_images: bool, skipped: list[str]) -> dict[str, Size]:
    """{path: size} of the images that pass image_check (in `paths` order); bad ones raise one UserError
    naming them, or with skip_bad_images are appended to `skipped` as "path (why)" and left out."""
    usable, bad = {}, []
    for path in paths:
        size, problem = inspect_image(path)
        if problem is None:
            usable[path] = size
        else:
            bad.append(f"{path} ({problem})")
    if bad and not skip_bad_images:
        more = f"; {len(bad) - 1} more in that folder" if len(bad) > 1 else ""
        raise UserError(f"cannot use image {bad[0]}{more}: fix or remove it, or pass --skip_bad_images")
    skipped.extend(bad)
    return usable


def load_subset(image_dir: str, num_repeats: int, class_tokens: str, caption_extension: str, is_reg=False,
                skip_bad_images: bool = False) -> Subset:
    """Read one folder: image paths and captions (caption file, else the class token).

    Every image is checked (library.dataset.image_check): a bad one stops the run here, before anything is
    written, unless skip_bad_images (then it is listed in subset.skipped_images; see warn_skipped_images).
    """
    subset = Subset(image_dir, num_repeats, class_tokens, is_reg)
    missing = 0
    for path, size in usable_images(list_images(image_dir), skip_bad_images, subset.skipped_images).items():
        caption = read_caption(path, caption_extension)
        if caption is None:
            missing += 1
            caption = class_tokens
        else:
            subset.num_caption_files += 1
        subset.image_paths.append(path)
        subset.sizes.append(size)
        subset.captions.append(caption)
    if missing:
        used = f"the class token '{class_tokens}'" if class_tokens else "an empty caption"
        logger.warning("%d of %d images in %s have no %s file: they use %s",
                       missing, subset.img_count, image_dir, caption_extension, used)
    return subset


def _has_txt_captions(subsets: list[Subset]) -> bool:
    return any(os.path.isfile(os.path.splitext(p)[0] + ".txt") for s in subsets for p in s.image_paths)


def discover_subsets(train_data_dir: str, caption_extension: str = ".caption", is_reg: bool = False,
                     skip_bad_images: bool = False) -> list[Subset]:
    """Every `<repeats>_<concept>` sub-folder of train_data_dir that holds images, sorted by name.

    Folders whose name does not start with a number, with fewer than 1 repeat, or without usable
    images are skipped with a warning, as in kohya. Raises UserError when the folder is missing or no
    sub-folder is left, and for a bad image unless skip_bad_images (see load_subset). With is_reg
    (the folder of --reg_data_dir) the subsets are regularisation images, and a folder without any
    only warns, as in kohya: training without regularisation images is a normal run.
    """
    option = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not train_data_dir or not os.path.isdir(train_data_dir):
        raise UserError(f"{option} {train_data_dir}: folder not found (expected layout: {LAYOUT})")
    extension = normalize_extension(caption_extension)
    names = [n for n in sorted(os.listdir(train_data_dir)) if os.path.isdir(os.path.join(train_data_dir, n))]
    loaded = [_folder_subset(os.path.join(train_data_dir, n), n, extension, is_reg, skip_bad_images) for n in names]
    loaded = [s for s in loaded if s is not None]
    warn_skipped_images(loaded)
    subsets = [s for s in loaded if s.image_paths]
    if not subsets:
        _no_subsets(train_data_dir, is_reg, names)
    if extension != ".txt" and not any(s.num_caption_files for s in subsets) and _has_txt_captions(subsets):
        logger.warning("no %s caption files found, but .txt files are next to the images: "
                       "pass --caption_extension .txt to use them", extension)
    return subsets


def _no_subsets(data_dir: str, is_reg: bool, folders: list[str]) -> None:
    """No usable sub-folder: a warning for the regularisation folder, else the UserError saying why."""
    why = f" (skipped sub-folders: {', '.join(folders)})" if folders else ""
    if list_images(data_dir):
        why += " (images directly in it are not used: move them into a sub-folder)"
    if is_reg:
        logger.warning("no regularization images found in %s%s; expected layout: %s", data_dir, why, LAYOUT)
    else:
        raise UserError(f"no training images found in {data_dir}{why}; expected layout: {LAYOUT}")


def warn_skipped_images(subsets: list[Subset]) -> None:
    """One warning listing every image --skip_bad_images left out of these subsets."""
    skipped = [entry for subset in subsets for entry in subset.skipped_images]
    if skipped:
        logger.warning("--skip_bad_images: skipping %d images that cannot be used: %s", len(skipped), "; ".join(skipped))


def _folder_subset(folder: str, name: str, extension: str, is_reg: bool, skip_bad_images: bool) -> Subset | None:
    """The subset of one sub-folder (maybe without images, with a warning), or None when kohya would skip it."""
    parsed = parse_folder_name(name)
    if parsed is None:
        logger.warning("skipping folder %s: its name does not start with a repeat count like 10_%s", folder, name)
        return None
    if parsed[0] < 1:
        logger.warning("skipping folder %s: repeat count %d is less than 1 (kohya skips it too; "
                       "rename it to 1_%s or more to train on it)", folder, parsed[0], parsed[1])
        return None
    subset = load_subset(folder, parsed[0], parsed[1], extension, is_reg, skip_bad_images)
    if not subset.image_paths:
        none = "no usable images" if subset.skipped_images else f"no images ({' '.join(IMAGE_EXTENSIONS)})"
        logger.warning("skipping folder %s: %s", folder, none)
    return subset
