"""The gateway's OpenAI-compatible Images API, driven by the official `openai` client (and plain HTTP for
the SSE framing) against the three services as processes."""

import base64
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import time

import openai
import pytest
from images import png
from PIL import Image

from gateway.client import ImageClient
from testkit.cluster import DEV_LIMITS, Cluster, Service, free_port

pytestmark = pytest.mark.e2e

PROMPT = "a poster that says 'HELLO'"
API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("http") / "api-keys"
    key_file.write_text(f"sha256:{hashlib.sha256(API_KEY.encode()).hexdigest()} tests\n")
    http_port = free_port()
    with Cluster(str(model_dir), engine="transformers",
                 gateway_args=["--http-port", str(http_port), "--api-keys-file", str(key_file)]) as running:  # fmt: skip
        running.http_port = http_port
        yield running


@pytest.fixture(scope="module")
def client(cluster):
    # no retries: a refusal must reach the test as it was sent
    with openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def sha256(b64: str) -> str:
    return hashlib.sha256(base64.b64decode(b64)).hexdigest()


def grpc_image(cluster, seed: int, **fields) -> bytes:
    with ImageClient(cluster.gateway.address, api_key=API_KEY) as grpc_client:
        return grpc_client.generate(PROMPT, 256, 256, seed=seed, num_inference_steps=2, **fields).image


def post(cluster, path: str, body: dict, key: str = API_KEY) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    connection.request("POST", path, json.dumps(body), headers)
    return connection.getresponse()


def http_requests(cluster, path: str, code: str) -> float:
    return cluster.gateway.metric("glmimage_requests_total", stage="gateway", method=path, code=code)


def in_flight(cluster, kind: str) -> float:
    return sum(s.metric("glmimage_requests_in_flight", stage=kind) for s in cluster.pods(kind))


def test_generate_returns_the_png_that_grpc_generate_returns(cluster, client):
    result = client.images.generate(model="glm-image", prompt=PROMPT, size="256x256",
                                    extra_body={"seed": 5, "num_inference_steps": 2})  # fmt: skip
    (image,) = result.data
    assert decoded(image.b64_json).format == "PNG" and decoded(image.b64_json).size == (256, 256)
    assert result.size == "256x256" and result.output_format == "png" and result.created > 0
    assert result.usage.output_tokens == 64  # the 8x8 plan of a 256x256 image
    assert sha256(image.b64_json) == hashlib.sha256(grpc_image(cluster, seed=5)).hexdigest()


def test_n_images_take_consecutive_seeds(cluster, client):
    result = client.images.generate(prompt=PROMPT, size="256x256", n=2,
                                    extra_body={"seed": 11, "num_inference_steps": 2})  # fmt: skip
    first, second = (sha256(image.b64_json) for image in result.data)
    assert first != second
    assert second == hashlib.sha256(grpc_image(cluster, seed=12)).hexdigest()


def test_stream_sends_partial_images_then_the_completed_image(cluster, client):
    ok = http_requests(cluster, "/v1/images/generations", "OK")
    stream = client.images.generate(prompt=PROMPT, size="512x512", stream=True, partial_images=2,
                                    extra_body={"seed": 3, "num_inference_steps": 4})  # fmt: skip
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(decoded(e.b64_json).format == "PNG" for e in events)
    assert decoded(events[-1].b64_json).size == (512, 512) and events[-1].size == "512x512"
    deadline = time.monotonic() + 10  # counted once the stream's last byte is out
    while http_requests(cluster, "/v1/images/generations", "OK") != ok + 1:
        assert time.monotonic() < deadline, "the streamed request was not counted OK once"
        time.sleep(0.1)


def test_edit_takes_the_image_as_grpc_takes_a_condition_image(cluster, client):
    source = png(256, 256, seed=4)
    result = client.images.edit(image=("source.png", source, "image/png"), prompt=PROMPT, size="256x256",
                                extra_body={"seed": 6, "num_inference_steps": 2})  # fmt: skip
    (image,) = result.data
    assert decoded(image.b64_json).size == (256, 256)
    assert sha256(image.b64_json) == hashlib.sha256(grpc_image(cluster, seed=6, condition_images=[source])).hexdigest()


def test_refusals_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(prompt=PROMPT, size="100x100")
    assert bad_size.value.status_code == 400 and bad_size.value.type == "invalid_request_error"
    assert bad_size.value.param == "size" and "width must be a multiple of 32" in bad_size.value.message
    with pytest.raises(openai.NotFoundError) as unknown_model:
        client.images.generate(prompt=PROMPT, model="dall-e-3", size="256x256")
    assert unknown_model.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="background 'transparent' is not supported"):
        client.images.generate(prompt=PROMPT, size="256x256", background="transparent")
    with pytest.raises(openai.BadRequestError, match="mask is not supported"):
        client.images.edit(image=("s.png", png(64, 64), "image/png"), mask=("m.png", png(64, 64), "image/png"),
                           prompt=PROMPT)  # fmt: skip
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="sk-wrong").models.list()


