"""PlannerService: proto <-> domain, admission, streaming. Knows no engine internals."""

import asyncio
import logging
import secrets
import time

from glmimage.v1 import common_pb2, planner_pb2, planner_pb2_grpc
from imagekit.condition_images import ResizeRule, read_condition_images
from planner_service import metrics
from planner_service.chunking import TokenChunker
from planner_service.engine import PlanEngine, PlanJob, PlanLayout, Sampling
from servekit import tracing, validation
from servekit.admission import Admission
from servekit.errors import NotReady
from servekit.logs import RequestLog
from servekit.validation import Limits

logger = logging.getLogger(__name__)


def sampling_from_proto(sampling: common_pb2.PlanSampling, codebook_size: int) -> Sampling:
    validation.check_sampling(sampling, codebook_size)
    return Sampling(
        temperature=sampling.temperature if sampling.HasField("temperature") else None,
        top_p=sampling.top_p if sampling.HasField("top_p") else None,
        top_k=sampling.top_k if sampling.HasField("top_k") else None,
    )


def job_from_proto(request: planner_pb2.PlanRequest, limits: Limits, codebook_size: int) -> PlanJob:
    """Validates a PlanRequest (InvalidRequest naming the rule) and turns it into a PlanJob. The
    condition images are only counted and sized here: they are read once the job holds a slot."""
    validation.check_request_id(request.request_id)
    validation.check_prompt(request.prompt, limits)
    validation.check_size(request.width, request.height, limits)
    sampling = sampling_from_proto(request.sampling, codebook_size)
    validation.check_condition_images(request.condition_images, limits)
    return PlanJob(
        request_id=request.request_id or secrets.token_hex(8),
        prompt=request.prompt,
        width=request.width,
        height=request.height,
        seed=request.seed if request.HasField("seed") else secrets.randbits(63),
        sampling=sampling,
        condition_images=[image.data for image in request.condition_images],
    )


def header_to_proto(job: PlanJob, layout: PlanLayout, codebook_size: int, plan_format: str) -> planner_pb2.PlanHeader:
    return planner_pb2.PlanHeader(
        request_id=job.request_id,
        target_rows=layout.target[0],
        target_cols=layout.target[1],
        preview_rows=layout.preview[0],
        preview_cols=layout.preview[1],
        codebook_size=codebook_size,
        plan_format=plan_format,
        seed=job.seed,
        width=job.width,
        height=job.height,
        condition_images=[
            planner_pb2.ConditionImagePlan(rows=c.rows, cols=c.cols, ids=c.ids) for c in layout.conditions
        ],
    )


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(
        self,
        engine: PlanEngine,
        admission: Admission,
        limits: Limits,
        resize_rule: ResizeRule,
        plan_format: str,
        model: str,
        chunk_tokens: int,
        chunk_interval_s: float,
        version: str,
    ):
        self.engine = engine
        self.admission = admission
        self.limits = limits
        self.resize_rule = resize_rule
        self.plan_format = plan_format
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.chunk_interval_s = chunk_interval_s
        self.version = version
        self.loaded = False  # set once the engine has loaded its model

    async def Plan(self, request, context):
        arrived = time.perf_counter()
        if not self.loaded:
            raise NotReady("the planner is loading its model; retry when its health is SERVING")
        job = job_from_proto(request, self.limits, self.engine.codebook_size)
        size, images = f"{job.width}x{job.height}", len(job.condition_images)
        with RequestLog(logger, "plan", job.request_id, size=size, condition_images=images) as summary:
            async for chunk in self._plan(job, arrived, summary):
                yield chunk

    async def _plan(self, job: PlanJob, arrived: float, summary: RequestLog):
        async with self.admission.slot() as queue_seconds:
            metrics.QUEUE_SECONDS.observe(queue_seconds)
            summary.seconds["queue"] = queue_seconds
            tracing.waited(queue_seconds, "planner slot")
            with tracing.tracer.start_span("planning") as planning:
                # Decoding and resizing a large photo takes a while: off the event loop, before any model work.
                job.images = await asyncio.to_thread(read_condition_images, job.condition_images, self.resize_rule)
                layout = await self.engine.prepare(job)
                summary.details["tokens"] = layout.total_tokens
                yield planner_pb2.PlanChunk(
                    header=header_to_proto(job, layout, self.engine.codebook_size, self.plan_format)
                )
                chunker = TokenChunker(layout.preview_tokens, self.chunk_tokens, self.chunk_interval_s)
                first_token_at = None
                previewed = layout.preview_tokens == 0  # image-to-image plans have no preview grid
                async for ids in self.engine.generate(job, layout):
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        planning.add_event("first token")
                    metrics.TOKENS.inc(len(ids))
                    for tokens in chunker.feed(ids):
                        yield planner_pb2.PlanChunk(tokens=tokens)
                    if not previewed and chunker.produced >= layout.preview_tokens:
                        previewed = True
                        planning.add_event("preview grid done")
                for tokens in chunker.flush():
                    yield planner_pb2.PlanChunk(tokens=tokens)
                if chunker.produced != layout.total_tokens:
                    raise RuntimeError(f"engine produced {chunker.produced} of {layout.total_tokens} plan tokens")
                planning.add_event("target grid done")
                done = time.perf_counter()
                summary.seconds["first_token"] = first_token_seconds = (first_token_at or done) - arrived
                metrics.FIRST_TOKEN_SECONDS.observe(first_token_seconds)
                metrics.PLAN_SECONDS.observe(done - arrived)
                yield planner_pb2.PlanChunk(
                    summary=planner_pb2.PlanSummary(
                        preview_tokens=layout.preview_tokens,
                        target_tokens=layout.total_tokens - layout.preview_tokens,
                        prompt_tokens=layout.prompt_tokens,
                        finish_reason=planner_pb2.FINISH_REASON_COMPLETE,
                        queue_seconds=queue_seconds,
                        first_token_seconds=first_token_seconds,
                        total_seconds=done - arrived,
                    )
                )

    async def GetServerInfo(self, request, context):
        if not self.loaded:
            raise NotReady("the planner is loading its model; retry when its health is SERVING")
        return common_pb2.ServerInfo(
            role=common_pb2.SERVICE_ROLE_PLANNER,
            model=self.model,
            plan_format=self.plan_format,
            codebook_size=self.engine.codebook_size,
            engine=self.engine.name,
            limits=self.limits.to_proto(),
            version=self.version,
            load=self.admission.load(),
        )
