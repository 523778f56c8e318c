"""Runs decodes on an engine: admission, a worker thread, overlap with the plan stream, progress,
cancellation and deadlines. No gRPC and no torch: it speaks the domain types of `domain.py`.

One Decode call:
  spec (validated) -> slot -> engine.prepare starts in the worker while plan chunks are read
  -> header: engine.add_conditions (i2i) -> plan complete: engine.decode, a Progress per step
  -> the image encoded in the worker -> ImageChunks -> Completed.
A bad chunk, a failed job or the end of the stream before the plan is complete ends the call with
that error at once. Chunks that arrive while it denoises are still checked; a bad one stops it.
Whatever ends a call (error, client cancel, deadline), the slot is freed only once the worker has
left the engine (within one denoising step), so the next call never shares the model mid-step.
"""

import asyncio
import concurrent.futures
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
    Progress,
    Timings,
)
from decoder_service.engine import DecodeCancelled, DecoderEngine, EngineInfo
from decoder_service.images import chunks, encode_image
from decoder_service.plan import PlanAssembler, PlanExpectations
from servekit.admission import Admission
from servekit.errors import DeadlineExceeded, NotReady

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerOptions:
    max_concurrent_decodes: int = 1
    max_queued: int = 8
    chunk_bytes: int = 1024 * 1024
    png_compress_level: int = 1
    warm_up: bool = True
    warm_up_side: int = 512  # a square of this side, 1 step


