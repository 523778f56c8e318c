"""The gateway's OpenAI-compatible Images API over HTTP (--http-port): FastAPI served by uvicorn in the
gateway's own event loop. Every image goes through ImageServicer.generate, the path of gRPC Generate
(validation, admission, deadline, request ids, metrics); a client that goes away cancels its chains.

POST /v1/images/generations (JSON), POST /v1/images/edits (multipart), GET /v1/models[/{model}],
GET /livez (the process answers), GET /readyz (a planner and a decoder are SERVING and not draining)."""

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from gateway import openai_images
from gateway.openai_images import Image, ImageRequest
from gateway.servicer import ImageServicer
from glmimage.v1 import image_service_pb2
from servekit import metrics as request_metrics
from servekit import tracing
from servekit.errors import DeadlineExceeded, InvalidRequest, ServiceError, Unavailable
from servekit.validation import max_message_bytes

logger = logging.getLogger(__name__)

_END = object()  # a chain's event stream ended


@dataclass(frozen=True)
class HttpOptions:
    host: str
    port: int
    served_model_name: str
    max_images: int
    grace_seconds: float
    tls_cert_file: str = ""
    tls_key_file: str = ""


async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
    request.state.code = error.code.name  # for _Counted
    converted = openai_images.http_error(error)
    return JSONResponse(converted.body, converted.status, headers=converted.headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return await _service_error(request, openai_images.validation_error(error.errors()))


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (its body is read already, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """`work`'s result; None, with `work` cancelled, when the client goes away first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        for pending in (task, gone):
            pending.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)


class _BodyLimit:
    """Refuses a request body larger than any valid request (413) before reading it whole: the edit
    images come inline."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            message = f"the request body must be at most {self.max_bytes} bytes, got {length.decode(errors='replace')}"
            response = JSONResponse(openai_images.error_body(413, message, "request_too_large"), 413)
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"the request body must be at most {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


# The Images API requests counted in the shared request metrics under the gateway's stage, by path (a
# bounded set of label values).
STAGE = "gateway"
COUNTED_PATHS = ("/v1/images/generations", "/v1/images/edits")
# The status code name of an answer that no ServiceError made (those record their own code).
_CODES = {405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 499: "CANCELLED"}


def _code(status: int) -> str:
    return _CODES.get(status) or ("OK" if status < 400 else "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


class _Counted:
    """Counts and times each Images API request in the shared request metrics (servekit.metrics), as the
    gRPC interceptor does each call: until its last byte (streams included), by the gRPC status code name
    of the ServiceError it ended with (`request.state.code`), else by its HTTP status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in COUNTED_PATHS:
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 499  # no answer at all: the client or the server went away
        state = scope.setdefault("state", {})

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            request_metrics.observe(STAGE, scope["path"], state.get("code") or _code(status), started)


class _Traced:
    """A SERVER span per Images API request (not per probe), continuing the client's `traceparent`; current
    while the app answers, streamed responses included, so that its chains' spans are its children."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/images/"):
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        span = tracing.start_server_span(f"{scope['method']} {scope['path']}", headers,
                                         **{"http.request.method": scope["method"], "url.path": scope["path"]})  # fmt: skip

        async def send_traced(message):
            if message["type"] == "http.response.start":
                span.set_attribute("http.response.status_code", message["status"])
                if message["status"] >= 500:
                    span.set_status(trace.StatusCode.ERROR)
            await send(message)

        with trace.use_span(span, end_on_exit=True):
            await self.app(scope, receive, send_traced)


class HttpFront:
    """The HTTP server: `start()` binds the port (raising when it cannot) and serves in a task;
    `drain(grace)` leaves readiness, stops accepting and lets in-flight requests finish."""

    def __init__(self, servicer: ImageServicer, options: HttpOptions, ready: Callable[[], Awaitable[None]]):
        self.servicer = servicer
        self.options = options
        self.ready = ready  # raises while the gateway cannot serve (the gRPC readiness check)
        self.draining = False
        self.app = self._app()
        self.port = 0
        self.started_at = int(time.time())  # /v1/models' `created`
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.options.host else socket.AF_INET
        sock = socket.create_server((self.options.host, self.options.port), family=family, backlog=2048)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, lifespan="off", http="h11", ws="none", log_config=None, access_log=False,
            # uvicorn types it int; it is asyncio.timeout()'s delay, any float
            timeout_graceful_shutdown=self.options.grace_seconds,  # type: ignore[arg-type]
            ssl_certfile=self.options.tls_cert_file or None, ssl_keyfile=self.options.tls_key_file or None,
        )  # fmt: skip
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        self._task.add_done_callback(_log_exit)
        logger.info("HTTP (OpenAI Images API) on %s:%d", self.options.host, self.port)

    def serving(self) -> bool:
        """False once the HTTP server has stopped (it failed, or drained)."""
        return self._task is not None and not self._task.done()

    async def drain(self, grace: float) -> None:
        self.draining = True
        if self._server is None:
            return
        self._server.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]  # float: see start()
        self._server.should_exit = True
        assert self._task is not None  # started with the server
        await asyncio.gather(self._task, return_exceptions=True)

    # ---------------------------------------------------------------- the app
    def _app(self) -> FastAPI:
        app = FastAPI(title="GLM-Image gateway: OpenAI-compatible Images API")
        limits = self.servicer.limits
        app.add_middleware(_BodyLimit, max_bytes=max_message_bytes(limits))
        app.add_middleware(_Counted)  # outside _BodyLimit: its refusals count too
        if tracing.enabled():
            app.add_middleware(_Traced)  # added last: outermost, it sees every answer
        # Starlette types a handler as taking any Exception; it calls each only with the class it is added for
        app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
        app.add_exception_handler(HTTPException, _http_exception)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, _internal_error)
        authorized = [Depends(self._authorize)]

        @app.post("/v1/images/generations", dependencies=authorized)
        async def generations(body: ImageRequest, request: Request) -> Response:
            return await self._images(request, body, [], "image_generation")

        @app.post("/v1/images/edits", dependencies=authorized)
        async def edits(request: Request) -> Response:
            body, images = await self._edit_form(request)
            return await self._images(request, body, images, "image_edit")

        @app.get("/v1/models", dependencies=authorized)
        async def models() -> dict:
            return {"object": "list", "data": [self._model()]}

        @app.get("/v1/models/{model:path}", dependencies=authorized)
        async def model(model: str) -> dict:
            openai_images.check_model(model, self.options.served_model_name)
            return self._model()

        @app.get("/livez")
        async def livez() -> dict:
            return {"status": "alive"}

        @app.get("/readyz")
        async def readyz() -> dict:
            if self.draining:
                raise Unavailable("the gateway is draining")
            await self.ready()
            return {"status": "ready"}

        return app

    def _model(self) -> dict:
        return {
            "id": self.options.served_model_name,
            "object": "model",
            "created": self.started_at,
            "owned_by": "glm-image-serve",
        }

    async def _authorize(self, request: Request) -> None:
        """The caller's key name, for the images it asks for (`request.state.key`)."""
        request.state.key = self.servicer.gatekeeper.authenticate(request.headers.get("authorization"))

    async def _edit_form(self, request: Request) -> tuple[ImageRequest, list[bytes]]:
        """The multipart form: the image files (`image` or `image[]`), the other fields as in generations
        (`sampling[temperature]` and so on for the sampling extension)."""
        max_files = self.servicer.limits.max_condition_images + 1  # more are refused with the limit's message
        async with request.form(max_files=max_files) as form:
            if "mask" in form:
                raise InvalidRequest("mask is not supported: the edit follows the prompt over the whole image",
                                     "mask")  # fmt: skip
            images = []
            for value in [*form.getlist("image"), *form.getlist("image[]")]:
                if not isinstance(value, UploadFile):
                    raise InvalidRequest("image must be a file (PNG, JPEG or WebP), not a text field", "image")
                images.append(await value.read())
            fields: dict = {}
            for key, value in form.multi_items():
                if key in ("image", "image[]"):
                    continue
                if isinstance(value, UploadFile):
                    raise InvalidRequest(f"{key} must be a text field, not a file", key)
                outer, _, inner = key.partition("[")
                if inner.endswith("]") and outer == "sampling":
                    fields.setdefault("sampling", {})[inner[:-1]] = value
                else:
                    fields[key] = value
        if not images:
            raise InvalidRequest("image is required: send one or more PNG, JPEG or WebP files as image or image[]",
                                 "image")  # fmt: skip
        try:
            return ImageRequest.model_validate(fields), images
        except ValidationError as error:
            raise openai_images.validation_error(error.errors()) from None

    # ---------------------------------------------------------------- images
    async def _images(self, request: Request, body: ImageRequest, images: list[bytes], kind: str) -> Response:
        openai_images.check_model(body.model, self.options.served_model_name)
        request_id = request.headers.get("x-request-id") or secrets.token_hex(8)
        requests = openai_images.generate_requests(
            body, images, request_id, self.servicer.limits, self.options.max_images
        )
        logger.info("%s: %s, n=%d, user %r", request_id, request.url.path, len(requests), body.user)
        headers = {"X-Request-Id": request_id}
        deadline = asyncio.get_running_loop().time() + self.servicer.default_timeout_s
        if body.stream:
            return await self._stream(request, requests[0], kind, deadline, headers)
        results = await _unless_disconnected(request, self._all(requests, deadline, request.state.key))
        if results is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        return JSONResponse(openai_images.images_response(results), headers=headers)

    async def _forward(self, request: image_service_pb2.GenerateRequest, deadline: float, key: str,
                       queue: asyncio.Queue) -> None:  # fmt: skip
        """Puts one chain's events into `queue`, then _END or the ServiceError it ended with."""
        try:
            async with asyncio.timeout_at(deadline):
                # a span per image (a request may ask for several), parent of its chain's
                with tracing.tracer.start_as_current_span("generate"):
                    async for event in self.servicer.generate(request, self.servicer.default_timeout_s, key):
                        await queue.put(event)
            await queue.put(_END)
        except TimeoutError:
            await queue.put(DeadlineExceeded(f"no image within the deadline of {self.servicer.default_timeout_s:g} s"))
        except ServiceError as error:
            await queue.put(error)
        except Exception:  # noqa: BLE001 - a bug: the client gets a 500, the log the trace
            logger.exception("%s: unhandled error", request.request_id)
            await queue.put(ServiceError("internal error; see the server log"))

    async def _image(self, request: image_service_pb2.GenerateRequest, deadline: float, key: str) -> Image:
        queue: asyncio.Queue = asyncio.Queue()
        producer = asyncio.create_task(self._forward(request, deadline, key, queue))
        try:
            chunks, completed = [], None
            while (item := await queue.get()) is not _END:
                if isinstance(item, ServiceError):
                    raise item
                kind = item.WhichOneof("event")
                if kind == "image_chunk":
                    chunks.append(item.image_chunk.data)
                elif kind == "completed":
                    completed = item.completed
            assert completed is not None  # a chain's events end with `completed`
            return Image(b"".join(chunks), completed)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    async def _all(self, requests: list[image_service_pb2.GenerateRequest], deadline: float,
                   key: str) -> list[Image]:  # fmt: skip
        """The n images at once (the planner batches their plans); the first failure cancels the others."""
        tasks = [asyncio.create_task(self._image(request, deadline, key)) for request in requests]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, request: Request, generate_request: image_service_pb2.GenerateRequest, kind: str,
                      deadline: float, headers: dict[str, str]) -> Response:  # fmt: skip
        """Server-sent events. Refusals (validation, admission) come before the stream starts, as HTTP
        statuses; a failure after it started is an `error` event."""
        queue: asyncio.Queue = asyncio.Queue()
        producer = asyncio.create_task(self._forward(generate_request, deadline, request.state.key, queue))
        first = None
        try:
            first = await _unless_disconnected(request, queue.get())
        finally:
            if first is None or isinstance(first, ServiceError):
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
        if first is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        if isinstance(first, ServiceError):
            raise first
        return StreamingResponse(self._events(request, queue, producer, kind), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})  # fmt: skip

    async def _events(self, request: Request, queue: asyncio.Queue, producer: asyncio.Task,
                      kind: str) -> AsyncIterator[bytes]:  # fmt: skip
        """Previews as partial images, then the completed image; cancelled (and the chain with it) when the
        client disconnects. How the stream ended goes into `request.state.code` (for _Counted)."""
        request.state.code = "CANCELLED"  # unless it ends otherwise: the client went away
        try:
            chunks = []
            while (item := await queue.get()) is not _END:
                if isinstance(item, ServiceError):
                    request.state.code = item.code.name
                    error = openai_images.http_error(item)
                    yield openai_images.sse({"type": "error", **error.body})
                    return
                event = item.WhichOneof("event")
                if event == "preview":
                    yield openai_images.sse(openai_images.partial_image_event(kind, item.preview))
                elif event == "image_chunk":
                    chunks.append(item.image_chunk.data)
                elif event == "completed":
                    yield openai_images.sse(
                        openai_images.completed_event(kind, Image(b"".join(chunks), item.completed))
                    )
            request.state.code = "OK"
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the service's event loop: the service owns SIGTERM/SIGINT and calls drain()."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _log_exit(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the HTTP server stopped", exc_info=task.exception())


async def _http_exception(request: Request, error: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status_code, "http_error")
    return JSONResponse(openai_images.error_body(error.status_code, str(error.detail), code), error.status_code,
                        headers=error.headers)  # fmt: skip


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s", request.url.path, exc_info=error)
    return JSONResponse(openai_images.error_body(500, "internal error; see the server log", "internal"), 500)
