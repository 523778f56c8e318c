"""One Generate request, chained through a planner and a decoder.

The planner's chunks go to the decoder as they arrive and are kept, so that:
- a decoder that fails (at any point) is replaced by another one, which gets the kept plan
  replayed: the AR stage does not run again;
- a planner that fails (before or during its plan) is replaced by another one, and the decoder
  restarts on the new plan.
Both are bounded by the request's deadline and each stage's attempt budget. Image chunks are
released to the client when the decoder completes, so a replay never duplicates image bytes.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from gateway import metrics
from gateway.replicas import Replica, ReplicaPool
from glmimage.v1 import common_pb2, decoder_pb2, image_service_pb2, planner_pb2
from servekit.errors import ServiceError, Unavailable, UpstreamError

logger = logging.getLogger(__name__)

# Worth another replica: the replica is gone, overloaded, or shedding the request.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


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
    output_format: int

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
        return spec


class _PlanRestarted(Exception):
    """The decoder's plan was withdrawn: a planner failed and another one starts over."""


@dataclass
class _Failed:
    error: BaseException


@dataclass
class _Done:
    completed: common_pb2.Completed


def _progress(stage: int, done: int, total: int) -> image_service_pb2.GenerateEvent:
    return image_service_pb2.GenerateEvent(progress=common_pb2.Progress(stage=stage, done=done, total=total))


