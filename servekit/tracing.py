"""Traces (OpenTelemetry), configured by the standard OTEL_* environment variables.

Exporting starts when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, over OTLP
http/protobuf (the default) or grpc as OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL says; the SDK reads the rest itself
(OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_BSP_*, headers, TLS). Unset, the SDK is
not even imported: spans are the API's no-ops and no gRPC interceptor is installed.

The trace crosses processes as W3C trace context: `metadata()` adds it to a call's gRPC metadata, the server
interceptor and `start_server_span()` (HTTP) continue it. Spans opened inside async generators (streamed
handlers) are never made current: a stream whose client left is closed later from another task, where
detaching a context fails; they are opened with `tracer.start_span`, which leaves the context alone.
"""

import os
import time

import grpc
from opentelemetry import context, propagate, trace

from servekit.errors import wrap_calls
from servekit.metrics import final_status

tracer = trace.get_tracer("glmimage")
_enabled = False


def _otlp(setting: str) -> str:
    """An OTLP exporter setting for traces: OTEL_EXPORTER_OTLP_TRACES_<setting>, else OTEL_EXPORTER_OTLP_<setting>."""
    return os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{setting}") or os.environ.get(f"OTEL_EXPORTER_OTLP_{setting}", "")


def exporter():
    """The OTLP span exporter the environment asks for; None without an endpoint (nothing is exported)."""
    if not _otlp("ENDPOINT"):
        return None
    protocol = _otlp("PROTOCOL") or "http/protobuf"  # the specification's default
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    elif protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be http/protobuf or grpc, got {protocol!r}")
    return OTLPSpanExporter()  # endpoint, headers, timeout, TLS: from the OTEL_EXPORTER_OTLP_* variables


def setup(service_name: str) -> bool:
    """Exports this process's spans as `service_name` (OTEL_SERVICE_NAME or a service.name in
    OTEL_RESOURCE_ATTRIBUTES win) when the environment names an OTLP endpoint; returns whether it does."""
    global _enabled
    span_exporter = exporter()
    if span_exporter is None:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: service_name, **OTELResourceDetector().detect().attributes})
    provider = TracerProvider(resource=resource)  # flushes its spans at exit
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


def enabled() -> bool:
    return _enabled


def metadata(base: tuple = ()) -> tuple:
    """gRPC metadata: `base` plus the current span's W3C trace context (`traceparent`) when tracing is on."""
    if not _enabled:
        return base
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*base, *carrier.items())


def start_server_span(name: str, carrier, **attributes) -> trace.Span:
    """A SERVER span that continues the trace whose context `carrier` (headers, metadata) holds, if any."""
    return tracer.start_span(name, propagate.extract(carrier), trace.SpanKind.SERVER, attributes)


def set_status(span: trace.Span, code: grpc.StatusCode | None, description: str = "") -> None:
    """Records a call's gRPC status on `span`: ERROR unless OK (None: it failed without a status)."""
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(trace.StatusCode.ERROR, description or (code.name if code else None))


def waited(seconds: float, queue: str) -> None:
    """A "queue wait" span that ends now, `seconds` long: for queues that report the wait once it is over."""
    end = time.time_ns()
    span = tracer.start_span("queue wait", start_time=end - int(seconds * 1e9), attributes={"glmimage.queue": queue})
    span.end(end_time=end)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """What a gRPC server adds, outermost, when tracing is on (it then sees every call's final status)."""
    return [_TracingInterceptor()] if _enabled else []


def _traced(method: str) -> bool:
    # health checks, reflection and the gateways' ServerInfo polls come every second: a trace each is noise
    return not method.startswith("/grpc.") and not method.endswith("/GetServerInfo")


def _begin(method: str, servicer_context: grpc.aio.ServicerContext):
    service, _, name = method.lstrip("/").rpartition("/")
    span = start_server_span(method.lstrip("/"), dict(servicer_context.invocation_metadata() or ()),
                             **{"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})  # fmt: skip
    # Current for the rest of the call's task (grpc runs each call in a task of its own, whose context goes with
    # it): never detached, as a streamed handler may be closed from another task.
    context.attach(trace.set_span_in_context(span))

    def end(error: BaseException | None) -> None:
        set_status(span, final_status(servicer_context, error), servicer_context.details() or "")
        span.end()

    return end


class _TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per call, child of the caller's span when its metadata carries a trace context."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not _traced(method):
            return handler
        return wrap_calls(handler, lambda servicer_context: _begin(method, servicer_context))
