"""The result image out: encoding it, chunking it."""

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from decoder_service.domain import ImageFormat

_PIL_FORMATS = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}
LOSSY_QUALITY = 95  # JPEG and WebP


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    sha256: str


def encode_image(
    image: Image.Image, image_format: ImageFormat, png_compress_level: int = 1, quality: int | None = None
) -> EncodedImage:
    buffer = io.BytesIO()
    if image_format is ImageFormat.PNG:
        image.save(buffer, format="PNG", compress_level=png_compress_level)
    else:
        image.save(buffer, format=_PIL_FORMATS[image_format], quality=quality or LOSSY_QUALITY)
    data = buffer.getvalue()
    return EncodedImage(data=data, sha256=hashlib.sha256(data).hexdigest())


def chunks(data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Consecutive pieces of at most `chunk_bytes`."""
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])
