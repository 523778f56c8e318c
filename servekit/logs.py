"""Logging: text lines for terminals (the default) or one JSON object a line for log collectors
(--log-format json). Every line logged while a request is served carries its request id and trace ids
(JSON: `request_id`, `trace_id`, `span_id`; text: appended in brackets); each service ends a request
with one summary line (`RequestLog`)."""

import contextlib
import contextvars
import json
import logging
import time
from datetime import UTC, datetime

import grpc
from opentelemetry import trace

from servekit.errors import status_code

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
IDS = ("request_id", "trace_id", "span_id")

# Set per request; asyncio tasks inherit it, and the decoder hands it to its worker thread with the trace.
_request_id = contextvars.ContextVar("request_id", default="")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", *IDS}


def _current_ids() -> dict[str, str]:
    ids = {"request_id": _request_id.get()}
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        ids.update(trace_id=format(span.trace_id, "032x"), span_id=format(span.span_id, "016x"))
    return {key: value for key, value in ids.items() if value}


class _RequestIds(logging.Filter):
    """Stamps each record with the ids of the request being served (unless the call passed its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _current_ids().items():
            record.__dict__.setdefault(key, value)
        return True


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, the request's ids, the call's `extra` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({key: record.__dict__[key] for key in IDS if record.__dict__.get(key)})
        line.update({key: value for key, value in record.__dict__.items() if key not in _STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The message, then the request's ids in brackets (before a traceback, if any)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        ids = " ".join(f"{key}={record.__dict__[key]}" for key in IDS if record.__dict__.get(key))
        return super().formatMessage(record) + (f" [{ids}]" if ids else "")


def log_handler(log_format: str, stream=None) -> logging.Handler:
    """A handler writing to `stream` (stderr) in `log_format` (text or json), with the request's ids."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestIds())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: str = "text") -> None:
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format)])
    logging.captureWarnings(True)  # library warnings as log lines too (JSON ones in a cluster)


class RequestLog:
    """`with RequestLog(logger, "plan", request_id, size="512x512") as summary:` around a request's work marks
    what runs inside with `request_id` (log lines, the current span), then logs one line as the work ends: the
    outcome, the status code, `summary.details` and `summary.seconds` (per phase, filled in as they end) with the
    total. The ids are taken at the start: a stream whose client left ends later, in another task."""

    def __init__(self, logger: logging.Logger, what: str, request_id: str, **details):
        self.logger = logger
        self.what = what
        self.request_id = request_id
        self.details = details
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> "RequestLog":
        self._token = _request_id.set(self.request_id)
        trace.get_current_span().set_attribute("glmimage.request_id", self.request_id)
        self._ids = _current_ids()
        self._started = time.perf_counter()
        return self

    def __exit__(self, kind, error: BaseException | None, traceback) -> None:
        code = status_code(error)
        outcome = {grpc.StatusCode.OK: "completed", grpc.StatusCode.CANCELLED: "cancelled",
                   grpc.StatusCode.INVALID_ARGUMENT: "invalid"}.get(code, "failed")  # fmt: skip
        seconds = {**self.seconds, "total": time.perf_counter() - self._started}
        details = "".join(f", {key} {value}" for key, value in self.details.items())
        phases = ", ".join(f"{phase} {value:.3f} s" for phase, value in seconds.items())
        self.logger.info(
            "%s %s: %s (%s)%s; %s", self.what, self.request_id, outcome, code.name, details, phases,
            extra={**self._ids, **self.details, "outcome": outcome, "status_code": code.name,
                   "seconds": {phase: round(value, 6) for phase, value in seconds.items()}},
        )  # fmt: skip
        with contextlib.suppress(ValueError):  # ended from another task: the request's own context is gone
            _request_id.reset(self._token)
