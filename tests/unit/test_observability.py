"""Tracing set-up from the OTEL_* environment, and log lines with the request's ids (servekit.tracing, .logs)."""

import asyncio
import io
import json
import logging
import os
import subprocess
import sys

import grpc
import pytest
from opentelemetry import trace

from servekit import logs, tracing
from servekit.errors import InvalidRequest, Overloaded, status_code

pytestmark = pytest.mark.unit

TRACE_ID, SPAN_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0x00F067AA0BA902B7


def run_python(code: str, **environment: str) -> str:
    """`code`'s output in a fresh interpreter (tracing is set up once per process) with no OTEL_* variable
    but `environment`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | environment
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_without_an_endpoint_nothing_is_exported_and_the_sdk_is_not_even_loaded():
    out = run_python(
        "import sys; from servekit import tracing\n"
        "print(tracing.setup('glm-image-gateway'), tracing.server_interceptors(), tracing.metadata((('k', 'v'),)),\n"
        "      tracing.tracer.start_span('x').is_recording(),\n"
        "      sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))"
    )
    assert out.split() == ["False", "[]", "(('k',", "'v'),)", "False", "[]"]


def test_an_endpoint_starts_exporting_under_the_service_name_unless_otel_service_name_says_otherwise():
    code = (
        "from opentelemetry import trace; from servekit import tracing\n"
        "print(tracing.setup('glm-image-planner'), trace.get_tracer_provider().resource.attributes['service.name'],\n"
        "      tracing.tracer.start_span('x').is_recording(), len(tracing.server_interceptors()))"
    )
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}  # never reached: no span ends
    assert run_python(code, **endpoint).split() == ["True", "glm-image-planner", "True", "1"]
    assert run_python(code, **endpoint, OTEL_SERVICE_NAME="planner-eu").split()[1] == "planner-eu"


@pytest.mark.parametrize(
    "environment, module",
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http"),  # the spec's default protocol
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "http"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "grpc"),
    ],
)
def test_the_protocol_picks_the_otlp_exporter(monkeypatch, environment, module):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert type(tracing.exporter()).__module__ == f"opentelemetry.exporter.otlp.proto.{module}.trace_exporter"


def test_an_unsupported_protocol_is_refused(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/protobuf or grpc"):
        tracing.exporter()


@pytest.mark.parametrize(
    "error, code",
    [(None, grpc.StatusCode.OK), (InvalidRequest("bad"), grpc.StatusCode.INVALID_ARGUMENT),
     (asyncio.CancelledError(), grpc.StatusCode.CANCELLED), (GeneratorExit(), grpc.StatusCode.CANCELLED),
     (RuntimeError("bug"), grpc.StatusCode.INTERNAL)],
)  # fmt: skip
def test_the_status_a_call_ends_with(error, code):
    assert status_code(error) == code


def log_a_request(log_format: str) -> list[str]:
    """The lines of a request refused for room, inside a span: one while it works, its summary, one after."""
    stream = io.StringIO()
    logger = logging.getLogger(f"test.{log_format}")
    logger.addHandler(logs.log_handler(log_format, stream))
    logger.propagate, logger.level = False, logging.INFO
    span = trace.NonRecordingSpan(trace.SpanContext(TRACE_ID, SPAN_ID, is_remote=False))

    with trace.use_span(span):
        with pytest.raises(Overloaded), logs.RequestLog(logger, "plan", "req-1", size="512x512") as summary:
            logger.info("working")
            summary.seconds["queue"] = 0.25
            raise Overloaded("full")
        logger.info("after the request")  # in the span still
    return stream.getvalue().splitlines()


def test_json_lines_carry_the_request_and_trace_ids_and_the_summary_its_fields():
    working, summary, after = [json.loads(line) for line in log_a_request("json")]
    ids = {"request_id": "req-1", "trace_id": f"{TRACE_ID:032x}", "span_id": f"{SPAN_ID:016x}"}
    assert working["message"] == "working" and working.items() >= ids.items()
    fields = {"outcome": "failed", "status_code": "RESOURCE_EXHAUSTED", "size": "512x512"}
    assert summary.items() >= {**ids, **fields}.items()
    assert summary["seconds"]["queue"] == 0.25 and summary["seconds"]["total"] >= 0
    # no request any more (other keys may be there: vLLM, once imported, stamps every record with its process name)
    assert "request_id" not in after and after.keys() >= {"time", "level", "logger", "message", "trace_id", "span_id"}


def test_text_lines_append_the_ids():
    working, summary, after = log_a_request("text")
    ids = f"trace_id={TRACE_ID:032x} span_id={SPAN_ID:016x}]"
    assert working.endswith(f"INFO test.text: working [request_id=req-1 {ids}")
    assert "plan req-1: failed (RESOURCE_EXHAUSTED), size 512x512; queue 0.250 s, total " in summary
    assert summary.endswith(f"[request_id=req-1 {ids}") and after.endswith(f"after the request [{ids}")