def test_models_and_health(cluster, client):
    assert [m.id for m in client.models.list()] == ["glm-image"]
    assert client.models.retrieve("glm-image").id == "glm-image"
    connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=10)
    for path, status in (("/livez", "alive"), ("/readyz", "ready")):  # no key needed
        connection.request("GET", path)
        reply = connection.getresponse()
        assert reply.status == 200 and json.loads(reply.read()) == {"status": status}


def test_sse_framing_over_plain_http(cluster):
    reply = post(cluster, "/v1/images/generations", {"prompt": PROMPT, "size": "256x256", "stream": True,
                                                     "partial_images": 1, "num_inference_steps": 2, "seed": 1})  # fmt: skip
    assert reply.status == 200 and reply.getheader("Content-Type").startswith("text/event-stream")
    assert reply.getheader("X-Request-Id")
    body = reply.read().decode()
    frames = body.split("\n\n")
    assert frames[-1] == "", "the stream ends with a complete event"
    names = []
    for frame in frames[:-1]:
        event, data = frame.split("\n")
        name = event.removeprefix("event: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == name
        names.append(name)
    assert names == ["image_generation.partial_image", "image_generation.completed"]


def test_errors_before_the_stream_are_http_statuses(cluster):
    counted = [("/v1/images/generations", "INVALID_ARGUMENT"), ("/v1/images/generations", "UNAUTHENTICATED"),
               ("/v1/images/edits", "RESOURCE_EXHAUSTED")]  # fmt: skip
    before = [http_requests(cluster, path, code) for path, code in counted]
    reply = post(cluster, "/v1/images/generations", {"prompt": " ", "stream": True, "size": "256x256"})
    error = json.loads(reply.read())["error"]
    assert reply.status == 400 and error["param"] == "prompt" and error["type"] == "invalid_request_error"
    assert post(cluster, "/v1/images/generations", {"prompt": PROMPT}, key="sk-wrong").status == 401
    connection = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=10)
    connection.request("POST", "/v1/images/edits", b"", {"Content-Length": str(2**31)})  # refused before the body
    reply = connection.getresponse()
    assert reply.status == 413 and json.loads(reply.read())["error"]["code"] == "request_too_large"
    # each refusal counted once, by the status code its error stands for
    assert [http_requests(cluster, path, code) - b for (path, code), b in zip(counted, before, strict=True)] == [1] * 3


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_both_stages(cluster, stream):
    counted = {"stage": "gateway", "method": "/v1/images/generations", "code": "CANCELLED"}
    cancelled = cluster.gateway.metric("glmimage_requests_total", **counted)
    body = json.dumps({"prompt": PROMPT, "size": "1024x1024", "num_inference_steps": 50, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", cluster.http_port)) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        deadline = time.monotonic() + 60
        while not in_flight(cluster, "planner"):
            assert time.monotonic() < deadline, "the plan never started"
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while in_flight(cluster, "planner") or in_flight(cluster, "decoder"):
        assert time.monotonic() < deadline, "a stage kept working for a client that had gone"
        time.sleep(0.1)
    assert cluster.gateway.metric("glmimage_requests_total", **counted) == cancelled + 1


def test_sigterm_lets_an_http_stream_finish(cluster, tmp_path):
    port = free_port()
    stages = ["--planner", cluster.pods("planner")[0].address, "--decoder", cluster.pods("decoder")[0].address]
    gateway = Service("gateway-http", ["gateway", *stages, *DEV_LIMITS, "--http-port", str(port),
                                       "--shutdown-grace-seconds", "120"], free_port(), free_port(),
                      tmp_path / "gateway.log")  # fmt: skip
    gateway.start(dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 60
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            try:
                connection.request("GET", "/readyz")
                reply = connection.getresponse()
                reply.read()
                if reply.status == 200:
                    break
            except OSError:
                connection.close()
            assert gateway.alive() and time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            time.sleep(0.3)
        body = {"prompt": PROMPT, "size": "256x256", "num_inference_steps": 2, "stream": True}
        connection.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200  # admitted: the stream is under way
        gateway.signal(signal.SIGTERM)
        assert '"type":"image_generation.completed"' in reply.read().decode()
        assert gateway.process.wait(30) == 0
        assert "draining" in (tmp_path / "gateway.log").read_text()
    finally:
        gateway.stop()
