"""Output encoding and chunking."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from decoder_service.domain import ImageFormat
from decoder_service.images import chunks, encode_image

pytestmark = pytest.mark.unit

NOISE = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 72, 3), dtype=np.uint8))


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
