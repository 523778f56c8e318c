"""Condition images: one intake that the planner and the decoder both run on the same bytes.

The planner's processor (transformers' GlmImageProcessor) sizes a condition image by its own rule
(`smart_resize`: a pixel budget, whole grid cells, at half the size the DiT sees), while the DiT
(diffusers' GlmImagePipeline) only floors it to whole patches; their grids agree for some sizes only.
So an image whose grids already agree is handed to both models as it is (what the monolithic
pipeline gets), and any other is resized once, here, to the size at which they agree.
"""

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import GlmImageImageProcessorPil
from transformers.models.glm_image.image_processing_pil_glm_image import smart_resize

from servekit.errors import InvalidRequest
from servekit.validation import SIZE_MULTIPLE

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_ASPECT_RATIO = 4.0  # the processor refuses anything wider or taller
MAX_PIXELS = 64 * 1024 * 1024  # checked from the header, before decoding: no decompression bombs
MIN_SIDE = SIZE_MULTIPLE
DIT_PATCH = 16  # VAE x8, DiT patch 2: the DiT floors a condition image to whole patches of this size


@dataclass(frozen=True)
class ResizeRule:
    """How the checkpoint's processor sizes condition images (its processor/ folder)."""

    min_pixels: int
    max_pixels: int
    factor: int  # processor pixels per condition-grid cell: patch_size x merge_size
    resample: int  # the processor's PIL filter

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> "ResizeRule":
        processor = GlmImageImageProcessorPil.from_pretrained(Path(model_dir) / "processor")
        return cls(
            min_pixels=processor.size.shortest_edge,
            max_pixels=processor.size.longest_edge,
            factor=processor.patch_size * processor.merge_size,
            resample=int(processor.resample),
        )

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of the condition grid the processor makes of a width x height image."""
        resized_height, resized_width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return resized_height // self.factor, resized_width // self.factor


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            if image.width * image.height > MAX_PIXELS:
                raise InvalidRequest(
                    f"{name} is {image.width}x{image.height} pixels; at most {MAX_PIXELS} pixels are allowed", name
                )
            upright = ImageOps.exif_transpose(image)  # decodes: a truncated file fails here
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InvalidRequest(
            f"{name} is not a decodable PNG, JPEG or WebP image ({type(error).__name__})", name
        ) from None
    return upright.convert("RGB")  # as the processor's convert_to_rgb


def read_condition_image(data: bytes, index: int, rule: ResizeRule) -> Image.Image:
    """PNG, JPEG or WebP bytes -> the upright RGB image both stages hand to their model, sized so
    that the processor's grid (planner) and the DiT's patches (decoder) agree. InvalidRequest states
    what is allowed."""
    name = f"condition_images[{index}]"
    image = _decode(data, name)
    width, height = image.size
    if min(width, height) < MIN_SIDE or max(width, height) / min(width, height) >= MAX_ASPECT_RATIO:
        raise InvalidRequest(
            f"{name} is {width}x{height} pixels; each side must be at least {MIN_SIDE} pixels and the aspect "
            f"ratio below {MAX_ASPECT_RATIO:g}",
            name,
        )
    rows, cols = rule.grid(width, height)
    size = (cols * SIZE_MULTIPLE, rows * SIZE_MULTIPLE)  # a grid cell is 32 DiT pixels (2x2 patches)
    if (width // DIT_PATCH * DIT_PATCH, height // DIT_PATCH * DIT_PATCH) != size:
        image = image.resize(size, resample=rule.resample)
    try:
        agrees = rule.grid(*image.size) == (rows, cols)
    except ValueError:  # rounding to whole cells took the aspect ratio past what the processor takes
        agrees = False
    if not agrees:
        raise InvalidRequest(
            f"{name} is {width}x{height} pixels; in whole grid cells it becomes {size[0]}x{size[1]}, which the "
            f"model's processor does not take as is: send an image whose aspect ratio is further below "
            f"{MAX_ASPECT_RATIO:g}",
            name,
        )
    return image


def read_condition_images(images: Sequence[bytes], rule: ResizeRule) -> list[Image.Image]:
    return [read_condition_image(data, index, rule) for index, data in enumerate(images)]
