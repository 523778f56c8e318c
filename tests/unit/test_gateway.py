"""Gateway pieces that need no stage: request resolution and replica choice."""

import asyncio

import pytest

from gateway.replicas import ReplicaPool
from gateway.servicer import resolve
from glmimage.v1 import common_pb2, image_service_pb2, planner_pb2_grpc
from servekit.errors import InvalidRequest
from servekit.validation import Limits

pytestmark = pytest.mark.unit


def test_resolve_assigns_request_id_and_seed_and_keeps_unset_steps_unset():
    resolved = resolve(image_service_pb2.GenerateRequest(prompt="p", width=512, height=768), Limits())
    assert len(resolved.request_id) == 16 and 0 <= resolved.seed < 2**63
    assert resolved.steps is None and resolved.guidance_scale is None
    assert resolved.output_format == common_pb2.IMAGE_FORMAT_PNG
    explicit = resolve(
        image_service_pb2.GenerateRequest(request_id="r", prompt="p", width=512, height=512, seed=0,
                                          num_inference_steps=30, guidance_scale=0.0),
        Limits(),
    )  # fmt: skip
    assert (explicit.request_id, explicit.seed, explicit.steps, explicit.guidance_scale) == ("r", 0, 30, 0.0)
    spec = explicit.decode_spec()
    assert spec.HasField("guidance_scale") and spec.guidance_scale == 0.0 and spec.seed == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(width=100), "width must be a multiple of 32"),
        (dict(prompt=""), "prompt must not be empty"),
        (dict(num_inference_steps=0), "num_inference_steps must be between 1 and 100"),
        (dict(output_format=9), "output_format must be PNG, JPEG or WebP"),
        (dict(request_id="x" * 129), "request_id must be at most 128 characters"),
    ],
)
def test_resolve_rejects_bad_requests(fields, message):
    request = image_service_pb2.GenerateRequest(prompt="p", width=512, height=512)
    for name, value in fields.items():
        setattr(request, name, value)
    with pytest.raises(InvalidRequest, match=message):
        resolve(request, Limits())


def test_choose_prefers_serving_untried_and_least_loaded_replicas():
    async def scenario():
        pool = ReplicaPool("planner", ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
                           planner_pb2_grpc.PlannerServiceStub, None, 1.0)  # fmt: skip
        a, b, c = pool.replicas
        try:
            assert pool.choose(set()) is None  # nothing SERVING yet
            a.serving = b.serving = c.serving = True
            a.outstanding, b.outstanding, c.outstanding = 2, 1, 3
            assert pool.choose(set()) is b
            assert pool.choose({b}) is a  # untried first, even if busier
            b.mark_failed()
            assert pool.choose(set()) is a
            assert pool.choose({a, c}) in (a, c)  # all tried: any SERVING one
        finally:
            await pool.close()

    asyncio.run(scenario())
