"""Condition-image decoding, output encoding and chunking."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from decoder_service.domain import ImageFormat
from decoder_service.images import chunks, decode_condition_image, encode_image
from servekit.errors import InvalidRequest

pytestmark = pytest.mark.unit


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


NOISE = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 72, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_condition_images_decode_to_rgb(fmt):
    image = decode_condition_image(encoded(NOISE, fmt), 0)
    assert image.mode == "RGB" and image.size == (72, 40)


def test_png_condition_image_is_exact_and_rgba_becomes_rgb():
    assert np.array_equal(np.asarray(decode_condition_image(encoded(NOISE, "PNG"), 0)), np.asarray(NOISE))
    rgba = decode_condition_image(encoded(NOISE.convert("RGBA"), "PNG"), 0)
    assert rgba.mode == "RGB"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not an image at all", r"condition_images\[2\] could not be decoded as PNG, JPEG or WebP"),
        (encoded(NOISE, "PNG")[:200], r"condition_images\[2\] could not be decoded"),
        (encoded(NOISE, "GIF"), r"condition_images\[2\] is GIF; send PNG, JPEG or WebP"),
    ],
)
def test_undecodable_condition_images(data, message):
    with pytest.raises(InvalidRequest, match=message):
        decode_condition_image(data, 2)


@pytest.mark.parametrize(
    ("fmt", "pil"), [(ImageFormat.PNG, "PNG"), (ImageFormat.JPEG, "JPEG"), (ImageFormat.WEBP, "WEBP")]
)
def test_encode(fmt, pil):
    result = encode_image(NOISE, fmt)
    assert result.sha256 == hashlib.sha256(result.data).hexdigest()
    with Image.open(io.BytesIO(result.data)) as image:
        assert image.format == pil and image.size == NOISE.size
    if fmt is ImageFormat.PNG:  # lossless
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.data))), np.asarray(NOISE))


def test_chunks():
    data = bytes(range(256)) * 10
    pieces = list(chunks(data, 1000))
    assert [len(p) for p in pieces] == [1000, 1000, 560]
    assert b"".join(pieces) == data
    assert list(chunks(data, len(data))) == [data]
