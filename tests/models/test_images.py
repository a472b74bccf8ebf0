"""The one guarded image reader (:func:`hqrs_geo.models.encode.read_image`) of query, evaluation
and training images: pixels as Pillow reads them, and a one-line error worded for each use."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hqrs_geo.errors import InputError
from hqrs_geo.models import encode
from hqrs_geo.models.encode import read_image
from hqrs_geo.training.data import _decode


@pytest.fixture
def picture(tmp_path):
    """A small RGBA PNG with varied pixels, and its path."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (23, 31, 4), dtype=np.uint8)
    path = tmp_path / "picture.png"
    Image.fromarray(pixels, "RGBA").save(path)
    return str(path)


def test_query_images_are_pillows_rgb_pixels(picture):
    got = read_image(picture)
    with Image.open(picture) as image:
        expected = np.asarray(image.convert("RGB"))
    assert got.dtype == np.uint8 and got.shape == (23, 31, 3)
    np.testing.assert_array_equal(got, expected)
    got[0, 0] = 0  # a writable array of its own


def test_training_images_are_resized_bicubic_into_a_tensor(picture):
    tensor = _decode(picture, 16)
    with Image.open(picture) as image:
        expected = np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.BICUBIC))
    assert tuple(tensor.shape) == (3, 16, 16) and tensor.is_contiguous()
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize(("use", "missing", "unreadable"), [
    ("query", "image file not found; check the path", "give a PNG, JPEG or TIFF file"),
    ("training", "image of the dataset not found; check the paths in the dataset file", "remove it from the dataset"),
])
def test_missing_and_unreadable_files_are_one_line_errors(tmp_path, use, missing, unreadable):
    with pytest.raises(InputError) as info:
        read_image(str(tmp_path / "absent.png"), use=use)
    assert str(info.value) == f"{tmp_path / 'absent.png'}: {missing}"
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(InputError) as info:
        read_image(str(text), use=use)
    message = str(info.value)
    assert message.startswith(f"{text}: cannot read this image (") and message.endswith(f"); {unreadable}")
    assert "\n" not in message


def test_too_large_images_are_refused_before_decoding(picture, monkeypatch):
    monkeypatch.setattr(encode, "MAX_IMAGE_PIXELS", 700)  # the picture declares 23 x 31 = 713 px
    with pytest.raises(InputError, match=r"31 x 23 px is too large for a query \(at most 700 px\); crop the area"):
        read_image(picture)
    with pytest.raises(InputError, match=r"too large for training \(at most 700 px\); resize it or remove it"):
        _decode(picture, 16)


def test_pillows_decompression_bomb_guard_is_a_one_line_error(picture, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # Pillow refuses more than twice its limit on opening
    with pytest.raises(InputError, match=r": image is too large for training; resize it or remove it from the data"):
        read_image(picture, 16, use="training")
