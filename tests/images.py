"""Test images."""

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A random RGB image, PNG-encoded."""
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def gif(width: int = 64, height: int = 64) -> bytes:
    """A format the services do not take."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="GIF")
    return buffer.getvalue()


def photo(width: int, height: int, orientation: int = 1) -> bytes:
    """A JPEG that compresses like a photo (smooth shapes, sensor-like noise), with an EXIF orientation tag."""
    y, x = np.mgrid[0 : height // 4, 0 : width // 4].astype(np.float32) * 4
    shapes = np.stack([128 + 100 * np.sin(x / 97) * np.cos(y / 131), 128 + 100 * np.sin((x + y) / 211),
                       239 * x / width], axis=-1)  # fmt: skip
    base = np.asarray(Image.fromarray(shapes.astype("uint8")).resize((width, height), Image.BILINEAR))
    pixels = base + np.random.default_rng(0).integers(0, 16, base.shape, dtype=np.uint8)  # no overflow: base <= 239
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with (almost) no pixel data: a decompression bomb's shape."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def png_of_size(size: int, width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    """A valid random PNG padded to exactly `size` bytes with a private ancillary chunk (decoders skip it)."""
    data = png(width, height, seed)
    padding = size - len(data) - 12  # a chunk adds length, type and CRC
    assert padding >= 0, f"{size} bytes cannot hold a {width}x{height} PNG"
    ihdr_end = 8 + 25  # signature + IHDR chunk
    return data[:ihdr_end] + _chunk(b"prVt", b"\0" * padding) + data[ihdr_end:]


# Image-to-image parity cases: the bytes sent, and the size that both stages hand to their model
# under the tiny checkpoint's rule (an image the monolithic pipeline sizes consistently stays as it is).
CONDITION_CASES = {
    "300x200 PNG, as it is": (lambda: png(300, 200), (300, 200)),
    "512x512 PNG, as it is": (lambda: png(512, 512), (512, 512)),
    "1024x1024 PNG": (lambda: png(1024, 1024), (512, 512)),
    "600x400 PNG": (lambda: png(600, 400), (512, 352)),
    "333x777 PNG": (lambda: png(333, 777), (224, 512)),
    "1600x1200 JPEG": (lambda: photo(1600, 1200), (512, 384)),
    "4000x3000 JPEG shown portrait (EXIF)": (lambda: photo(4000, 3000, orientation=6), (384, 512)),
}


def model_input(data: bytes, size: tuple[int, int]) -> Image.Image:
    """The image the monolithic pipeline is given in parity tests: upright, RGB, and resized to `size`
    with the processor's filter (bicubic) unless it has that size already."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return image if image.size == size else image.resize(size, Image.BICUBIC)
