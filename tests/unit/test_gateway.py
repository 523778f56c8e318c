"""Gateway pieces that need no stage: request resolution and replica choice."""

import asyncio
import time

import pytest

from gateway.discovery import Target
from gateway.replicas import ReplicaPool
from gateway.servicer import resolve
from glmimage.v1 import common_pb2, image_service_pb2, planner_pb2_grpc
from servekit.errors import DeadlineExceeded, InvalidRequest
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
        (dict(output_format=common_pb2.IMAGE_FORMAT_WEBP, output_quality=101), "output_quality must be between 1"),
        (dict(previews=4), "previews must be between 0 and 3, got 4"),
        (dict(request_id="x" * 129), "request_id must be at most 128 characters"),
        (dict(request_id="a\nb"), r"request_id may hold only printable ASCII characters \(0x20-0x7E"),
        (dict(prompt="\x00"), "prompt must not be empty: it needs at least one visible character"),
    ],
)
def test_resolve_rejects_bad_requests(fields, message):
    request = image_service_pb2.GenerateRequest(prompt="p", width=512, height=512)
    for name, value in fields.items():
        setattr(request, name, value)
    with pytest.raises(InvalidRequest, match=message):
        resolve(request, Limits())


def serving_pool(capacities: list[int], lookahead: int = 0) -> ReplicaPool:
    """A pool of loopback addresses (nothing listens there); `with_replicas` marks them SERVING."""
    targets = [f"127.0.0.{i + 1}:1" for i in range(len(capacities))]
    return ReplicaPool("decoder", targets, planner_pb2_grpc.PlannerServiceStub, None, 1.0, 5.0, lookahead)


async def with_replicas(pool: ReplicaPool, capacities: list[int]) -> list:
    await pool._resolve()
    replicas = [pool.replicas[address] for address in sorted(pool.replicas)]
    for replica, capacity in zip(replicas, capacities, strict=True):
        replica.serving = True
        replica.info = common_pb2.ServerInfo(load=common_pb2.Load(capacity=capacity))
    return replicas


def test_lease_prefers_untried_and_least_loaded_replicas():
    async def scenario():
        pool = serving_pool([2, 2, 2])
        a, b, c = await with_replicas(pool, [2, 2, 2])
        deadline = time.monotonic() + 5
        try:
            a.outstanding, c.outstanding = 1, 1
            assert await pool.lease(0.0, set(), deadline) is b  # the least loaded
            a.outstanding, b.outstanding = 0, 2  # b is full
            assert await pool.lease(0.0, {a.address}, deadline) is c  # untried first, even if busier
            pool.failed(a)
            pool.release(c)
            assert await pool.lease(0.0, set(), deadline) is c  # a (idle) is out of rotation
        finally:
            await pool.close()

    asyncio.run(scenario())


def stage_gauge(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(f"glmimage_gateway_stage_{name}", {"stage": "decoder"})


def test_requests_wait_for_room_in_arrival_order():
    async def scenario():
        pool = serving_pool([1], lookahead=1)
        (replica,) = await with_replicas(pool, [1])
        deadline = time.monotonic() + 5
        try:
            held = [await pool.lease(0.0, set(), deadline), await pool.lease(1.0, set(), deadline)]
            assert replica.room() == 0  # one slot + one ahead
            late = asyncio.create_task(pool.lease(3.0, set(), deadline))
            early = asyncio.create_task(pool.lease(2.0, set(), deadline))  # queued later, arrived earlier
            await asyncio.sleep(0.05)
            assert not late.done() and not early.done()
            assert stage_gauge("waiting") == 2 and stage_gauge("in_service") == 2  # the demand, per stage
            pool.release(held.pop())
            await asyncio.sleep(0.01)
            assert early.done() and not late.done()
            pool.release(held.pop())
            assert await late is replica
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_busy_replica_gets_nothing_until_its_next_poll_and_waiting_ends_at_the_deadline():
    async def scenario():
        pool = serving_pool([4])
        (replica,) = await with_replicas(pool, [4])
        try:
            pool.overloaded(replica)
            with pytest.raises(DeadlineExceeded, match="waiting for a replica with room"):
                await pool.lease(0.0, set(), time.monotonic() + 0.2)
            assert replica.outstanding == 0 and not pool._waiters
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_name_becomes_one_replica_per_address_and_vanished_ones_are_retired():
    async def scenario():
        pool = serving_pool([1])
        (a,) = await with_replicas(pool, [1])
        try:
            pool.targets = [Target.parse("127.0.0.2:1")]
            a.outstanding = 1  # a request still runs on the vanished pod
            await pool._resolve()
            assert list(pool.replicas) == ["ipv4:127.0.0.2:1"] and a.retired and a.room() == 0
            pool.release(a)  # its last request ends: the channel closes
            await asyncio.sleep(0.01)
            assert a not in pool._retired
        finally:
            await pool.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("planner:50051", "planner", 50051), ("dns:///glm-decoder.ns.svc:50052", "glm-decoder.ns.svc", 50052),
     ("[::1]:7", "::1", 7), ("10.0.0.5:1", "10.0.0.5", 1)],
)  # fmt: skip
def test_targets_parse(text, host, port):
    assert Target.parse(text) == Target(host, port)


@pytest.mark.parametrize("text", ["planner", "planner:", "planner:http", ":50051", "planner:70000"])
def test_bad_targets_say_what_is_accepted(text):
    with pytest.raises(ValueError, match="host:port or dns:///host:port"):
        Target.parse(text)


def test_localhost_resolves_to_its_addresses():
    addresses = asyncio.run(Target.parse("localhost:5").resolve())
    assert "ipv4:127.0.0.1:5" in addresses
