"""API keys and per-key limits at the gateway, gRPC and HTTP, with the three services as processes."""

import hashlib
import http.client
import json
import os
import threading

import grpc
import pytest
from servers import SERVING, health_status

from gateway.client import ImageClient, error_details
from testkit.cluster import Cluster, free_port

pytestmark = pytest.mark.e2e

PROMPT = "a poster that says 'HELLO'"
KEYS = {"team-a": "sk-a-1234", "team-b": "sk-b-5678", "burst": "sk-burst", "busy": "sk-busy", "gone": "sk-gone"}
PER_MINUTE = 4


def keys_file_text(names) -> str:
    lines = [f"sha256:{hashlib.sha256(KEYS[name].encode()).hexdigest()} {name}" for name in names]
    return "# test keys\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(keys_file_text(KEYS))
    return path


@pytest.fixture(scope="module")
def cluster(model_dir, keys_file):
    http_port = free_port()
    args = ["--api-keys-file", str(keys_file), "--key-requests-per-minute", str(PER_MINUTE),
            "--key-max-in-flight", "1", "--http-port", str(http_port)]  # fmt: skip
    with Cluster(str(model_dir), engine="transformers", gateway_args=args) as running:
        running.http_port = http_port
        yield running


def generate(cluster, key: str | None, **fields):
    with ImageClient(cluster.gateway.address, api_key=key or "") as client:
        return client.generate(PROMPT, 256, 256, seed=1, num_inference_steps=2, **fields)


def refusal(cluster, key: str | None, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        generate(cluster, key, **fields)
    return caught.value


def http_status(cluster, key: str | None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=60)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    connection.request("GET", "/v1/models", headers=headers)
    return connection.getresponse().status


def plans_started(cluster) -> float:
    return sum(pod.metric("glmimage_requests_total", stage="planner", method="Plan") for pod in cluster.pods("planner"))


def test_no_key_or_an_unknown_key_is_refused_before_any_stage(cluster):
    started = plans_started(cluster)
    for key, message in [(None, "an API key is required"), ("sk-unknown", "not valid")]:
        error = refusal(cluster, key)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and message in error.details()
        assert error_details(error).reason == "INVALID_API_KEY"
        with ImageClient(cluster.gateway.address, api_key=key or "") as client, pytest.raises(grpc.RpcError) as info:
            client.server_info()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert http_status(cluster, key) == 401
    assert plans_started(cluster) == started, "an unauthenticated request reached a planner"
    assert cluster.gateway.metric("glmimage_gateway_key_requests_total", key="", outcome="unauthenticated") >= 4
    # health and reflection stay open: probes and tools carry no key
    assert health_status(cluster.gateway.address) == SERVING


def test_a_listed_key_works_on_grpc_and_http(cluster):
    result = generate(cluster, KEYS["team-a"])
    assert result.completed.plan_tokens == 64
    assert http_status(cluster, KEYS["team-b"]) == 200
    assert cluster.gateway.metric("glmimage_gateway_key_requests_total", key="team-a", outcome="admitted") >= 1


def test_a_key_removed_from_the_file_is_refused_without_a_restart(cluster, keys_file):
    assert http_status(cluster, KEYS["gone"]) == 200
    replacement = keys_file.with_name("api-keys.new")
    replacement.write_text(keys_file_text([name for name in KEYS if name != "gone"]))
    os.replace(replacement, keys_file)  # as a Secret update swaps the file
    error = refusal(cluster, KEYS["gone"])
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in error.details()
    assert http_status(cluster, KEYS["gone"]) == 401
    assert http_status(cluster, KEYS["team-b"]) == 200


def test_requests_per_minute_per_key(cluster):
    for _ in range(PER_MINUTE):  # refused by validation, but each one is a request the key started
        assert refusal(cluster, KEYS["burst"], output_quality=101).code() == grpc.StatusCode.INVALID_ARGUMENT
    error = refusal(cluster, KEYS["burst"])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4 requests a minute" in error.details()
    details = error_details(error)
    assert details.reason == "RATE_LIMITED" and 0 < details.retry_after_s <= 60 / PER_MINUTE
    assert generate(cluster, KEYS["team-b"]).completed.plan_tokens == 64  # other keys are not affected
    assert cluster.gateway.metric("glmimage_gateway_key_requests_total", key="burst", outcome="rate_limited") == 1


def test_requests_in_flight_per_key(cluster):
    started = threading.Event()
    results = []

    def slow():
        with ImageClient(cluster.gateway.address, api_key=KEYS["busy"]) as client:
            results.append(client.generate(PROMPT, 512, 512, seed=2, num_inference_steps=80,
                                           on_progress=lambda *_: started.set()))  # fmt: skip

    worker = threading.Thread(target=slow)
    worker.start()
    assert started.wait(60), "the first request never made progress"
    error = refusal(cluster, KEYS["busy"])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 requests in flight" in error.details()
    assert json.loads(http_post_generation(cluster, KEYS["busy"]))["error"]["type"] == "rate_limit_error"
    worker.join(120)
    assert results and results[0].completed.width == 512
    assert generate(cluster, KEYS["busy"]).completed.plan_tokens == 64  # its place is free again


def http_post_generation(cluster, key: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=60)
    body = json.dumps({"prompt": PROMPT, "size": "256x256", "num_inference_steps": 2})
    connection.request("POST", "/v1/images/generations", body,
                       {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})  # fmt: skip
    reply = connection.getresponse()
    assert reply.status == 429 and reply.getheader("Retry-After") == "1"
    return reply.read()
