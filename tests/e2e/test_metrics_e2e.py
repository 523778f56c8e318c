"""The shared request metrics (servekit.metrics) of the three services, read from their /metrics endpoints
after a success, a bad request and a cancelled request; and the plan format each stage exports."""

import time

import grpc
import pytest

from gateway.client import ImageClient
from glmimage.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
)
from servekit.plan_format import plan_format
from testkit.cluster import Cluster

pytestmark = pytest.mark.e2e

PROMPT = "a poster that says 'HELLO'"
# The request of each stage: gRPC method on it.
METHODS = {"gateway": "Generate", "planner": "Plan", "decoder": "Decode"}


@pytest.fixture(scope="module")
def cluster(model_dir):
    # the decoder is bound at once, so that a cancelled request is in flight on both stages
    with Cluster(str(model_dir), engine="transformers",
                 gateway_args=["--decoder-bind-lead-seconds", "inf"]) as running:  # fmt: skip
        yield running


def service(cluster, stage: str):
    return cluster.gateway if stage == "gateway" else cluster.pods(stage)[0]


def requests(cluster, code: str | None = None, series: str = "glmimage_requests_total") -> dict[str, float]:
    """Each stage's count of its request method, ended with `code` (None: any)."""
    labels = {"code": code} if code else {}
    return {stage: service(cluster, stage).metric(series, stage=stage, method=method, **labels)
            for stage, method in METHODS.items()}  # fmt: skip


def changes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {stage: after[stage] - before[stage] for stage in before}


def wait_for(read, expected, timeout: float = 10.0):
    """`read()` once it equals `expected` (a stage's call ends a moment after the client has its answer)."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_a_success_counts_ok_and_its_duration_in_every_stage(cluster):
    ok, timed = requests(cluster, "OK"), requests(cluster, "OK", "glmimage_request_duration_seconds_count")
    with ImageClient(cluster.gateway.address) as client:
        client.generate(PROMPT, 256, 256, seed=1, num_inference_steps=2)
    expected = {"gateway": 1, "planner": 1, "decoder": 1}
    assert wait_for(lambda: changes(ok, requests(cluster, "OK")), expected) == expected
    assert changes(timed, requests(cluster, "OK", "glmimage_request_duration_seconds_count")) == expected


def test_bad_requests_count_invalid_argument_where_they_are_refused(cluster):
    invalid, reached = requests(cluster, "INVALID_ARGUMENT"), requests(cluster)
    with ImageClient(cluster.gateway.address) as client, pytest.raises(grpc.RpcError) as error:
        client.generate(PROMPT, 250, 256)  # refused by the gateway: no stage sees it
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert changes(reached, requests(cluster)) == {"gateway": 1, "planner": 0, "decoder": 0}
    # refused by the stages themselves, before any work (validation)
    with grpc.insecure_channel(service(cluster, "planner").address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(planner_pb2_grpc.PlannerServiceStub(channel).Plan(planner_pb2.PlanRequest(width=256, height=256)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(service(cluster, "decoder").address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(decoder_pb2_grpc.DecoderServiceStub(channel).Decode(iter([decoder_pb2.DecodeRequest()])))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert changes(invalid, requests(cluster, "INVALID_ARGUMENT")) == {"gateway": 1, "planner": 1, "decoder": 1}


def test_a_cancelled_request_counts_cancelled_in_every_stage(cluster):
    cancelled = requests(cluster, "CANCELLED")
    with grpc.insecure_channel(cluster.gateway.address) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)
        call = stub.Generate(image_service_pb2.GenerateRequest(prompt=PROMPT, width=1024, height=1024))
        planner, decoder = service(cluster, "planner"), service(cluster, "decoder")
        # planning, and the decoder holds the call (a queue place until the plan is complete)
        in_flight = wait_for(lambda: (planner.metric("glmimage_requests_in_flight", stage="planner"),
                                      decoder.metric("glmimage_requests_queued", stage="decoder")), (1, 1))  # fmt: skip
        assert in_flight == (1, 1)
        call.cancel()
    expected = {"gateway": 1, "planner": 1, "decoder": 1}
    assert wait_for(lambda: changes(cancelled, requests(cluster, "CANCELLED")), expected) == expected


def test_planner_and_decoder_export_the_same_plan_format(cluster, model_dir):
    fmt = plan_format(model_dir)
    for stage in ("planner", "decoder"):
        assert service(cluster, stage).metric("glmimage_plan_format_info", stage=stage, plan_format=fmt) == 1
