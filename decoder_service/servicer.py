"""glmimage.v1.DecoderService: proto <-> domain conversion only; the runner does the work."""

import uuid
from collections.abc import AsyncIterator

import grpc

from decoder_service.domain import (
    Completed,
    ConditionPlan,
    DecodeEvent,
    DecodeJob,
    Grid,
    ImageChunk,
    ImageFormat,
    PlanHeader,
    PlanItem,
    PlanSummary,
    PlanTokens,
    Progress,
)
from decoder_service.runner import DecodeRunner
from glmimage.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, planner_pb2
from servekit.errors import InvalidRequest
from servekit.server import package_version
from servekit.validation import (
    Limits,
    check_condition_images,
    check_output,
    check_previews,
    check_prompt,
    check_request_id,
    check_size,
    check_steps_and_guidance,
)

REQUEST_ID_METADATA = "x-request-id"

_FORMATS_IN = {
    common_pb2.IMAGE_FORMAT_UNSPECIFIED: ImageFormat.PNG,
    common_pb2.IMAGE_FORMAT_PNG: ImageFormat.PNG,
    common_pb2.IMAGE_FORMAT_JPEG: ImageFormat.JPEG,
    common_pb2.IMAGE_FORMAT_WEBP: ImageFormat.WEBP,
}
_FORMATS_OUT = {
    ImageFormat.PNG: common_pb2.IMAGE_FORMAT_PNG,
    ImageFormat.JPEG: common_pb2.IMAGE_FORMAT_JPEG,
    ImageFormat.WEBP: common_pb2.IMAGE_FORMAT_WEBP,
}
_GRIDS = {planner_pb2.GRID_PREVIEW: Grid.PREVIEW, planner_pb2.GRID_TARGET: Grid.TARGET}


def job_from_proto(
    spec: decoder_pb2.DecodeSpec,
    limits: Limits,
    default_steps: int,
    default_guidance_scale: float,
    request_id: str = "",
) -> DecodeJob:
    """A validated DecodeJob; InvalidRequest names the rule a field breaks. `request_id`: the
    x-request-id metadata, used when the spec has none."""
    check_request_id(spec.request_id)
    check_request_id(request_id)
    check_prompt(spec.prompt, limits)
    check_size(spec.width, spec.height, limits)
    check_steps_and_guidance(spec, limits)
    check_condition_images(spec.condition_images, limits)
    check_output(spec)
    check_previews(spec.previews, limits)
    return DecodeJob(
        request_id=spec.request_id or request_id or uuid.uuid4().hex,
        prompt=spec.prompt,
        width=spec.width,
        height=spec.height,
        seed=spec.seed,
        steps=spec.num_inference_steps if spec.HasField("num_inference_steps") else default_steps,
        guidance_scale=spec.guidance_scale if spec.HasField("guidance_scale") else default_guidance_scale,
        condition_images=tuple(image.data for image in spec.condition_images),
        output_format=_FORMATS_IN[spec.output_format],
        output_quality=spec.output_quality if spec.HasField("output_quality") else None,
        previews=spec.previews,
    )


def plan_item_from_proto(chunk: planner_pb2.PlanChunk) -> PlanItem:
    kind = chunk.WhichOneof("chunk")
    if kind == "header":
        header = chunk.header
        return PlanHeader(
            request_id=header.request_id,
            target_rows=header.target_rows,
            target_cols=header.target_cols,
            preview_rows=header.preview_rows,
            preview_cols=header.preview_cols,
            codebook_size=header.codebook_size,
            plan_format=header.plan_format,
            seed=header.seed,
            width=header.width,
            height=header.height,
            conditions=tuple(
                ConditionPlan(rows=image.rows, cols=image.cols, ids=tuple(image.ids))
                for image in header.condition_images
            ),
        )
    if kind == "tokens":
        tokens = chunk.tokens
        return PlanTokens(grid=_GRIDS.get(tokens.grid, Grid.UNSPECIFIED), offset=tokens.offset, ids=tuple(tokens.ids))
    if kind == "summary":
        return PlanSummary()
    raise InvalidRequest("a plan_chunk must hold a header, tokens or a summary; got an empty one")


def event_to_proto(event: DecodeEvent) -> decoder_pb2.DecodeEvent:
    if isinstance(event, Progress):
        return decoder_pb2.DecodeEvent(
            progress=common_pb2.Progress(stage=common_pb2.STAGE_DECODING, done=event.done, total=event.total)
        )
    if isinstance(event, ImageChunk):
        return decoder_pb2.DecodeEvent(image_chunk=common_pb2.ImageChunk(data=event.data))
    if isinstance(event, Completed):
        t = event.timings
        return decoder_pb2.DecodeEvent(
            completed=common_pb2.Completed(
                width=event.width,
                height=event.height,
                seed=event.seed,
                format=_FORMATS_OUT[event.format],
                sha256=event.sha256,
                plan_tokens=event.plan_tokens,
                request_id=event.request_id,
                size_bytes=event.size_bytes,
                decoder_attempts=1,
                timings=common_pb2.Timings(
                    queue_seconds=t.queue_seconds,
                    decoder_prepare_seconds=t.decoder_prepare_seconds,
                    denoising_seconds=t.denoising_seconds,
                    vae_decode_seconds=t.vae_decode_seconds,
                    encode_seconds=t.encode_seconds,
                    total_seconds=t.total_seconds,
                ),
            )
        )
    raise TypeError(f"not a decode event: {event!r}")


async def _plan_items(requests: AsyncIterator[decoder_pb2.DecodeRequest]) -> AsyncIterator[PlanItem]:
    async for request in requests:
        if request.HasField("spec"):
            raise InvalidRequest("a Decode stream has one spec, first; got a second one")
        if not request.HasField("plan_chunk"):
            raise InvalidRequest("a DecodeRequest must hold a spec or a plan_chunk; got an empty one")
        yield plan_item_from_proto(request.plan_chunk)


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA:
            return value
    return ""


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, runner: DecodeRunner, limits: Limits, default_steps: int, default_guidance_scale: float):
        self.runner = runner
        self.limits = limits
        self.default_steps = default_steps
        self.default_guidance_scale = default_guidance_scale

    async def Decode(self, request_iterator, context):
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or not first.HasField("spec"):
            got = "an empty stream" if first is None else f"a {first.WhichOneof('item') or 'empty message'} first"
            raise InvalidRequest(f"a Decode stream starts with a spec (DecodeSpec), then the plan chunks; got {got}")
        job = job_from_proto(
            first.spec, self.limits, self.default_steps, self.default_guidance_scale, _metadata_request_id(context)
        )
        async for event in self.runner.decode(job, _plan_items(requests), context.time_remaining()):
            yield event_to_proto(event)

    async def GetServerInfo(self, request, context):
        info = self.runner.info
        return common_pb2.ServerInfo(
            role=common_pb2.SERVICE_ROLE_DECODER,
            model=info.model,
            plan_format=info.plan_format,
            codebook_size=info.codebook_size,
            engine=info.engine,
            limits=self.limits.to_proto(),
            version=package_version(),
            default_num_inference_steps=self.default_steps,
            default_guidance_scale=self.default_guidance_scale,
            load=self.runner.admission.load(),
        )
