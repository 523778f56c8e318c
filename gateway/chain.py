"""One Generate request, chained through a planner and a decoder.

The planner's chunks go to the decoder as they arrive and are kept, so that:
- a decoder that fails (at any point, or stops sending events while it holds the whole plan) is
  replaced by another one, which gets the kept plan replayed: the AR stage does not run again;
- a planner that fails or stalls (before or during its plan) is replaced by another one, and the
  decoder restarts on the new plan.
Both are bounded by the request's deadline and each stage's attempt budget. A stage that answers
RESOURCE_EXHAUSTED is busy, not broken: the request waits for room again without using an attempt.

Binding to a decoder: the request waits for a decoder once its plan is nearly done, i.e. when the
tokens left at the rate seen so far take less than `options.bind_lead_s` (or the plan is complete),
so it is bound to the decoder that is free soonest while its preparation still overlaps the end of
the plan stream. Image chunks are released to the client when the decoder completes, so a replay
never duplicates image bytes.

Previews (best effort, never waited for): once the plan's preview grid is written (text-to-image),
the decoder with the fewest of this gateway's requests is asked to render it (RenderPreview: a
decoder with any Decode call refuses at once, one whose call's plan completes meanwhile stops); the
decoder that makes the image is asked for the previews still missing, from its denoising steps. The
client gets at most the number asked for, indexed in the order they came.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from gateway import metrics
from gateway.replicas import Replica, ReplicaPool
from glmimage.v1 import common_pb2, decoder_pb2, image_service_pb2, planner_pb2
from servekit import tracing
from servekit.errors import ServiceError, Unavailable, UpstreamError, status_details

logger = logging.getLogger(__name__)

# Worth another replica: the replica is gone or shedding the request. (RESOURCE_EXHAUSTED: busy, wait.)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}


@dataclass(frozen=True)
class ChainOptions:
    planner_attempts: int = 3
    decoder_attempts: int = 3
    bind_lead_s: float = 1.0  # bind to a decoder when the plan has about this long left (inf: at once)
    stall_s: float = 30.0  # a stage that should be working and sends nothing for this long has failed


@dataclass
class ResolvedRequest:
    """A GenerateRequest after the gateway filled in every default."""

    request_id: str
    prompt: str
    width: int
    height: int
    seed: int
    steps: int | None  # None: the decoder's default
    guidance_scale: float | None
    sampling: common_pb2.PlanSampling
    condition_images: list[common_pb2.InputImage]
    output_format: common_pb2.ImageFormat
    output_quality: int | None = None  # JPEG/WebP; None: the decoder's default
    previews: int = 0  # preview images wanted

    def plan_request(self) -> planner_pb2.PlanRequest:
        return planner_pb2.PlanRequest(
            request_id=self.request_id, prompt=self.prompt, width=self.width, height=self.height,
            seed=self.seed, sampling=self.sampling, condition_images=self.condition_images,
        )  # fmt: skip

    def decode_spec(self) -> decoder_pb2.DecodeSpec:
        spec = decoder_pb2.DecodeSpec(
            request_id=self.request_id, prompt=self.prompt, width=self.width, height=self.height,
            seed=self.seed, condition_images=self.condition_images, output_format=self.output_format,
        )  # fmt: skip
        if self.steps is not None:
            spec.num_inference_steps = self.steps
        if self.guidance_scale is not None:
            spec.guidance_scale = self.guidance_scale
        if self.output_quality is not None:
            spec.output_quality = self.output_quality
        return spec


class _PlanRestarted(Exception):
    """The decoder's plan was withdrawn: a planner failed and another one starts over."""


class _ReplicaFailed(Exception):
    """The replica misbehaved without a status: it stalled, or ended its stream early. Try another."""


@dataclass
class _Failed:
    error: BaseException


@dataclass
class _Done:
    completed: common_pb2.Completed


