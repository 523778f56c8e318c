"""OpenAI's Images API in ImageService's terms: the request fields, the response and event shapes, the
errors. Pure conversions; the HTTP front (gateway/http_api.py) runs them around ImageServicer.generate.

Every field is either mapped or refused with a message that says what is allowed, never ignored."""

import base64
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field

from gateway.client import read_details
from glmimage.v1 import common_pb2, image_service_pb2
from servekit.errors import InvalidRequest, ServiceError, UpstreamError
from servekit.validation import Limits

UINT32_MAX = 2**32 - 1
FORMATS = {"png": common_pb2.IMAGE_FORMAT_PNG, "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
           "webp": common_pb2.IMAGE_FORMAT_WEBP}  # fmt: skip
FORMAT_NAMES = {value: name for name, value in FORMATS.items()}
# `size: auto`: this square, brought within the server's side limits
AUTO_SIDE = 1024


class Sampling(BaseModel):
    """How the planner samples plan tokens (an extension; ImageService's PlanSampling)."""

    model_config = ConfigDict(extra="forbid")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=0, le=UINT32_MAX)


class ImageRequest(BaseModel):
    """The fields of /v1/images/generations (JSON) and /v1/images/edits (form, besides image and mask)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    n: int | None = Field(None, ge=1)
    size: str | None = None  # WIDTHxHEIGHT or auto
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=UINT32_MAX)
    user: str | None = None
    # extensions, as in ImageService
    seed: int | None = Field(None, ge=0, lt=2**64)
    num_inference_steps: int | None = Field(None, ge=0, le=UINT32_MAX)
    guidance_scale: float | None = None
    sampling: Sampling | None = None


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


def validation_error(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """The first of pydantic's `errors()` as an InvalidRequest naming the field in OpenAI's terms."""
    error = errors[0]
    location = [str(part) for part in error["loc"] if part != "body"]
    field = ".".join(location)
    if error["type"] == "extra_forbidden":
        supported = ", ".join(ImageRequest.model_fields) if "." not in field else "temperature, top_p, top_k"
        return InvalidRequest(f"{field} is not supported by this server (supported: {supported})", field)
    if error["type"] == "json_invalid":
        return InvalidRequest(f"the request body must be JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    if error["type"] == "missing":
        return InvalidRequest(f"{field or 'the request body'} is required", field)
    return InvalidRequest(f"{field}: {error['msg']}" if field else error["msg"], field)


def check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise ModelNotFound(f"the model {model!r} does not exist here; this server serves {served!r}")


def parse_size(size: str | None, limits: Limits) -> tuple[int, int]:
    if size is None or size == "auto":
        side = min(max(AUTO_SIDE, limits.min_side), limits.max_side)
        return side, side
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if match is None:
        raise InvalidRequest(
            f"size must be 'auto' or WIDTHxHEIGHT in pixels such as '1024x1024' (each side a multiple of 32 "
            f"from {limits.min_side} to {limits.max_side}), got {size!r}",
            "size",
        )
    return int(match[1]), int(match[2])


def output_quality(body: ImageRequest) -> int | None:
    """OpenAI's output_compression (0-100, default 100) is the JPEG/WebP quality: 100 keeps the most
    detail, 0 is quality 1. PNG is lossless: a compression for it is refused, as OpenAI does."""
    if (body.output_format or "png") == "png":
        if body.output_compression is not None:
            raise InvalidRequest(
                "output_compression applies to output_format jpeg and webp only (png is lossless)", "output_compression"
            )
        return None
    return max(100 if body.output_compression is None else body.output_compression, 1)


def generate_requests(
    body: ImageRequest, images: list[bytes], request_id: str, limits: Limits, max_images: int
) -> list[image_service_pb2.GenerateRequest]:
    """One GenerateRequest per image asked for (`n`): the same request with seeds seed, seed+1, ... when a
    seed is given, and request ids `request_id` (n = 1) or `request_id-0`, `request_id-1`, ...
    Refuses what ImageService cannot do; the rest is validated on the one Generate path."""
    n = 1 if body.n is None else body.n
    if n > max_images:
        raise InvalidRequest(f"n must be between 1 and {max_images}, got {n}", "n")
    if body.response_format == "url":
        raise InvalidRequest(
            "response_format 'url' needs an output store, which this server does not have; use 'b64_json'",
            "response_format",
        )
    if body.background == "transparent":
        raise InvalidRequest(
            "background 'transparent' is not supported: the images are opaque; use 'auto' or 'opaque'", "background"
        )
    if body.stream and n > 1:
        raise InvalidRequest("stream=true supports n=1 only: send one streaming request per image", "n")
    if body.partial_images and not body.stream:
        raise InvalidRequest("partial_images needs stream=true: partial images come as server-sent events",
                             "partial_images")  # fmt: skip
    width, height = parse_size(body.size, limits)
    base = image_service_pb2.GenerateRequest(
        prompt=body.prompt, width=width, height=height, output_format=FORMATS[body.output_format or "png"],
        condition_images=[common_pb2.InputImage(data=data) for data in images], previews=body.partial_images or 0,
    )  # fmt: skip
    quality = output_quality(body)
    if quality is not None:
        base.output_quality = quality
    if body.num_inference_steps is not None:
        base.num_inference_steps = body.num_inference_steps
    if body.guidance_scale is not None:
        base.guidance_scale = body.guidance_scale
    if body.sampling is not None:
        for name, value in body.sampling.model_dump(exclude_none=True).items():
            setattr(base.sampling, name, value)
    requests = []
    for index in range(n):
        request = image_service_pb2.GenerateRequest()
        request.CopyFrom(base)
        request.request_id = request_id if n == 1 else f"{request_id}-{index}"
        if body.seed is not None:
            request.seed = (body.seed + index) % 2**64
        requests.append(request)
    return requests


# ---------------------------------------------------------------- responses
@dataclass
class Image:
    data: bytes
    completed: common_pb2.Completed


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def usage(images: list[Image]) -> dict:
    """The plan tokens the AR stage wrote are the output; the prompt's tokens are not counted here."""
    tokens = sum(image.completed.plan_tokens for image in images)
    return {
        "input_tokens": 0, "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        "output_tokens": tokens, "output_tokens_details": {"image_tokens": tokens, "text_tokens": 0},
        "total_tokens": tokens,
    }  # fmt: skip


