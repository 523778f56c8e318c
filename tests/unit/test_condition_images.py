"""imagekit.condition_images: the one condition-image intake of both model stages, checked against
the checkpoint's own processor (its grid) and the DiT's sizing (whole 16-pixel patches)."""

import io

import numpy as np
import pytest
from images import photo, png, png_header
from PIL import Image, ImageOps

from imagekit.condition_images import ResizeRule, read_condition_image, read_condition_images
from servekit.errors import InvalidRequest

pytestmark = pytest.mark.unit

TINY_RULE = ResizeRule(min_pixels=32 * 32, max_pixels=512 * 512, factor=16, resample=Image.BICUBIC)


@pytest.fixture(scope="module")
def processor(model_dir):
    from transformers import GlmImageImageProcessorPil

    return GlmImageImageProcessorPil.from_pretrained(model_dir / "processor")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def grids_agree(image: Image.Image, processor) -> bool:
    """The planner's grid (the processor's, 32 px cells) is half the decoder's (the DiT's 16 px patches)."""
    _, rows, cols = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
    return (2 * rows, 2 * cols) == (image.height // 16, image.width // 16)


def test_the_rule_is_the_checkpoints(model_dir):
    assert ResizeRule.from_checkpoint(model_dir) == TINY_RULE


# (width, height) sent -> (width, height) both stages see, for the tiny checkpoint's rule
SIZES = {
    "512x512, as it is": ((512, 512), (512, 512)),
    "64x64, as it is": ((64, 64), (64, 64)),
    "300x200, as it is (the DiT floors it to 288x192)": ((300, 200), (300, 200)),
    "1024x1024": ((1024, 1024), (512, 512)),
    "600x400": ((600, 400), (512, 352)),
    "1600x1200": ((1600, 1200), (512, 384)),
    "333x777": ((333, 777), (224, 512)),
}


@pytest.mark.parametrize("case", SIZES)
def test_both_stages_see_one_image_whose_grids_agree(processor, case):
    (width, height), expected = SIZES[case]
    source = Image.open(io.BytesIO(png(width, height))).convert("RGB")
    image = read_condition_image(png(width, height), 0, TINY_RULE)
    assert image.mode == "RGB" and image.size == expected
    assert grids_agree(image, processor)
    if expected == (width, height):  # the monolithic pipeline's own sizing works: the image is untouched
        assert np.array_equal(np.asarray(image), np.asarray(source))
    else:  # resized once, by the processor's filter
        assert np.array_equal(np.asarray(image), np.asarray(source.resize(expected, Image.BICUBIC)))


def test_grids_agree_or_the_image_is_refused_whatever_its_size(processor):
    sizes = np.random.RandomState(0).randint(32, 2500, (40, 2))
    served = 0
    for width, height in sizes.tolist():
        if max(width, height) / min(width, height) >= 4:
            continue
        try:
            image = read_condition_image(encoded(Image.new("RGB", (width, height), "gray"), "PNG"), 0, TINY_RULE)
        except InvalidRequest as error:
            assert "send an image whose aspect ratio is further below 4" in str(error)
            continue
        assert grids_agree(image, processor), (width, height, image.size)
        served += 1
    assert served >= 15


def test_a_phone_photo_is_turned_upright_and_resized():
    data = photo(4000, 3000, orientation=6)  # stored landscape, shown portrait (rotated 90 degrees)
    assert 1_000_000 < len(data) < 8 * 1024 * 1024
    image = read_condition_image(data, 0, TINY_RULE)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert upright.size == (3000, 4000)
    assert image.size == (384, 512)
    assert np.array_equal(np.asarray(image), np.asarray(upright.resize((384, 512), Image.BICUBIC)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats(fmt):
    image = read_condition_image(encoded(Image.new("RGB", (96, 64), "red"), fmt), 0, TINY_RULE)
    assert image.mode == "RGB" and image.size == (96, 64)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1"])
def test_other_modes_become_rgb(mode):
    source = Image.new("RGB", (64, 64), (10, 200, 30)).convert(mode)
    assert read_condition_image(encoded(source, "PNG"), 0, TINY_RULE).mode == "RGB"


REFUSED = {
    "GIF": (encoded(Image.new("RGB", (64, 64)), "GIF"), r"condition_images\[2\] is not a decodable PNG, JPEG or WebP"),
    "BMP": (encoded(Image.new("RGB", (64, 64)), "BMP"), "is not a decodable PNG, JPEG or WebP"),
    "not an image": (b"not an image at all", "is not a decodable PNG, JPEG or WebP"),
    "truncated": (png(64, 64)[:200], "is not a decodable PNG, JPEG or WebP"),
    "too many pixels": (png_header(9000, 8000), r"is 9000x8000 pixels; at most 67108864 pixels are allowed"),
    "side too small": (png(31, 64), r"is 31x64 pixels; each side must be at least 32 pixels and the aspect ratio"),
    "aspect ratio": (png(400, 64), r"is 400x64 pixels; .* aspect ratio below 4"),
    "aspect ratio once in whole cells": (png(146, 37), r"is 146x37 pixels; in whole grid cells it becomes 160x32"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_say_what_is_allowed(case):
    data, message = REFUSED[case]
    with pytest.raises(InvalidRequest, match=message):
        read_condition_image(data, 2, TINY_RULE)


def test_each_image_is_named_by_its_index():
    with pytest.raises(InvalidRequest, match=r"condition_images\[1\]"):
        read_condition_images([png(64, 64), b"junk"], TINY_RULE)