class Chain:
    def __init__(self, request: ResolvedRequest, planners: ReplicaPool, decoders: ReplicaPool,
                 deadline: float, planner_attempts: int, decoder_attempts: int):  # fmt: skip
        self.request = request
        self.planners = planners
        self.decoders = decoders
        self.deadline = deadline  # time.monotonic() by which everything must be done
        self.planner_attempts = planner_attempts
        self.decoder_attempts = decoder_attempts
        self.metadata = (("x-request-id", request.request_id),)
        self.events: asyncio.Queue = asyncio.Queue()
        # the plan as received so far; `epoch` counts planner restarts
        self.plan: list[planner_pb2.PlanChunk] = []
        self.plan_complete = False
        self.epoch = 0
        self.plan_changed = asyncio.Condition()
        self.decode_call: grpc.aio.StreamStreamCall | None = None
        self.planners_used = 0
        self.decoders_used = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.plan_done_at: float | None = None
        self.plan_summary: planner_pb2.PlanSummary | None = None

    def _remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def _error(self, stage: str, error: grpc.aio.AioRpcError) -> ServiceError:
        return UpstreamError(error.code(), f"{stage}: {error.details()}")

    def _exhausted(self, stage: str, attempts: int, last: BaseException | None) -> Unavailable:
        detail = f" (last error: {last.details()})" if isinstance(last, grpc.aio.AioRpcError) else ""
        return Unavailable(f"{stage}: no replica could serve the request after {attempts} attempt(s){detail}")

    # ---------------------------------------------------------------- planner side
    async def _plan_once(self, replica: Replica) -> None:
        total = 0
        done = 0
        call = replica.stub.Plan(self.request.plan_request(), timeout=self._remaining(), metadata=self.metadata)
        async for chunk in call:
            kind = chunk.WhichOneof("chunk")
            if kind == "header":
                h = chunk.header
                total = h.preview_rows * h.preview_cols + h.target_rows * h.target_cols
            elif kind == "tokens":
                self.first_token_at = self.first_token_at or time.perf_counter()
                done += len(chunk.tokens.ids)
                await self.events.put(_progress(common_pb2.STAGE_PLANNING, done, total))
            else:
                self.plan_summary = chunk.summary
            async with self.plan_changed:
                self.plan.append(chunk)
                self.plan_changed.notify_all()
        async with self.plan_changed:
            self.plan_complete = True
            self.plan_done_at = time.perf_counter()
            self.plan_changed.notify_all()

    async def _restart_plan(self) -> None:
        async with self.plan_changed:
            self.plan, self.plan_complete, self.epoch = [], False, self.epoch + 1
            self.plan_changed.notify_all()
        if self.decode_call is not None:
            self.decode_call.cancel()

    async def _run_planner(self) -> None:
        tried: set[Replica] = set()
        last: BaseException | None = None
        while self.planners_used < self.planner_attempts:
            replica = self.planners.choose(tried)
            if replica is None:
                break
            tried.add(replica)
            self.planners_used += 1
            replica.outstanding += 1
            try:
                await self._plan_once(replica)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    raise self._error("planner", error) from None
                logger.warning("%s: planner %s failed (%s); retrying", self.request.request_id, replica.target,
                               error.code().name)  # fmt: skip
                replica.mark_failed()
                metrics.RETRIES.labels("planner").inc()
                last = error
                await self._restart_plan()
            finally:
                replica.outstanding -= 1
        raise self._exhausted("planner", self.planners_used, last)

    # ---------------------------------------------------------------- decoder side
    async def _feed(self, call: grpc.aio.StreamStreamCall, epoch: int) -> None:
        await call.write(decoder_pb2.DecodeRequest(spec=self.request.decode_spec()))
        sent = 0
        while True:
            async with self.plan_changed:
                await self.plan_changed.wait_for(
                    lambda sent=sent: self.epoch != epoch or len(self.plan) > sent or self.plan_complete
                )
                if self.epoch != epoch:
                    return
                pending, complete = self.plan[sent:], self.plan_complete
            for chunk in pending:
                await call.write(decoder_pb2.DecodeRequest(plan_chunk=chunk))
            sent += len(pending)
            if complete and sent == len(self.plan):
                await call.done_writing()
                return

    async def _decode_once(self, replica: Replica, epoch: int) -> common_pb2.Completed:
        call = replica.stub.Decode(timeout=self._remaining(), metadata=self.metadata)
        self.decode_call = call
        feeder = asyncio.create_task(self._feed(call, epoch))
        image: list[bytes] = []
        try:
            while (event := await call.read()) is not grpc.aio.EOF:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    await self.events.put(image_service_pb2.GenerateEvent(progress=event.progress))
                elif kind == "image_chunk":
                    image.append(event.image_chunk.data)
                else:
                    for data in image:
                        await self.events.put(
                            image_service_pb2.GenerateEvent(image_chunk=common_pb2.ImageChunk(data=data))
                        )
                    return event.completed
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, None, None, "the decoder closed the stream without completing"
            )
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
            # A plan restart cancels this call; reading it then raises CancelledError (or CANCELLED)
            # although this task itself is not being cancelled.
            own_cancel = isinstance(error, asyncio.CancelledError) and asyncio.current_task().cancelling()
            cancelled = isinstance(error, asyncio.CancelledError) or error.code() == grpc.StatusCode.CANCELLED
            if cancelled and not own_cancel and self.epoch != epoch:
                raise _PlanRestarted() from None
            raise
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            self.decode_call = None

    async def _run_decoder(self) -> common_pb2.Completed:
        tried: set[Replica] = set()
        last: BaseException | None = None
        while self.decoders_used < self.decoder_attempts:
            replica = self.decoders.choose(tried)
            if replica is None:
                break
            tried.add(replica)
            self.decoders_used += 1
            replica.outstanding += 1
            try:
                return await self._decode_once(replica, self.epoch)
            except _PlanRestarted:
                self.decoders_used -= 1  # not the decoder's fault
                tried.discard(replica)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    raise self._error("decoder", error) from None
                logger.warning("%s: decoder %s failed (%s); replaying the plan elsewhere", self.request.request_id,
                               replica.target, error.code().name)  # fmt: skip
                replica.mark_failed()
                metrics.RETRIES.labels("decoder").inc()
                last = error
            finally:
                replica.outstanding -= 1
        raise self._exhausted("decoder", self.decoders_used, last)

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
                    yield image_service_pb2.GenerateEvent(completed=self._completed(item.completed))
                    return
                yield item
        finally:
            for task in (planner, decoder):
                task.cancel()
            if self.decode_call is not None:
                self.decode_call.cancel()
            await asyncio.gather(planner, decoder, return_exceptions=True)
