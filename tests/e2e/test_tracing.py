"""Traces and request logs of the three services as processes: spans exported over OTLP to a real receiver
(the collector's HTTP and gRPC protocols), one trace per request with the planner's and decoder's spans under
the gateway's, failover attempts as spans, an HTTP client's `traceparent` continued, and JSON log lines that
carry the request's ids."""

import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from servers import ServerThread

from gateway.client import ImageClient
from glmimage.v1 import decoder_pb2, decoder_pb2_grpc
from servekit.errors import NotReady
from servekit.server import ServiceSpec
from testkit.cluster import Cluster, free_port

pytestmark = pytest.mark.e2e

PROMPT = "a poster that says 'HELLO'"
GATEWAY, PLANNER, DECODER = "glm-image-gateway", "glm-image-planner", "glm-image-decoder"
GENERATE = "glmimage.v1.ImageService/Generate"
PLAN = "glmimage.v1.PlannerService/Plan"
DECODE = "glmimage.v1.DecoderService/Decode"
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
UNAVAILABLE, OK = grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.OK.value[0]


@dataclass(frozen=True)
class Span:
    service: str  # the resource's service.name
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    kind: int
    attributes: dict
    events: list[str]
    error: bool


def _value(any_value):
    return getattr(any_value, any_value.WhichOneof("value"))