def images_response(images: list[Image]) -> dict:
    first = images[0].completed
    return {
        "created": int(time.time()),
        "data": [{"b64_json": _b64(image.data)} for image in images],
        "background": "opaque",
        "output_format": FORMAT_NAMES[first.format],
        "size": f"{first.width}x{first.height}",
        "usage": usage(images),
    }


def partial_image_event(kind: str, preview: common_pb2.PreviewImage) -> dict:
    """`kind`: image_generation or image_edit. The size is the preview's own (a small picture)."""
    return {
        "type": f"{kind}.partial_image", "b64_json": _b64(preview.data), "partial_image_index": preview.index,
        "created_at": int(time.time()), "size": f"{preview.width}x{preview.height}", "quality": "auto",
        "background": "opaque", "output_format": FORMAT_NAMES[preview.format],
    }  # fmt: skip


def completed_event(kind: str, image: Image) -> dict:
    completed = image.completed
    return {
        "type": f"{kind}.completed", "b64_json": _b64(image.data), "created_at": int(time.time()),
        "size": f"{completed.width}x{completed.height}", "quality": "auto", "background": "opaque",
        "output_format": FORMAT_NAMES[completed.format], "usage": usage([image]),
    }  # fmt: skip


def sse(event: dict) -> bytes:
    """One server-sent event, named by its type."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


# ---------------------------------------------------------------- errors
# google.rpc.Code's HTTP mapping, except FAILED_PRECONDITION: here only a planner and a decoder that
# disagree on the plan format (a rollout in progress), the server's state rather than the request's.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.FAILED_PRECONDITION: 503, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}  # fmt: skip
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip
# ImageService's field names in OpenAI's
PARAMS = {"width": "size", "height": "size", "previews": "partial_images", "output_quality": "output_compression",
          "request_id": "X-Request-Id"}  # fmt: skip


@dataclass(frozen=True)
class HttpError:
    status: int
    body: dict
    headers: dict[str, str]


def openai_param(field: str) -> str | None:
    if field.startswith("condition_images"):
        return "image"
    return PARAMS.get(field, field) or None


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def http_error(error: ServiceError) -> HttpError:
    """A ServiceError (the gateway's own, or a stage's passed on) as OpenAI's error and HTTP status;
    Retry-After where waiting helps."""
    if isinstance(error, UpstreamError):
        details = read_details(error.details)
        reason, retry_after = details.reason, details.retry_after_s
        field = details.fields[0][0] if details.fields else ""
    else:
        reason, field, retry_after = error.reason, getattr(error, "field", ""), error.retry_after_s
    status = HTTP_STATUS.get(error.code, 500)
    headers = {"Retry-After": str(max(math.ceil(retry_after), 1))} if retry_after is not None else {}
    code = (reason or error.code.name).lower()
    return HttpError(status, error_body(status, str(error), code, openai_param(field)), headers)
