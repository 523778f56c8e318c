"""OpenAI Images API <-> ImageService conversions: request fields, refusals, error statuses."""

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2
from pydantic import ValidationError

from gateway import openai_images
from gateway.auth import Unauthenticated
from gateway.openai_images import ImageRequest, generate_requests
from glmimage.v1 import common_pb2
from servekit.errors import (
    DeadlineExceeded,
    IncompatiblePlan,
    InvalidRequest,
    Overloaded,
    ServiceError,
    Unavailable,
    UpstreamError,
)
from servekit.validation import Limits

pytestmark = pytest.mark.unit


def requests_for(**fields):
    return generate_requests(ImageRequest(prompt="a sign", **fields), [], "rid", Limits(), max_images=4)


def test_fields_map_onto_one_generate_request_per_image():
    first, second = requests_for(n=2, size="512x768", seed=7, num_inference_steps=9, guidance_scale=0.0,
                                 output_format="webp", sampling={"temperature": 0.0, "top_k": 5})  # fmt: skip
    assert (first.request_id, second.request_id) == ("rid-0", "rid-1")
    assert (first.seed, second.seed) == (7, 8)
    assert (first.width, first.height, first.num_inference_steps) == (512, 768, 9)
    assert first.HasField("guidance_scale") and first.guidance_scale == 0.0
    assert first.output_format == common_pb2.IMAGE_FORMAT_WEBP and first.output_quality == 100  # OpenAI's default
    assert first.sampling.HasField("temperature") and first.sampling.temperature == 0.0 and first.sampling.top_k == 5
    assert not first.sampling.HasField("top_p")


def test_defaults_leave_the_gateway_to_choose():
    (request,) = requests_for()
    assert request.request_id == "rid" and (request.width, request.height) == (1024, 1024)  # size auto
    assert not request.HasField("seed") and not request.HasField("num_inference_steps")
    assert request.output_format == common_pb2.IMAGE_FORMAT_PNG and not request.HasField("output_quality")
    assert request.previews == 0
    (small,) = generate_requests(ImageRequest(prompt="p"), [], "r", Limits(min_side=256, max_side=512), 4)
    assert (small.width, small.height) == (512, 512)  # auto within the server's limits


@pytest.mark.parametrize(("compression", "quality"), [(None, 100), (100, 100), (40, 40), (0, 1)])
def test_output_compression_is_the_jpeg_quality(compression, quality):
    (request,) = requests_for(output_format="jpeg", output_compression=compression)
    assert request.output_quality == quality


def test_partial_images_become_previews_of_a_stream():
    (request,) = requests_for(stream=True, partial_images=2)
    assert request.previews == 2


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (dict(size="big"), "size", "size must be 'auto' or WIDTHxHEIGHT"),
        (dict(n=5), "n", "n must be between 1 and 4, got 5"),
        (dict(response_format="url"), "response_format", "needs an output store"),
        (dict(background="transparent"), "background", "background 'transparent' is not supported"),
        (dict(output_compression=50), "output_compression", "jpeg and webp only"),
        (dict(stream=True, n=2), "n", "stream=true supports n=1 only"),
        (dict(partial_images=1), "partial_images", "partial_images needs stream=true"),
    ],
)
def test_unsupported_values_are_refused(fields, param, message):
    with pytest.raises(InvalidRequest, match=message) as raised:
        requests_for(**fields)
    assert raised.value.field == param


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "p", "quality": "hd"}, "quality", "quality is not supported by this server"),
        ({"prompt": "p", "sampling": {"min_p": 0.1}}, "sampling.min_p", "supported: temperature, top_p, top_k"),
        ({"size": "512x512"}, "prompt", "prompt is required"),
        ({"prompt": "p", "output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ({"prompt": "p", "n": 0}, "n", "greater than or equal to 1"),
    ],
)
def test_request_bodies_outside_the_api_name_the_field(body, param, message):
    with pytest.raises(ValidationError) as raised:
        ImageRequest.model_validate(body)
    error = openai_images.validation_error(raised.value.errors())
    assert error.field == param and message in str(error)


def test_the_model_must_be_the_served_one():
    openai_images.check_model(None, "glm-image")
    openai_images.check_model("glm-image", "glm-image")
    with pytest.raises(openai_images.ModelNotFound, match="this server serves 'glm-image'"):
        openai_images.check_model("dall-e-3", "glm-image")


def packed(*messages) -> list[any_pb2.Any]:
    anys = []
    for message in messages:
        anys.append(any_pb2.Any())
        anys[-1].Pack(message)
    return anys


@pytest.mark.parametrize(
    ("error", "status", "kind", "code", "param", "retry_after"),
    [
        (InvalidRequest("width must be ...", "width"), 400, "invalid_request_error", "invalid_request", "size", None),
        (InvalidRequest("bad", "previews"), 400, "invalid_request_error", "invalid_request", "partial_images", None),
        (Unauthenticated("key"), 401, "authentication_error", "invalid_api_key", None, None),
        (openai_images.ModelNotFound("m"), 404, "invalid_request_error", "model_not_found", None, None),
        (Overloaded("full"), 429, "rate_limit_error", "overloaded", None, "1"),
        (Unavailable("decoder: none"), 503, "server_error", "no_replica", None, "5"),
        (IncompatiblePlan("codebooks differ"), 503, "server_error", "incompatible_plan", None, None),
        (DeadlineExceeded("late"), 504, "server_error", "deadline_exceeded", None, None),
        (ServiceError("internal error; see the server log"), 500, "server_error", "internal", None, None),
    ],
)
def test_errors_take_openais_shape_and_the_mapped_status(error, status, kind, code, param, retry_after):
    converted = openai_images.http_error(error)
    assert converted.status == status
    assert converted.body["error"] == {"message": str(error), "type": kind, "param": param, "code": code}
    assert converted.headers.get("Retry-After") == retry_after


def test_a_stages_status_keeps_its_details():
    info = error_details_pb2.ErrorInfo(reason="INVALID_REQUEST", domain="glmimage.v1", metadata={"stage": "planner"})
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="condition_images[1]", description="x")]
    )
    error = UpstreamError(grpc.StatusCode.INVALID_ARGUMENT, "planner: condition_images[1] is not an image",
                          packed(info, bad))  # fmt: skip
    converted = openai_images.http_error(error)
    assert converted.status == 400 and converted.body["error"]["param"] == "image"
    assert converted.body["error"]["code"] == "invalid_request"
    busy = UpstreamError(grpc.StatusCode.UNAVAILABLE, "decoder: draining",
                         packed(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=300_000_000))))  # fmt: skip
    converted = openai_images.http_error(busy)
    assert converted.status == 503 and converted.headers == {"Retry-After": "1"}
    assert converted.body["error"]["code"] == "unavailable"


def test_events_are_named_server_sent_events():
    preview = common_pb2.PreviewImage(index=1, width=256, height=256, format=common_pb2.IMAGE_FORMAT_PNG, data=b"\x89P")
    frame = openai_images.sse(openai_images.partial_image_event("image_edit", preview)).decode()
    head, data, end = frame.split("\n", 2)
    assert head == "event: image_edit.partial_image" and end == "\n"
    assert data.startswith('data: {"type":"image_edit.partial_image","b64_json":"iVA="')
    assert '"partial_image_index":1' in data and '"size":"256x256"' in data
