"""A tiny generated dataset for the demo and the tests: colored shapes with captions.

    make_demo_dataset("data")  ->  data/10_shapes/shape_00.png + shape_00.caption, ...

Eight captioned images (six 64x64, two 64x96 portrait ones so that bucketing has two sizes) and
one image without a caption, which trains with the folder's class token "shapes". The same seed
writes the same files. Buckets that separate the two sizes: --resolution 64 --enable_bucket
--min_bucket_reso 32 --max_bucket_reso 128 --bucket_reso_steps 16 (64x96 goes to 48x80).
"""

from __future__ import annotations

import os
import random
import tempfile

from PIL import Image, ImageDraw

FOLDER = "10_shapes"
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = [(64, 64)] * 6 + [(64, 96)] * 2


def draw_shape(size: tuple[int, int], shape: str, color, background) -> Image.Image:
    """One centered shape filling about half of the smaller side."""
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    r = min(width, height) // 4
    cx, cy = width // 2, height // 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return image


def _atomic_write(path: str, write) -> None:
    handle, temp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=os.path.splitext(path)[1])
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _write_text(path: str, text: str) -> None:
    def write(temp):
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    _atomic_write(path, write)


def make_demo_dataset(root: str, seed: int = 0) -> str:
    """Write the demo images under `root/10_shapes/`; returns `root` (the --train_data_dir)."""
    rng = random.Random(seed)
    folder = os.path.join(root, FOLDER)
    os.makedirs(folder, exist_ok=True)
    names = list(COLORS)
    for index, size in enumerate(SIZES + [(64, 64)]):
        shape = SHAPES[index % len(SHAPES)]
        color, background = rng.sample(names, 2)
        image = draw_shape(size, shape, COLORS[color], COLORS[background])
        stem = os.path.join(folder, f"shape_{index:02d}")
        _atomic_write(stem + ".png", image.save)
        if index < len(SIZES):  # the last image has no caption: it uses the class token
            article = "an" if color[0] in "aeiou" else "a"
            _write_text(stem + ".caption", f"{article} {color} {shape} on a {background} background")
    return root