class DecodeRunner:
    def __init__(self, engine: DecoderEngine, options: RunnerOptions):
        self.engine = engine
        self.options = options
        self.admission = Admission(metrics.STAGE, options.max_concurrent_decodes, options.max_queued)
        # One worker thread per concurrent decode (one by default): torch never runs on the event loop.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=options.max_concurrent_decodes, thread_name_prefix="decoder-worker"
        )
        self._ready = False

    @property
    def info(self) -> EngineInfo:
        if not self._ready:
            raise NotReady("the decoder is loading its model; retry when its health is SERVING")
        return self.engine.info

    def submit(self, fn: Callable, *args) -> asyncio.Future:
        return asyncio.wrap_future(self._executor.submit(fn, *args))

    async def start(self) -> None:
        """Loads the model, then one minimal decode so that the first request pays no warm-up."""
        await self.submit(self.engine.load)
        if self.options.warm_up:
            started = time.perf_counter()
            side = self.options.warm_up_side
            job = DecodeJob(
                request_id="warm-up", prompt="warm-up 'A'", width=side, height=side, seed=0, steps=1,
                guidance_scale=1.5, condition_images=(),
            )  # fmt: skip
            prepared = await self.submit(self.engine.prepare, job)
            try:
                ids = [0] * ((side // 32) ** 2)
                decoded = await self.submit(self.engine.decode, prepared, ids, lambda *_: None, lambda: False)
                await self.submit(encode_image, decoded.image, ImageFormat.PNG, self.options.png_compress_level)
            finally:
                self.engine.release(prepared)
            logger.info("warm-up decode (%dx%d, 1 step) took %.2f s", side, side, time.perf_counter() - started)
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        self.engine.close()

    async def decode(
        self, job: DecodeJob, items: AsyncIterator[PlanItem], time_remaining: float | None = None
    ) -> AsyncIterator[DecodeEvent]:
        """The events of one call; `items` are the plan chunks after the spec."""
        info = self.info
        started = time.perf_counter()
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        async with self.admission.slot() as queue_seconds:
            metrics.QUEUE_SECONDS.observe(queue_seconds)
            call = _Call(self, job, items, deadline, info, started)
            call.timings.queue_seconds = queue_seconds
            try:
                async for event in call.run():
                    yield event
            finally:
                await call.close()
        metrics.DECODE_SECONDS.observe(time.perf_counter() - started)


_DONE = object()


class _Call:
    """The state of one Decode call while it holds a slot."""

    def __init__(
        self, runner: DecodeRunner, job: DecodeJob, items, deadline: float | None, info: EngineInfo, started: float
    ):
        self.runner = runner
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
        self.cancelled = threading.Event()  # read by the worker between steps
        self.failure: BaseException | None = None  # a bad chunk seen while denoising
        self.jobs: list[asyncio.Future] = []  # every job submitted to the worker
        self.watch: set[asyncio.Future] = set()  # futures whose failure ends the call
        loop = asyncio.get_running_loop()
        self.header: asyncio.Future[PlanHeader] = loop.create_future()
        self.plan: asyncio.Future[Plan] = loop.create_future()
        self.plan_complete_at = 0.0
        self.reader: asyncio.Task | None = None
        self.prepared_job: asyncio.Future | None = None

    # -- plumbing --------------------------------------------------------------------------------

    def _submit(self, fn: Callable, *args, prepare: bool = False) -> asyncio.Future:
        def timed():
            begin = time.perf_counter()
            try:
                return fn(*args)
            finally:
                if prepare:
                    self.timings.decoder_prepare_seconds += time.perf_counter() - begin

        future = self.runner.submit(timed)
        self.jobs.append(future)
        self.watch.add(future)
        return future

    async def _until(self, future: asyncio.Future):
        """The result of `future`; raises at once if the plan stream or another job fails first."""
        while not future.done():
            done, _ = await asyncio.wait({future, *self.watch}, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                self.watch.discard(finished)
                if finished is not future and not finished.cancelled() and finished.exception() is not None:
                    raise finished.exception()
        self.watch.discard(future)
        return future.result()

    def _is_cancelled(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    async def _read(self) -> None:
        """Feeds every chunk to the assembler until the client closes its side of the stream."""
        try:
            async for item in self.items:
                self.assembler.add(item)
                if self.assembler.header is not None and not self.header.done():
                    self.header.set_result(self.assembler.header)
                if self.assembler.complete and not self.plan.done():
                    self.plan_complete_at = time.perf_counter()
                    self.plan.set_result(self.assembler.plan())
            self.assembler.finish()
        except Exception as error:
            self.failure = error
            self.cancelled.set()  # a decode already running stops within a step
            raise

    # -- the call --------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[DecodeEvent]:
        job, engine = self.job, self.engine
        self.prepared_job = self._submit(engine.prepare, job, prepare=True)
        self.reader = asyncio.create_task(self._read())
        self.watch.add(self.reader)

        header = await self._until(self.header)
        prepared = await self._until(self.prepared_job)
        if header.conditions:
            await self._until(self._submit(engine.add_conditions, prepared, header.conditions, prepare=True))
        plan = await self._until(self.plan)

        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        last_step = [time.perf_counter()]

        def on_step(done: int, total: int) -> None:  # in the worker thread
            now = time.perf_counter()
            metrics.DENOISE_STEP_SECONDS.observe(now - last_step[0])
            last_step[0] = now
            loop.call_soon_threadsafe(queue.put_nowait, Progress(done, total))

        decoding = self._submit(engine.decode, prepared, plan.target_ids, on_step, self._is_cancelled)
        decoding.add_done_callback(lambda _: queue.put_nowait(_DONE))
        while (event := await queue.get()) is not _DONE:
            yield event
        self.watch.discard(decoding)
        try:
            decoded = decoding.result()
        except DecodeCancelled as stopped:
            if self.failure is not None:
                raise self.failure from None
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise DeadlineExceeded(
                    f"the deadline passed after {stopped.steps_done} of {stopped.steps_total} denoising steps"
                ) from None
            raise
        self.timings.denoising_seconds = decoded.denoising_seconds
        self.timings.vae_decode_seconds = decoded.vae_decode_seconds

        begin = time.perf_counter()
        encoded = await self._until(
            self._submit(encode_image, decoded.image, job.output_format, self.runner.options.png_compress_level)
        )
        self.timings.encode_seconds = time.perf_counter() - begin
        if self.failure is not None:
            raise self.failure
        for piece in chunks(encoded.data, self.runner.options.chunk_bytes):
            yield ImageChunk(piece)
        self.timings.total_seconds = time.perf_counter() - self.started
        metrics.TAIL_SECONDS.observe(time.perf_counter() - self.plan_complete_at)
        logger.info(
            "decoded %s: %dx%d, %d steps, %d bytes %s; prepare %.3f s, denoise %.3f s, vae %.3f s, encode %.3f s, "
            "total %.3f s", job.request_id, job.width, job.height, job.steps, len(encoded.data),
            job.output_format.value, self.timings.decoder_prepare_seconds, self.timings.denoising_seconds,
            self.timings.vae_decode_seconds, self.timings.encode_seconds, self.timings.total_seconds,
        )  # fmt: skip
        yield Completed(
            request_id=job.request_id, width=job.width, height=job.height, seed=job.seed, format=job.output_format,
            sha256=encoded.sha256, size_bytes=len(encoded.data), plan_tokens=len(plan.target_ids),
            timings=self.timings,
        )  # fmt: skip

    async def close(self) -> None:
        """Stops the call; returns once the worker has left the engine, so the slot can be freed."""
        self.cancelled.set()
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()
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
