"""Image bytes in and out: decoding condition images, encoding the result, chunking it."""

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from decoder_service.domain import ImageFormat
from servekit.errors import InvalidRequest

_PIL_FORMATS = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}
ACCEPTED_INPUT = {"PNG", "JPEG", "WEBP"}
LOSSY_QUALITY = 95  # JPEG and WebP


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    sha256: str


def decode_condition_image(data: bytes, index: int) -> Image.Image:
    """PNG, JPEG or WebP bytes -> RGB image (the planner's processor converts to RGB too)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ACCEPTED_INPUT:
                raise InvalidRequest(f"condition_images[{index}] is {image.format}; send PNG, JPEG or WebP")
            image.load()  # decode now: a truncated file fails here, not later in the pipeline
            return image.convert("RGB")
    except InvalidRequest:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise InvalidRequest(
            f"condition_images[{index}] could not be decoded as PNG, JPEG or WebP ({type(error).__name__})"
        ) from None


def encode_image(image: Image.Image, image_format: ImageFormat, png_compress_level: int = 1) -> EncodedImage:
    buffer = io.BytesIO()
    if image_format is ImageFormat.PNG:
        image.save(buffer, format="PNG", compress_level=png_compress_level)
    else:
        image.save(buffer, format=_PIL_FORMATS[image_format], quality=LOSSY_QUALITY)
    data = buffer.getvalue()
    return EncodedImage(data=data, sha256=hashlib.sha256(data).hexdigest())


def chunks(data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Consecutive pieces of at most `chunk_bytes`."""
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])
