"""Fine-tuning subsets: kohya's metadata JSON (`--in_json`, or `metadata_file` in a dataset config).

The file maps image keys to entries, as kohya's finetune/merge_*_to_metadata.py and
prepare_buckets_latents.py write it:

    {"img001": {"caption": "a photo of ...", "tags": "1girl, solo", "train_resolution": [512, 768]}, ...}

An image key is a path to the image (absolute, or relative to the working folder), or a path under the
subset's image_dir without its extension (kohya tries every image extension; the first match in name
order wins). sdtune also accepts a key that names the file under image_dir with its extension.

The training text is the caption, then the caption separator and the tags (kohya's join: "caption,tags");
with tags only, the tags. A caption of several lines is several captions (one drawn per epoch, as for
caption files), each followed by the tags. An entry with neither is an error (kohya trains it with an
empty caption): write "caption": "" for that. `train_resolution`, when every entry has one, is the
entry's bucket, as in kohya (prepare_buckets_latents chose it); otherwise buckets come from the
dataset's resolution and bucket options.

ss_tag_frequency counts the tags of entries that also have a caption, under the metadata file's name
(what kohya records); kohya's latents-only entries (an `.npz` without its image) are not supported.
"""

from __future__ import annotations

import os

from library.dataset.buckets import Size
from library.dataset.folders import Subset, usable_images
from library.dataset.images import IMAGE_EXTENSIONS
from library.errors import UserError


def read_metadata(path: str, where: str = "") -> dict:
    """The metadata JSON as {image key: entry}; a missing, broken or misshapen file is one line."""
    from library.config import read_json  # library.config imports this package

    data = read_json(path, f"{where}metadata file {path}",
                     'an object of image keys, e.g. {"img001": {"caption": "..."}}')
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise UserError(f"{path}: {key!r}: expected an object with \"caption\" and/or \"tags\"")
    return data


class _Listing:
    """Folder contents read once per folder, so finding 10,000 keys costs 10,000 lookups, not stats."""

    def __init__(self):
        self._names: dict[str, set[str]] = {}

    def has(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._names:
            self._names[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return name in self._names[folder]


def find_image(key: str, image_dir: str | None, listing: _Listing) -> str | None:
    """The image file of a metadata key (see the module doc), or None."""
    if os.path.isfile(key):
        return key
    if not image_dir:
        return None
    joined = os.path.join(image_dir, key)
    if os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS and listing.has(joined):
        return joined
    extensions = IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)
    found = sorted(joined + ext for ext in extensions if listing.has(joined + ext))
    return found[0] if found else None


def _text(path: str, key: str, entry: dict, name: str) -> str | None:
    value = entry.get(name)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{path}: {key!r}: \"{name}\" must be a string, not {value!r}")
    return value


def entry_caption(path: str, key: str, entry: dict, separator: str) -> tuple[str, str | None]:
    """(training text, tags counted for ss_tag_frequency) of one entry: see the module doc."""
    caption, tags = _text(path, key, entry, "caption"), _text(path, key, entry, "tags")
    if caption is None and tags is None:
        raise UserError(f"{path}: {key!r}: no \"caption\" or \"tags\": add one (\"caption\": \"\" trains "
                        "the image without a caption)")
    if caption is None:
        return _lines(tags), None
    tags = ", ".join(_lines(tags).split("\n")) if tags else ""  # the tags are one line, as kohya makes them
    if not tags:
        return _lines(caption), None
    lines = _lines(caption).split("\n")
    return "\n".join(f"{line}{separator}{tags}" if line else tags for line in lines), tags


def _lines(text: str) -> str:
    """Non-empty lines, stripped, joined by newlines (as caption files are read)."""
    return "\n".join(line.strip() for line in text.split("\n") if line.strip())


def _train_resolution(path: str, key: str, entry: dict) -> Size | None:
    value = entry.get("train_resolution")
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise UserError(f"{path}: {key!r}: train_resolution = {value!r}: expected [width, height] in pixels")
    return (value[0], value[1])


def load_metadata_subset(metadata_file: str, image_dir: str | None, num_repeats: int, separator: str = ",",
                         skip_bad_images: bool = False, where: str = "") -> Subset:
    """A fine-tuning subset: every entry of the metadata file with its image found and checked.

    A missing image is an error naming the file and the key (the first of them, and how many more);
    a damaged one stops the run as in folders.load_subset, or with skip_bad_images is left out.
    """
    metadata = read_metadata(metadata_file, where)
    listing = _Listing()
    found, missing = {}, []
    for key in metadata:
        image = find_image(key, image_dir, listing)
        if image is None:
            missing.append(key)
        else:
            found[key] = image
    if missing:
        more = f" ({len(missing) - 1} more keys have no image)" if len(missing) > 1 else ""
        folder = f" or under {image_dir}" if image_dir else " (no image_dir / --train_data_dir to look under)"
        raise UserError(f"{metadata_file}: {missing[0]!r}: image not found{folder}{more}")
    subset = Subset(image_dir, num_repeats, "", metadata_file=metadata_file, tag_texts=[])
    sizes = usable_images(list(dict.fromkeys(found.values())), skip_bad_images, subset.skipped_images)
    buckets = []
    for key, image in found.items():
        if image not in sizes:
            continue
        caption, tags = entry_caption(metadata_file, key, metadata[key], separator)
        subset.image_paths.append(image)
        subset.sizes.append(sizes[image])
        subset.captions.append(caption)
        subset.num_caption_files += bool(caption)
        if tags:
            subset.tag_texts.append(tags)
        buckets.append(_train_resolution(metadata_file, key, metadata[key]))
    # kohya uses the metadata's buckets only when every entry has one
    subset.buckets = buckets if buckets and all(b is not None for b in buckets) else None
    return subset
