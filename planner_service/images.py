"""Condition images: decoded and checked before any model work."""

import io

from PIL import Image, UnidentifiedImageError

from servekit.errors import InvalidRequest

# A condition image wider or taller than this ratio is outside what the model handles.
MAX_ASPECT_RATIO = 4.0
# Refuse decompression bombs before decoding pixels.
MAX_CONDITION_PIXELS = 64 * 1024 * 1024
FORMATS = ("PNG", "JPEG", "WEBP")


def decode_condition_image(data: bytes, index: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            if image.width * image.height > MAX_CONDITION_PIXELS:
                raise InvalidRequest(
                    f"condition_images[{index}] has {image.width}x{image.height} pixels; at most "
                    f"{MAX_CONDITION_PIXELS} pixels are allowed"
                )
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise InvalidRequest(
            f"condition_images[{index}] is not a decodable PNG, JPEG or WebP image ({type(error).__name__})"
        ) from None
    ratio = max(rgb.width / rgb.height, rgb.height / rgb.width)
    if ratio >= MAX_ASPECT_RATIO:
        raise InvalidRequest(
            f"condition_images[{index}] is {rgb.width}x{rgb.height}; its aspect ratio must be below {MAX_ASPECT_RATIO:g}"
        )
    return rgb
