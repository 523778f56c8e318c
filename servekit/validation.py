"""Request limits and the checks every stage applies (the gateway early, each stage again).

Messages state the rule, so a client knows what is allowed.
"""

import math
from dataclasses import dataclass

from glmimage.v1 import common_pb2
from servekit.errors import InvalidRequest

# VAE x8, DiT patch 2, plan upsampling x2: every side is a whole number of plan cells.
SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class Limits:
    # The real model is trained for 512..2048 pixels per side; deployments may narrow or widen it.
    min_side: int = 512
    max_side: int = 2048
    min_steps: int = 1
    max_steps: int = 100
    max_prompt_chars: int = 4000
    max_condition_images: int = 4
    max_condition_image_bytes: int = 8 * 1024 * 1024
    max_guidance_scale: float = 20.0
    max_previews: int = 3

    def __post_init__(self):
        if self.min_side % SIZE_MULTIPLE or self.max_side % SIZE_MULTIPLE or self.min_side > self.max_side:
            raise ValueError(f"min_side/max_side must be multiples of {SIZE_MULTIPLE} with min_side <= max_side")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError("min_steps/max_steps must satisfy 1 <= min_steps <= max_steps")
        if self.max_previews < 0:
            raise ValueError("max_previews must be >= 0")

    def to_proto(self) -> common_pb2.Limits:
        return common_pb2.Limits(
            min_side=self.min_side,
            max_side=self.max_side,
            size_multiple=SIZE_MULTIPLE,
            min_steps=self.min_steps,
            max_steps=self.max_steps,
            max_prompt_chars=self.max_prompt_chars,
            max_condition_images=self.max_condition_images,
            max_condition_image_bytes=self.max_condition_image_bytes,
            max_guidance_scale=self.max_guidance_scale,
            max_previews=self.max_previews,
        )


# Everything a message carries besides the condition images and the prompt (and a 1 MiB image chunk).
MESSAGE_SLACK_BYTES = 1024 * 1024


def max_message_bytes(limits: Limits) -> int:
    """The largest gRPC message a request within `limits` needs (a PlanRequest or DecodeSpec holds
    every condition image): servers and the channels that send to them allow this much."""
    utf8_prompt = 4 * limits.max_prompt_chars  # at most 4 bytes a character
    return limits.max_condition_images * limits.max_condition_image_bytes + utf8_prompt + MESSAGE_SLACK_BYTES


MAX_REQUEST_ID_CHARS = 128


def check_request_id(request_id: str) -> None:
    """Request ids travel as gRPC metadata (x-request-id), whose values are printable ASCII."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters", "request_id")
    if not all(" " <= char <= "~" for char in request_id):
        raise InvalidRequest(
            "request_id may hold only printable ASCII characters (0x20-0x7E: letters, digits, punctuation and "
            "space), no control characters such as newlines and no non-ASCII characters",
            "request_id",
        )


def check_size(width: int, height: int, limits: Limits) -> None:
    for name, value in (("width", width), ("height", height)):
        if value % SIZE_MULTIPLE or not limits.min_side <= value <= limits.max_side:
            raise InvalidRequest(
                f"{name} must be a multiple of {SIZE_MULTIPLE} between {limits.min_side} and "
                f"{limits.max_side} pixels, got {value}",
                name,
            )


def check_prompt(prompt: str, limits: Limits) -> None:
    if not any(char.isprintable() and not char.isspace() for char in prompt):
        raise InvalidRequest("prompt must not be empty: it needs at least one visible character, not only whitespace "
                             "or control characters", "prompt")  # fmt: skip
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"prompt must be at most {limits.max_prompt_chars} characters, got {len(prompt)}", "prompt"
        )


def check_condition_images(images, limits: Limits) -> None:
    """Count and size only; decoding is the stage's job (it knows the formats it reads)."""
    if len(images) > limits.max_condition_images:
        raise InvalidRequest(
            f"at most {limits.max_condition_images} condition images are allowed, got {len(images)}", "condition_images"
        )
    for index, image in enumerate(images):
        if not image.data:
            raise InvalidRequest(f"condition_images[{index}] is empty; send PNG, JPEG or WebP bytes",
                                 f"condition_images[{index}]")  # fmt: skip
        if len(image.data) > limits.max_condition_image_bytes:
            raise InvalidRequest(
                f"condition_images[{index}] is {len(image.data)} bytes; at most "
                f"{limits.max_condition_image_bytes} bytes are allowed",
                f"condition_images[{index}]",
            )


OUTPUT_FORMATS = {
    common_pb2.IMAGE_FORMAT_UNSPECIFIED, common_pb2.IMAGE_FORMAT_PNG, common_pb2.IMAGE_FORMAT_JPEG,
    common_pb2.IMAGE_FORMAT_WEBP,
}  # fmt: skip


def check_output(request) -> None:
    """`request` has output_format and an optional output_quality (GenerateRequest, DecodeSpec)."""
    if request.output_format not in OUTPUT_FORMATS:
        raise InvalidRequest(f"output_format must be PNG, JPEG or WebP, got {request.output_format}", "output_format")
    if request.HasField("output_quality"):
        if request.output_format not in (common_pb2.IMAGE_FORMAT_JPEG, common_pb2.IMAGE_FORMAT_WEBP):
            raise InvalidRequest("output_quality applies to JPEG and WebP only; PNG is lossless", "output_quality")
        if not 1 <= request.output_quality <= 100:
            raise InvalidRequest(f"output_quality must be between 1 and 100, got {request.output_quality}",
                                 "output_quality")  # fmt: skip


def check_previews(previews: int, limits: Limits) -> None:
    if previews > limits.max_previews:
        raise InvalidRequest(f"previews must be between 0 and {limits.max_previews}, got {previews}", "previews")


def check_steps_and_guidance(request, limits: Limits) -> None:
    """`request` has optional num_inference_steps and guidance_scale (GenerateRequest, DecodeSpec)."""
    if request.HasField("num_inference_steps"):
        steps = request.num_inference_steps
        if not limits.min_steps <= steps <= limits.max_steps:
            raise InvalidRequest(
                f"num_inference_steps must be between {limits.min_steps} and {limits.max_steps}, got {steps}",
                "num_inference_steps",
            )
    check_guidance(request, limits)


def check_guidance(request, limits: Limits) -> None:
    """`request` has an optional guidance_scale."""
    if request.HasField("guidance_scale"):
        scale = request.guidance_scale
        if not math.isfinite(scale) or not 0.0 <= scale <= limits.max_guidance_scale:
            raise InvalidRequest(
                f"guidance_scale must be a finite number between 0 and {limits.max_guidance_scale}, got {scale}",
                "guidance_scale",
            )


def check_sampling(sampling: common_pb2.PlanSampling, codebook_size: int) -> None:
    if sampling.HasField("temperature"):
        t = sampling.temperature
        if not math.isfinite(t) or t < 0:
            raise InvalidRequest(
                f"sampling.temperature must be a finite number >= 0 (0 = greedy), got {t}", "sampling.temperature"
            )
    if sampling.HasField("top_p"):
        p = sampling.top_p
        if not math.isfinite(p) or not 0 < p <= 1:
            raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {p}", "sampling.top_p")
    if sampling.HasField("top_k") and sampling.top_k > codebook_size:
        raise InvalidRequest(
            f"sampling.top_k must be between 0 (no cut) and the codebook size {codebook_size}, got {sampling.top_k}",
            "sampling.top_k",
        )