class Receiver:
    """What an OpenTelemetry collector serves, OTLP over HTTP (POST /v1/traces, protobuf) and over gRPC
    (TraceService.Export); keeps every span it is sent."""

    def __init__(self):
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(self))
        self.grpc = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self.grpc)
        self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                spans += [
                    Span(resource["service.name"], s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                         s.kind, {a.key: _value(a.value) for a in s.attributes}, [e.name for e in s.events],
                         s.status.code == trace_pb2.Status.STATUS_CODE_ERROR)
                    for s in scope_spans.spans
                ]  # fmt: skip
        with self._lock:
            self.spans += spans

    def wait(self, found: Callable[[list[Span]], list[Span]], timeout: float = 20) -> list[Span]:
        """`found(spans)` once it is not empty (spans are exported a moment after they end)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                result = found(list(self.spans))
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.1)

    def request_trace(self, request_id: str, complete: set[str]) -> list[Span]:
        """The spans of the trace whose gateway span names `request_id`, once they include every name in
        `complete`."""

        def found(spans: list[Span]) -> list[Span]:
            ids = {s.trace_id for s in spans if s.attributes.get("glmimage.request_id") == request_id}
            mine = [s for s in spans if s.trace_id in ids]
            return mine if complete <= {s.name for s in mine} else []

        return self.wait(found)

    def __enter__(self) -> "Receiver":
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.grpc.start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.grpc.stop(0)


def _http_handler(receiver: Receiver):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces" or self.headers["Content-Type"] != "application/x-protobuf":
                self.send_error(404)
                return
            receiver.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    return Handler


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver):
        self.receiver = receiver

    def Export(self, request, context):
        self.receiver.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class RefusingDecoder(decoder_pb2_grpc.DecoderServiceServicer):
    """A decoder pod that reports SERVING and idle, with the real decoder's ServerInfo, but refuses every Decode
    (UNAVAILABLE, as a pod does that began to drain after the gateway's last health check); it keeps the
    metadata of the calls it refused."""

    def __init__(self, decoder: str):
        self.decoder = decoder
        self.refused: list[dict[str, str]] = []

    def spec(self) -> ServiceSpec:
        async def nothing() -> None:
            pass

        return ServiceSpec(
            names=[decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name],
            register=lambda server: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(self, server),
            start=nothing, stop=nothing, stage="decoder",
        )  # fmt: skip

    async def GetServerInfo(self, request, context):
        try:
            async with grpc.aio.insecure_channel(self.decoder) as channel:
                info = await decoder_pb2_grpc.DecoderServiceStub(channel).GetServerInfo(request, timeout=5)
        except grpc.aio.AioRpcError:
            raise NotReady("the real decoder is not up yet") from None
        info.load.active = info.load.waiting = 0
        return info

    async def Decode(self, request_iterator, context):
        self.refused.append(dict(context.invocation_metadata()))
        raise NotReady("this decoder is draining")


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as running:
        yield running


@pytest.fixture(scope="module")
def cluster(model_dir, receiver, tmp_path_factory):
    ports = free_port(), free_port(), free_port()  # gateway, planner, decoder
    http_port = free_port()
    refusing = RefusingDecoder(f"127.0.0.1:{ports[2]}")
    json_logs = ["--log-format", "json"]
    with ServerThread(refusing.spec) as fake, pytest.MonkeyPatch.context() as environment:
        environment.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.http.server_port}")
        environment.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # milliseconds: spans come within a moment
        # the last --decoder wins: the cluster's decoder and the refusing one
        gateway_args = [*json_logs, "--decoder", f"127.0.0.1:{ports[2]},{fake.address}", "--http-port", str(http_port),
                        "--health-interval-seconds", "0.5"]  # fmt: skip
        # the decoder exports over OTLP/gRPC, the others over OTLP/HTTP (the default)
        decoder_env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                       "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.grpc_port}"}  # fmt: skip
        with Cluster(str(model_dir), ports=ports, log_dir=tmp_path_factory.mktemp("logs"), gateway_args=gateway_args,
                     stage_args={"planner": json_logs, "decoder": json_logs},
                     stage_env={"decoder": decoder_env}) as running:  # fmt: skip
            running.http_port = http_port
            running.refusing = refusing
            running.refusing_address = fake.address
            yield running


@pytest.fixture(scope="module")
def traced(cluster, receiver):
    """One request through the gateway's gRPC API, and its trace."""
    with ImageClient(cluster.gateway.address) as client:
        result = client.generate(PROMPT, 256, 256, seed=1, num_inference_steps=2)
    spans = receiver.request_trace(result.accepted.request_id, {GENERATE, PLAN, DECODE, "planning", "encode"})
    assert spans, "the request's trace did not arrive"
    return result.accepted.request_id, spans


def one(spans: list[Span], name: str) -> Span:
    matching = [s for s in spans if s.name == name]
    assert len(matching) == 1, f"{len(matching)} spans named {name!r}"
    return matching[0]


def test_one_trace_holds_the_spans_of_the_three_services_parented_across_them(traced):
    request_id, spans = traced
    by_id = {s.span_id: s for s in spans}
    assert {s.service for s in spans} == {GATEWAY, PLANNER, DECODER}
    root = one(spans, GENERATE)
    assert (root.service, root.kind, root.parent_id) == (GATEWAY, SERVER, "")
    assert root.attributes["glmimage.request_id"] == request_id and root.attributes["rpc.grpc.status_code"] == OK
    for span in spans:  # every span descends from the gateway's
        ancestor = span
        while ancestor.parent_id:
            ancestor = by_id[ancestor.parent_id]
        assert ancestor is root, f"{span.name} ({span.service}) is not under the gateway's span"
    # each stage's top span is a child of the gateway's attempt at that stage, on the same trace
    for name, service, attempt in ((PLAN, PLANNER, "planner attempt"), (DECODE, DECODER, "decoder attempt")):
        top = one(spans, name)
        parent = by_id[top.parent_id]
        assert (top.service, top.kind, parent.service, parent.name) == (service, SERVER, GATEWAY, attempt)
        assert parent.attributes["rpc.grpc.status_code"] == OK and not parent.error
        assert top.attributes["glmimage.request_id"] == request_id and top.attributes["rpc.grpc.status_code"] == OK


def test_the_phases_are_child_spans_of_each_stage(traced):
    _, spans = traced
    queues = {(s.service, s.attributes["glmimage.queue"]) for s in spans if s.name == "queue wait"}
    assert queues >= {(GATEWAY, "gateway admission"), (GATEWAY, "planner replica"), (GATEWAY, "decoder replica"),
                      (PLANNER, "planner slot"), (DECODER, "denoising slot")}  # fmt: skip
    planning = one(spans, "planning")
    assert planning.parent_id == one(spans, PLAN).span_id
    assert planning.events == ["first token", "preview grid done", "target grid done"]
    decode = one(spans, DECODE)
    for phase in ("prepare", "denoise", "vae decode", "encode"):
        assert one(spans, phase).parent_id == decode.span_id, phase


@pytest.fixture(scope="module")
def http_traced(cluster, receiver, traced):
    """A second request, over HTTP with a `traceparent`, and its trace. It tries the refusing decoder first: after
    one request that one is the least recently used of two idle replicas, and ties go to it, once the gateway's
    health poll has it SERVING again (a refusal takes a replica out of rotation until then)."""
    with ImageClient(cluster.gateway.address) as client:
        deadline = time.monotonic() + 10
        while not all(stage.serving for stage in client.server_info().stages):
            assert time.monotonic() < deadline, "a replica stayed out of rotation"
            time.sleep(0.1)
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    body = json.dumps({"prompt": PROMPT, "size": "256x256", "num_inference_steps": 2, "seed": 2}).encode()
    headers = {"Content-Type": "application/json", "traceparent": f"00-{trace_id}-{parent_id}-01"}
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.http_port}/v1/images/generations", body, headers)
    with urllib.request.urlopen(request, timeout=300) as reply:
        assert reply.status == 200
        request_id = reply.headers["X-Request-Id"]
    spans = receiver.request_trace(request_id, {"POST /v1/images/generations", PLAN, DECODE, "encode"})
    assert spans, "the request's trace did not arrive"
    return request_id, trace_id, parent_id, spans


