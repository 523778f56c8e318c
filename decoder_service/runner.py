"""Runs decodes on an engine: admission, the worker thread, overlap with the plan stream, progress,
cancellation and deadlines. No gRPC and no torch: it speaks the domain types of `domain.py`.

One Decode call:
  spec (validated) -> a place among the calls waiting (RESOURCE_EXHAUSTED when none is left)
  -> condition images read in a thread -> engine.prepare starts in the worker while plan chunks
  are read -> header: engine.add_conditions (i2i) -> plan complete -> a denoising slot (heartbeats
  while waiting for it) -> engine.begin, then engine.step with a Progress after each (and a
  Preview after the steps `previews.preview_steps` picks) -> engine.finish (VAE) -> the image
  encoded -> ImageChunks -> Completed.
The slot is taken only once the plan is complete, so the device never idles while a plan is still
being written. A bad chunk, a failed job, the end of the stream before the plan is complete, or no
plan chunk for `plan_stall_timeout_s` ends the call with that error at once; chunks that arrive
while it denoises are still checked. Between two steps the call checks its deadline, and it gives
up before taking a slot when the steps cannot finish in time; a cancelled call (client gone,
deadline, error) frees its slot only once the worker has finished the job in progress, so it stops
within one step.

All engine work runs as jobs on one worker thread, in the order submitted: the steps of concurrent
calls (max_concurrent_decodes > 1) interleave one by one, and one call's preparation runs between
another's steps, while only one step's activations are ever alive on the device. A plan preview
(`render_preview`) is one job that gives up between two of its steps as soon as a plan is complete.
"""

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from decoder_service import metrics
from decoder_service.domain import (
    Completed,
    DecodeEvent,
    DecodeJob,
    ImageChunk,
    ImageFormat,
    Plan,
    PlanHeader,
    PlanItem,
    Preview,
    Progress,
    Timings,
)
from decoder_service.engine import DecoderEngine, EngineInfo
from decoder_service.images import chunks, encode_image
from decoder_service.plan import PlanAssembler, PlanExpectations
from decoder_service.previews import preview_steps, render_estimate, render_plan_preview
from servekit import plan_format, tracing
from servekit.admission import Admission, Ticket
from servekit.errors import Busy, DeadlineExceeded, NotReady, Preempted, Stalled
from servekit.logs import RequestLog

logger = logging.getLogger(__name__)
CANCEL_GRACE_S = 0.1  # grpc cancels a call within microseconds of ending its request stream


@dataclass(frozen=True)
class RunnerOptions:
    max_concurrent_decodes: int = 1
    max_queued: int = 8  # calls admitted without a slot: preparing, waiting for their plan or a slot
    plan_stall_timeout_s: float = 60.0
    heartbeat_s: float = 5.0
    chunk_bytes: int = 1024 * 1024
    png_compress_level: int = 1
    warm_up: bool = True
    warm_up_side: int = 512  # a square of this side, 1 step
    preview_max_side: int = 512  # denoising previews are at most about this many pixels a side