def _progress(stage: common_pb2.Stage, done: int, total: int) -> image_service_pb2.GenerateEvent:
    return image_service_pb2.GenerateEvent(progress=common_pb2.Progress(stage=stage, done=done, total=total))


def _describe(error: BaseException) -> str:
    return error.code().name if isinstance(error, grpc.aio.AioRpcError) else str(error)


async def _next(iterator, quiet_until: Callable[[], float], stall_s: float):
    """The next item of a call's stream; _ReplicaFailed once time.monotonic() passes `quiet_until()`, which
    is asked again every second (it moves: a decoder must be sending only once it holds the plan)."""
    read = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            left = quiet_until() - time.monotonic()
            if left <= 0:
                raise _ReplicaFailed(f"no event for {stall_s:g} s")
            done, _ = await asyncio.wait({read}, timeout=min(left, 1.0))
            if done:
                return read.result()
    finally:
        if not read.done():
            read.cancel()


class Chain:
    def __init__(self, request: ResolvedRequest, planners: ReplicaPool, decoders: ReplicaPool, arrival: float,
                 deadline: float, options: ChainOptions):  # fmt: skip
        self.request = request
        self.planners = planners
        self.decoders = decoders
        self.arrival = arrival  # time.monotonic() at admission: the request's place in the stage queues
        self.deadline = deadline  # time.monotonic() by which everything must be done
        self.options = options
        self.metadata = (("x-request-id", request.request_id),)
        self.events: asyncio.Queue = asyncio.Queue()
        # the plan as received so far; `epoch` counts planner restarts
        self.plan: list[planner_pb2.PlanChunk] = []
        self.plan_complete = False
        self.plan_tokens = (0, 0)  # (received, total) of this epoch
        self.plan_started_at = 0.0  # first token of this epoch
        self.epoch = 0
        self.plan_changed = asyncio.Condition()
        self.decode_call: grpc.aio.StreamStreamCall | None = None
        self.planners_used = 0
        self.decoders_used = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.plan_done_at: float | None = None
        self.previews_sent = 0
        self.plan_preview: asyncio.Task | None = None  # rendering the plan's preview grid (once per request)

    def _remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def _error(self, stage: str, error: grpc.aio.AioRpcError) -> ServiceError:
        return UpstreamError(error.code(), f"{stage}: {error.details()}", status_details(error))

    def _exhausted(self, stage: str, attempts: int, last: BaseException | None) -> Unavailable:
        detail = f" (last error: {last.details() if isinstance(last, grpc.aio.AioRpcError) else last})" if last else ""
        return Unavailable(
            f"{stage}: no replica could serve the request after {attempts} attempt(s){detail}", stage=stage
        )

    async def _run_stage(self, stage: str, pool: ReplicaPool, attempts: int, once, on_failure=None):
        """Runs `once(replica)` on replicas leased from `pool` until it succeeds: a busy replica
        (RESOURCE_EXHAUSTED) means wait again, a failed or stalled one means the next attempt."""
        tried: set[str] = set()
        last: BaseException | None = None
        used = 0
        while used < attempts:
            with tracing.tracer.start_span("queue wait", attributes={"glmimage.queue": f"{stage} replica"}):
                replica = await pool.lease(self.arrival, tried, self.deadline)
            # current while it runs: the call's metadata carries it, so the replica's spans are its children
            with tracing.tracer.start_as_current_span(f"{stage} attempt", kind=trace.SpanKind.CLIENT) as span:
                span.set_attributes({"glmimage.replica": replica.host_port, "glmimage.attempt": used + 1})
                try:
                    result = await once(replica)
                    tracing.set_status(span, grpc.StatusCode.OK)
                    return result, used + 1
                except grpc.aio.AioRpcError as error:
                    tracing.set_status(span, error.code(), error.details())
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        pool.overloaded(replica)
                        continue
                    if error.code() not in RETRYABLE:
                        raise self._error(stage, error) from None
                    last = error
                except _ReplicaFailed as error:
                    tracing.set_status(span, None, str(error))
                    last = error
                finally:
                    pool.release(replica)
            used += 1
            tried.add(replica.address)
            logger.warning("%s: %s %s failed (%s); trying another", self.request.request_id, stage,
                           replica.host_port, _describe(last))  # fmt: skip
            pool.failed(replica)
            metrics.RETRIES.labels(stage).inc()
            if on_failure is not None:
                await on_failure()
        raise self._exhausted(stage, used, last)

    # ---------------------------------------------------------------- planner side
    async def _plan_once(self, replica: Replica) -> None:
        call = replica.stub.Plan(
            self.request.plan_request(), timeout=self._remaining(), metadata=tracing.metadata(self.metadata)
        )
        chunks = aiter(call)
        stall_s = self.options.stall_s
        last = time.monotonic()

        def quiet_until() -> float:
            return last + stall_s

        try:
            while True:
                try:
                    chunk = await _next(chunks, quiet_until, stall_s)
                except StopAsyncIteration:
                    break
                last = time.monotonic()
                await self._add_chunk(chunk)
            if not self.plan or not self.plan[-1].HasField("summary"):
                raise _ReplicaFailed("it closed the stream before its plan was complete")
        except BaseException:
            call.cancel()
            raise
        async with self.plan_changed:
            self.plan_complete = True
            self.plan_done_at = time.perf_counter()
            self.plan_changed.notify_all()

    async def _add_chunk(self, chunk: planner_pb2.PlanChunk) -> None:
        kind = chunk.WhichOneof("chunk")
        async with self.plan_changed:
            if kind == "header":
                h = chunk.header
                self.plan_tokens = (0, h.preview_rows * h.preview_cols + h.target_rows * h.target_cols)
            elif kind == "tokens":
                now = time.perf_counter()
                self.first_token_at = self.first_token_at or now
                self.plan_started_at = self.plan_started_at or now
                self.plan_tokens = (self.plan_tokens[0] + len(chunk.tokens.ids), self.plan_tokens[1])
            self.plan.append(chunk)
            self.plan_changed.notify_all()
        if kind == "tokens":
            await self.events.put(_progress(common_pb2.STAGE_PLANNING, *self.plan_tokens))
            if chunk.tokens.grid == planner_pb2.GRID_PREVIEW and self.request.previews and self.plan_preview is None:
                grid = self._complete_preview_grid()
                if grid is not None:
                    self.plan_preview = asyncio.create_task(self._render_plan_preview(*grid))

    def _complete_preview_grid(self) -> tuple[planner_pb2.PlanHeader, list[int]] | None:
        header = self.plan[0].header
        ids = [i for chunk in self.plan[1:] if chunk.HasField("tokens") and chunk.tokens.grid == planner_pb2.GRID_PREVIEW
               for i in chunk.tokens.ids]  # fmt: skip
        return (header, ids) if header.preview_rows and len(ids) == header.preview_rows * header.preview_cols else None

    # ---------------------------------------------------------------- previews
    async def _render_plan_preview(self, header: planner_pb2.PlanHeader, ids: list[int]) -> None:
        replica = self.decoders.lease_best_effort()
        if replica is None:
            logger.debug("%s: plan preview skipped: no decoder free for it", self.request.request_id)
            return
        request = decoder_pb2.PreviewRequest(
            request_id=self.request.request_id, prompt=self.request.prompt, seed=self.request.seed,
            plan_format=header.plan_format, rows=header.preview_rows, cols=header.preview_cols, ids=ids,
            guidance_scale=self.request.guidance_scale, output_format=self.request.output_format,
            output_quality=self.request.output_quality,
        )  # fmt: skip
        try:
            preview = await replica.stub.RenderPreview(
                request, timeout=self._remaining(), metadata=tracing.metadata(self.metadata)
            )
        except grpc.aio.AioRpcError as error:
            logger.debug("%s: plan preview skipped by %s: %s", self.request.request_id, replica.host_port,
                         error.code().name)  # fmt: skip
            return
        finally:
            self.decoders.release_best_effort(replica)
        await self._emit_preview(preview)

    def _previews_left(self) -> int:
        """Previews still wanted from the decoder: asked for, less sent and less a plan preview underway."""
        underway = self.plan_preview is not None and not self.plan_preview.done()
        return max(self.request.previews - self.previews_sent - underway, 0)

    async def _emit_preview(self, preview: common_pb2.PreviewImage) -> None:
        if self.previews_sent >= self.request.previews:
            return  # a replayed decode's, or the decoder's beyond a plan preview that came late
        event = image_service_pb2.GenerateEvent(preview=preview)
        event.preview.index = self.previews_sent
        self.previews_sent += 1
        await self.events.put(event)

    async def _restart_plan(self) -> None:
        async with self.plan_changed:
            self.plan, self.plan_complete, self.epoch = [], False, self.epoch + 1
            self.plan_tokens, self.plan_started_at = (0, 0), 0.0
            self.plan_changed.notify_all()
        if self.decode_call is not None:
            self.decode_call.cancel()

    async def _run_planner(self) -> None:
        _, self.planners_used = await self._run_stage(
            "planner", self.planners, self.options.planner_attempts, self._plan_once, self._restart_plan
        )

    # ---------------------------------------------------------------- decoder side
    def _near_done(self) -> bool:
        """The plan is complete, or its tokens left take less than the bind lead at the rate so far."""
        if self.plan_complete:
            return True
        done, total = self.plan_tokens
        if done < 2:
            return self.options.bind_lead_s == float("inf")
        rate = done / max(time.perf_counter() - self.plan_started_at, 1e-6)
        return (total - done) / rate <= self.options.bind_lead_s

    async def _wait_to_bind(self) -> None:
        # re-checked at each chunk: chunks come at least every few tens of milliseconds
        async with self.plan_changed:
            await self.plan_changed.wait_for(self._near_done)

    async def _feed(self, call: grpc.aio.StreamStreamCall, epoch: int, fed: list[float]) -> None:
        spec = self.request.decode_spec()
        spec.previews = self._previews_left()
        await call.write(decoder_pb2.DecodeRequest(spec=spec))
        sent = 0

        def more() -> bool:
            return self.epoch != epoch or len(self.plan) > sent or self.plan_complete

        while True:
            async with self.plan_changed:
                await self.plan_changed.wait_for(more)
                if self.epoch != epoch:
                    return
                pending, complete = self.plan[sent:], self.plan_complete
            for chunk in pending:
                await call.write(decoder_pb2.DecodeRequest(plan_chunk=chunk))
            sent += len(pending)
            if complete and sent == len(self.plan):
                await call.done_writing()
                fed.append(time.monotonic())
                return

    async def _decode_once(self, replica: Replica) -> common_pb2.Completed:
        epoch = self.epoch
        call = replica.stub.Decode(timeout=self._remaining(), metadata=tracing.metadata(self.metadata))
        self.decode_call = call
        fed: list[float] = []  # when the decoder got the whole plan: from then on it must keep sending events
        feeder = asyncio.create_task(self._feed(call, epoch, fed))
        events = aiter(call)
        image: list[bytes] = []
        stall_s = self.options.stall_s
        last = 0.0

        def quiet_until() -> float:
            return max(fed[0], last) + stall_s if fed else math.inf

        try:
            while True:
                try:
                    event = await _next(events, quiet_until, stall_s)
                except StopAsyncIteration:
                    break
                last = time.monotonic()
                kind = event.WhichOneof("event")
                if kind == "progress":
                    if event.progress.done:  # done == 0: a heartbeat while it waits for a slot
                        await self.events.put(image_service_pb2.GenerateEvent(progress=event.progress))
                elif kind == "preview":
                    await self._emit_preview(event.preview)
                elif kind == "image_chunk":
                    image.append(event.image_chunk.data)
                else:
                    # the stream's end (its OK status) before `finally` cancels the call: a decoder that completed
                    # must not see its call cancelled (its status, its metrics and its trace say so)
                    with contextlib.suppress(StopAsyncIteration):
                        await _next(events, quiet_until, stall_s)
                    for data in image:
                        await self.events.put(
                            image_service_pb2.GenerateEvent(image_chunk=common_pb2.ImageChunk(data=data))
                        )
                    return event.completed
            raise _ReplicaFailed("it closed the stream without completing")
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
            # A plan restart cancels this call; reading it then raises CancelledError (or CANCELLED)
            # although this task itself is not being cancelled.
            task = asyncio.current_task()
            assert task is not None  # a coroutine of the chain's tasks
            own_cancel = isinstance(error, asyncio.CancelledError) and task.cancelling()
            cancelled = isinstance(error, asyncio.CancelledError) or error.code() == grpc.StatusCode.CANCELLED
            if cancelled and not own_cancel and self.epoch != epoch:
                raise _PlanRestarted() from None
            raise
        finally:
            call.cancel()
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            self.decode_call = None

    async def _run_decoder(self) -> common_pb2.Completed:
        while True:
            await self._wait_to_bind()
            try:
                completed, self.decoders_used = await self._run_stage(
                    "decoder", self.decoders, self.options.decoder_attempts, self._decode_once
                )
                return completed
            except _PlanRestarted:
                continue  # not the decoder's fault: bind again once the new plan is nearly done

    # ---------------------------------------------------------------- the whole request
    async def _guard(self, coroutine, done_factory=None) -> None:
        try:
            result = await coroutine
            if done_factory is not None:
                await self.events.put(done_factory(result))
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - handed to the request's stream
            await self.events.put(_Failed(error))

    def _completed(self, decoded: common_pb2.Completed) -> common_pb2.Completed:
        completed = common_pb2.Completed()
        completed.CopyFrom(decoded)
        t = completed.timings
        if self.first_token_at:
            t.first_plan_token_seconds = self.first_token_at - self.started
            metrics.FIRST_PLAN_TOKEN_SECONDS.observe(t.first_plan_token_seconds)
        if self.plan_done_at:
            t.planning_seconds = self.plan_done_at - self.started
        t.total_seconds = time.perf_counter() - self.started
        metrics.END_TO_END_SECONDS.observe(t.total_seconds)
        completed.request_id = self.request.request_id
        completed.planner_attempts = self.planners_used
        completed.decoder_attempts = self.decoders_used
        completed.previews = self.previews_sent
        metrics.PREVIEWS.labels("sent").inc(self.previews_sent)
        metrics.PREVIEWS.labels("skipped").inc(self.request.previews - self.previews_sent)
        return completed

    async def run(self):
        """Yields GenerateEvents after `accepted`: progress, image chunks, then completed."""
        planner = asyncio.create_task(self._guard(self._run_planner()))
        decoder = asyncio.create_task(self._guard(self._run_decoder(), _Done))
        try:
            while True:
                item = await self.events.get()
                if isinstance(item, _Failed):
                    raise item.error
                if isinstance(item, _Done):
                    # The image came from a complete plan: the planner's call has only its status left to send
                    # (a fast decoder can finish first). It ends as a success, counted, rather than cancelled.
                    await asyncio.wait({planner}, timeout=self._remaining())
                    yield image_service_pb2.GenerateEvent(completed=self._completed(item.completed))
                    return
                yield item
        finally:
            tasks = [planner, decoder, *([self.plan_preview] if self.plan_preview else [])]
            for task in tasks:
                task.cancel()
            if self.decode_call is not None:
                self.decode_call.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