def test_an_http_request_continues_the_trace_of_its_traceparent(http_traced):
    request_id, trace_id, parent_id, spans = http_traced
    assert {s.trace_id for s in spans} == {trace_id}
    assert {s.service for s in spans} == {GATEWAY, PLANNER, DECODER}
    http = one(spans, "POST /v1/images/generations")
    assert (http.kind, http.parent_id, http.attributes["http.response.status_code"]) == (SERVER, parent_id, 200)
    generate = one(spans, "generate")  # the image's: a request may ask for several
    assert generate.parent_id == http.span_id and generate.attributes["glmimage.request_id"] == request_id


def test_a_failed_attempt_at_a_replica_is_a_span_with_its_address_and_status(cluster, http_traced):
    _, trace_id, _, spans = http_traced
    attempts = sorted((s for s in spans if s.name == "decoder attempt"), key=lambda s: s.attributes["glmimage.attempt"])
    replicas = [a.attributes["glmimage.replica"] for a in attempts]
    assert replicas == [cluster.refusing_address, cluster.pods("decoder")[0].address]
    assert [(a.attributes["rpc.grpc.status_code"], a.error) for a in attempts] == [(UNAVAILABLE, True), (OK, False)]
    # the refused call carried the failed attempt's W3C trace context in its metadata
    refused = [m["traceparent"] for m in cluster.refusing.refused if m["traceparent"].split("-")[1] == trace_id]
    assert len(refused) == 1 and refused[0].split("-")[2] == attempts[0].span_id
    assert one(spans, DECODE).parent_id == attempts[1].span_id


def test_json_logs_of_the_three_services_carry_the_request_and_trace_ids(cluster, traced):
    request_id, spans = traced
    trace_id = spans[0].trace_id
    phases = {"gateway": {"admission", "first_plan_token", "planning", "total"},
              "planner0": {"queue", "first_token", "total"},
              "decoder0": {"prepare", "queue", "denoise", "vae", "encode", "total"}}  # fmt: skip
    for service, expected in phases.items():
        text = (cluster.log_dir / f"{service}.log").read_text()
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("request_id") == request_id]
        assert mine and {line.get("trace_id") for line in mine} == {trace_id}, service
        summaries = [line for line in mine if "outcome" in line]
        assert len(summaries) == 1, f"{service}: {len(summaries)} summary lines"
        summary = summaries[0]
        assert (summary["outcome"], summary["status_code"]) == ("completed", "OK"), service
        assert expected <= summary["seconds"].keys(), service
