"""Previews: where a decode's denoising previews fall, and the plan preview's work on the worker.

Previews are best effort and never hold up a full image: a decode skips its preview when another
call's complete plan waits for a slot, and a plan preview runs only while no complete plan needs the
device, stopping between two of its steps as soon as one does.
"""

from collections.abc import Callable, Sequence

from decoder_service.domain import DecodeJob
from decoder_service.engine import DecoderEngine
from decoder_service.images import EncodedImage, encode_image


def preview_steps(total: int, wanted: int) -> list[int]:
    """The steps after which previews are sent: evenly spread, before the last step (after it the
    preview would be the image itself); fewer than `wanted` when there are too few steps."""
    if total < 2:
        return []
    return sorted({min(total - 1, max(1, round(total * (k + 1) / (wanted + 1)))) for k in range(wanted)})


def render_estimate(engine: DecoderEngine, prepared, job: DecodeJob, max_side: int,
                    png_compress_level: int) -> tuple[EncodedImage, int, int]:  # fmt: skip
    """The decode's current estimate, small and encoded: (image, width, height)."""
    image = engine.preview(prepared, max_side)
    return encode_image(image, job.output_format, png_compress_level, job.output_quality), image.width, image.height


def render_plan_preview(engine: DecoderEngine, job: DecodeJob, ids: Sequence[int], should_stop: Callable[[], bool],
                        png_compress_level: int) -> EncodedImage | None:  # fmt: skip
    """The plan's preview grid decoded at its own size (`job` says it) in `job.steps` steps, in one
    worker job; None when `should_stop()` said so before a step."""
    prepared = engine.prepare(job, [])
    try:
        for _ in range(engine.begin(prepared, ids)):
            if should_stop():
                return None
            engine.step(prepared)
        if should_stop():
            return None
        return encode_image(engine.finish(prepared), job.output_format, png_compress_level, job.output_quality)
    finally:
        engine.release(prepared)