class DecodeRunner:
    def __init__(self, engine: DecoderEngine, options: RunnerOptions):
        self.engine = engine
        self.options = options
        self.admission = Admission(metrics.STAGE, options.max_concurrent_decodes, options.max_queued)
        # The one thread that runs engine work: torch never runs on the event loop.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder-worker")
        self._ready = False
        # the last measured step time per image size: to refuse work that cannot meet its deadline
        self.step_seconds: dict[tuple[int, int], float] = {}
        self.ready_plans = 0  # calls whose plan is complete, until they end: full images that need the device
        self._previewing = False  # a plan preview holds the worker (one at a time)

    @property
    def info(self) -> EngineInfo:
        if not self._ready:
            raise NotReady("the decoder is loading its model; retry when its health is SERVING")
        return self.engine.info

    def submit_job(self, fn: Callable, *args) -> concurrent.futures.Future:
        # the caller's context goes with the job: its log lines and spans belong to the caller's request
        return self._executor.submit(contextvars.copy_context().run, fn, *args)

    def submit(self, fn: Callable, *args) -> asyncio.Future:
        return asyncio.wrap_future(self.submit_job(fn, *args))

    async def start(self) -> None:
        """Loads the model, then one minimal decode so that the first request pays no warm-up."""
        await self.submit(self.engine.load)
        plan_format.export(metrics.STAGE, self.engine.info.plan_format)
        if self.options.warm_up:
            started = time.perf_counter()
            side = self.options.warm_up_side
            job = DecodeJob(
                request_id="warm-up", prompt="warm-up 'A'", width=side, height=side, seed=0, steps=1,
                guidance_scale=1.5, condition_images=(),
            )  # fmt: skip
            prepared = await self.submit(self.engine.prepare, job, [])
            try:
                steps = await self.submit(self.engine.begin, prepared, [0] * ((side // 32) ** 2))
                for _ in range(steps):
                    await self.submit(self.engine.step, prepared)
                image = await self.submit(self.engine.finish, prepared)
                await self.submit(encode_image, image, ImageFormat.PNG, self.options.png_compress_level)
            finally:
                self.engine.release(prepared)
            logger.info("warm-up decode (%dx%d, 1 step) took %.2f s", side, side, time.perf_counter() - started)
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        self.engine.close()

    def others_waiting_for_a_slot(self) -> bool:
        return self.ready_plans > self.admission.in_flight

    async def render_preview(
        self, job: DecodeJob, ids: tuple[int, ...], time_remaining: float | None = None
    ) -> Preview:
        """A plan's preview grid rendered (`job` sized to the grid, with the preview steps) on an idle
        decoder: Busy at once while it has a Decode call (the gateway sends one only when its plan is
        nearly done) or another preview; Preempted when a call's plan completes meanwhile."""
        calls = self.admission.in_flight + self.admission.queued
        if self._previewing or calls:
            metrics.PREVIEWS.labels(metrics.STAGE, "plan", "skipped").inc()
            what = "another preview" if self._previewing else f"{calls} decode call(s)"
            raise Busy(f"preview skipped: this decoder has {what}; previews never wait")
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        stop = threading.Event()

        def should_stop() -> bool:
            return stop.is_set() or self.ready_plans > 0 or (deadline is not None and time.monotonic() >= deadline)

        self._previewing = True
        work = self.submit(render_plan_preview, self.engine, job, ids, should_stop, self.options.png_compress_level)
        work.add_done_callback(self._preview_done)
        try:
            encoded = await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()  # the worker stops before its next step; _preview_done frees the place then
            raise
        if encoded is None:
            metrics.PREVIEWS.labels(metrics.STAGE, "plan", "preempted").inc()
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the deadline passed while the preview was being rendered")
            raise Preempted("preview stopped: a full image needed this decoder")
        metrics.PREVIEWS.labels(metrics.STAGE, "plan", "sent").inc()
        return Preview(0, job.width, job.height, job.output_format, encoded.data)

    def _preview_done(self, work: asyncio.Future) -> None:
        self._previewing = False
        if not work.cancelled():
            work.exception()  # retrieved here: a cancelled caller no longer waits for it

    async def decode(
        self, job: DecodeJob, items: AsyncIterator[PlanItem], time_remaining: float | None = None
    ) -> AsyncIterator[DecodeEvent]:
        """The events of one call; `items` are the plan chunks after the spec."""
        info = self.info
        started = time.perf_counter()
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        details = {"size": f"{job.width}x{job.height}", "steps": job.steps, "format": job.output_format.value}
        with RequestLog(logger, "decode", job.request_id, **details) as summary:
            async with self.admission.ticket() as ticket:
                call = _Call(self, job, items, deadline, info, started, ticket)
                try:
                    async for event in call.run():
                        if isinstance(event, Completed):
                            summary.details["bytes"] = event.size_bytes
                        yield event
                finally:
                    await call.close()
                    t = call.timings
                    summary.seconds.update(prepare=t.decoder_prepare_seconds, queue=t.queue_seconds,
                                           denoise=t.denoising_seconds, previews=t.previews_seconds,
                                           vae=t.vae_decode_seconds, encode=t.encode_seconds)  # fmt: skip
        metrics.DECODE_SECONDS.observe(time.perf_counter() - started)


class _Call:
    """The state of one Decode call while it holds a slot."""

    def __init__(self, runner: DecodeRunner, job: DecodeJob, items, deadline: float | None, info: EngineInfo,
                 started: float, ticket: Ticket):  # fmt: skip
        self.runner = runner
        self.ticket = ticket
        self.engine = runner.engine
        self.job = job
        self.items = items
        self.deadline = deadline
        self.started = started
        self.timings = Timings()
        self.assembler = PlanAssembler(
            PlanExpectations(
                width=job.width, height=job.height, plan_format=info.plan_format,
                codebook_size=info.codebook_size, condition_images=len(job.condition_images),
            )
        )  # fmt: skip
        self.queued_jobs: list[concurrent.futures.Future] = []  # every job submitted to the worker
        self.jobs: list[asyncio.Future] = []  # the same, as seen from the event loop
        self.watch: set[asyncio.Future] = set()  # futures whose failure ends the call
        loop = asyncio.get_running_loop()
        self.header: asyncio.Future[PlanHeader] = loop.create_future()
        self.plan: asyncio.Future[Plan] = loop.create_future()
        self.plan_complete_at = 0.0
        self.reader: asyncio.Task | None = None
        self.prepared_job: asyncio.Future | None = None
        self.counted_ready = False  # counted in runner.ready_plans
        self.previews = 0  # previews sent

    # -- plumbing --------------------------------------------------------------------------------

    def _submit(self, fn: Callable, *args, timing: str = "") -> asyncio.Future:
        """`fn(*args)` in the worker; its duration is added to `self.timings.<timing>`."""

        def timed():
            begin = time.perf_counter()
            try:
                return fn(*args)
            finally:
                if timing:
                    setattr(self.timings, timing, getattr(self.timings, timing) + time.perf_counter() - begin)

        job = self.runner.submit_job(timed)
        self.queued_jobs.append(job)
        future = asyncio.wrap_future(job)
        self.jobs.append(future)
        self.watch.add(future)
        return future

    async def _wait(self, future: asyncio.Future, within: float | None = None) -> bool:
        """Whether `future` is done within `within` seconds (None: no limit); raises at once if the
        plan stream or another job fails first."""
        deadline = None if within is None else time.monotonic() + within
        while not future.done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            done, _ = await asyncio.wait({future, *self.watch}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                self.watch.discard(finished)
                if finished is not future and not finished.cancelled():
                    error = finished.exception()
                    if error is not None:
                        raise error
        self.watch.discard(future)
        return True

    async def _until(self, future: asyncio.Future):
        """The result of `future`; raises at once if the plan stream or another job fails first."""
        await self._wait(future)
        return future.result()

    async def _next_item(self, items) -> PlanItem:
        """The next chunk; while the plan is incomplete, one must come within the stall timeout."""
        if self.plan.done():
            return await anext(items)
        timeout = self.runner.options.plan_stall_timeout_s
        try:
            return await asyncio.wait_for(anext(items), timeout)
        except TimeoutError:
            raise Stalled(
                f"no plan chunk arrived for {timeout:g} s while the plan was incomplete; the call was ended to "
                "free its place (the decoder's --plan-stall-timeout-seconds)"
            ) from None

    async def _read(self) -> None:
        """Feeds every chunk to the assembler until the client closes its side of the stream."""
        items = aiter(self.items)
        while True:
            try:
                item = await self._next_item(items)
            except StopAsyncIteration:
                break
            self.assembler.add(item)
            if self.assembler.header is not None and not self.header.done():
                self.header.set_result(self.assembler.header)
            if self.assembler.complete and not self.plan.done():
                self.plan_complete_at = time.perf_counter()
                self.runner.ready_plans += 1
                self.counted_ready = True
                self.plan.set_result(self.assembler.plan())
        if not self.assembler.complete:
            # A client that cancels the call (the gateway, for its own client) ends this stream too, and
            # grpc cancels the call a moment later: wait for it, so that the call ends CANCELLED rather
            # than refused for an incomplete plan.
            await asyncio.sleep(CANCEL_GRACE_S)
        self.assembler.finish()

    # -- the call --------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[DecodeEvent]:
        job, engine = self.job, self.engine
        self.reader = asyncio.create_task(self._read())
        self.watch.add(self.reader)
        with tracing.tracer.start_span("prepare"):
            images = []
            if job.condition_images:  # decoding a large photo takes a while: in a thread, not the worker
                begin = time.perf_counter()
                images = await self._until(asyncio.ensure_future(asyncio.to_thread(engine.read_conditions, job)))
                self.timings.decoder_prepare_seconds += time.perf_counter() - begin
            self.prepared_job = self._submit(engine.prepare, job, images, timing="decoder_prepare_seconds")

            header = await self._until(self.header)
            prepared = await self._until(self.prepared_job)
            if header.conditions:
                conditions = self._submit(
                    engine.add_conditions, prepared, header.conditions, timing="decoder_prepare_seconds"
                )
                await self._until(conditions)
        plan = await self._until(self.plan)
        async for heartbeat in self._take_slot():
            yield heartbeat

        with tracing.tracer.start_span("denoise", attributes={"glmimage.steps": job.steps}):
            total = await self._until(self._submit(engine.begin, prepared, plan.target_ids, timing="denoising_seconds"))
            previews_due = preview_steps(total, job.previews)
            for done in range(1, total + 1):
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise DeadlineExceeded(f"the deadline passed after {done - 1} of {total} denoising steps")
                begin = time.perf_counter()
                await self._until(self._submit(engine.step, prepared, timing="denoising_seconds"))
                step_seconds = time.perf_counter() - begin
                self.runner.step_seconds[(job.width, job.height)] = step_seconds
                metrics.DENOISE_STEP_SECONDS.observe(step_seconds)
                yield Progress(done, total)
                if done in previews_due:
                    preview = await self._preview(prepared)
                    if preview is not None:
                        yield preview
        with tracing.tracer.start_span("vae decode"):
            image = await self._until(self._submit(engine.finish, prepared, timing="vae_decode_seconds"))
        with tracing.tracer.start_span("encode"):
            encoded = await self._until(
                self._submit(
                    encode_image,
                    image,
                    job.output_format,
                    self.runner.options.png_compress_level,
                    job.output_quality,
                    timing="encode_seconds",
                )
            )
        self._raise_if_failed()  # a bad chunk that came during the last step
        for piece in chunks(encoded.data, self.runner.options.chunk_bytes):
            yield ImageChunk(piece)
        t = self.timings
        t.total_seconds = time.perf_counter() - self.started
        metrics.TAIL_SECONDS.observe(time.perf_counter() - self.plan_complete_at)
        yield Completed(
            request_id=job.request_id, width=job.width, height=job.height, seed=job.seed, format=job.output_format,
            sha256=encoded.sha256, size_bytes=len(encoded.data), plan_tokens=len(plan.target_ids), timings=t,
            previews=self.previews,
        )  # fmt: skip

    async def _preview(self, prepared) -> Preview | None:
        """The estimate after this step, small; None (skipped) while another call's plan waits for a slot."""
        if self.runner.others_waiting_for_a_slot():
            metrics.PREVIEWS.labels(metrics.STAGE, "denoising", "skipped").inc()
            return None
        options = self.runner.options
        encoded, width, height = await self._until(
            self._submit(render_estimate, self.engine, prepared, self.job, options.preview_max_side,
                         options.png_compress_level, timing="previews_seconds")
        )  # fmt: skip
        metrics.PREVIEWS.labels(metrics.STAGE, "denoising", "sent").inc()
        self.previews += 1
        return Preview(self.previews - 1, width, height, self.job.output_format, encoded.data)

    def _check_time_left(self) -> None:
        """DEADLINE_EXCEEDED now, rather than a slot held for steps that cannot finish in time."""
        if self.deadline is None:
            return
        left = self.deadline - time.monotonic()
        step = self.runner.step_seconds.get((self.job.width, self.job.height), 0.0)
        if left <= self.job.steps * step:
            raise DeadlineExceeded(
                f"{self.job.steps} denoising steps take about {self.job.steps * step:.1f} s here and the deadline "
                f"is {max(left, 0):.1f} s away"
            )

    async def _take_slot(self) -> AsyncIterator[Progress]:
        """Waits for a denoising slot in arrival order, a heartbeat every `heartbeat_s` meanwhile."""
        self._check_time_left()
        waiting = asyncio.ensure_future(self.ticket.start())
        try:
            while not await self._wait(waiting, self.runner.options.heartbeat_s):
                self._check_time_left()
                yield Progress(0, self.job.steps)
        finally:
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
        self.timings.queue_seconds = waiting.result()
        metrics.QUEUE_SECONDS.observe(self.timings.queue_seconds)
        tracing.waited(self.timings.queue_seconds, "denoising slot")
        self._check_time_left()

    def _raise_if_failed(self) -> None:
        assert self.reader is not None, "run() starts the reader first"
        if self.reader.done() and not self.reader.cancelled():
            error = self.reader.exception()
            if error is not None:
                raise error

    async def close(self) -> None:
        """Stops the call; returns once the worker has left the engine, so the slot can be freed."""
        if self.counted_ready:
            self.runner.ready_plans -= 1
            self.counted_ready = False
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()
        for job in self.queued_jobs:
            job.cancel()  # drops a job still queued behind another call's step; a running one finishes
        pending = [job for job in self.jobs if not job.done()]
        if self.reader is not None:
            pending.append(self.reader)
        if pending:
            waiter = asyncio.ensure_future(asyncio.wait(pending))
            while not waiter.done():
                try:
                    await asyncio.shield(waiter)
                except asyncio.CancelledError:
                    continue  # a second cancel: the worker must still be waited for
        for future in [*self.jobs, *([self.reader] if self.reader else [])]:
            if not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" noise for what ended the call
        if self.prepared_job is not None and not self.prepared_job.cancelled() and not self.prepared_job.exception():
            self.engine.release(self.prepared_job.result())
