"""Image reading: EXIF orientation is followed by both the size read at scan time and the decoded pixels."""

from __future__ import annotations

import pytest
from PIL import Image

from library.dataset.images import image_size, load_pixels, load_rgb


def _rotated_jpeg(path, orientation):
    """A 64x48 stored image: left half red, right half blue, with an EXIF orientation tag."""
    image = Image.new("RGB", (64, 48), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 48))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)
    return str(path)


def test_orientation_6_is_seen_upright(tmp_path):
    path = _rotated_jpeg(tmp_path / "portrait.jpg", 6)  # "rotate 90 CW to display"
    assert image_size(path) == (48, 64)
    upright = load_rgb(path)
    assert upright.size == (48, 64)
    # the stored left (red) half is on top once turned clockwise, the blue half at the bottom
    top, bottom = upright.getpixel((24, 8)), upright.getpixel((24, 56))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert load_pixels(path, (48, 64), (48, 64)).shape == (3, 64, 48)


@pytest.mark.parametrize("orientation,size", [(1, (64, 48)), (3, (64, 48)), (8, (48, 64))])
def test_sizes_follow_the_tag(tmp_path, orientation, size):
    path = _rotated_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    assert image_size(path) == size == load_rgb(path).size


def test_png_size(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (40, 24)).save(path)
    assert image_size(str(path)) == (40, 24)
