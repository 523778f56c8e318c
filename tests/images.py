"""Test images."""

import io

import numpy as np
from PIL import Image


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A random RGB image, PNG-encoded."""
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
