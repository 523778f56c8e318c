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
    Preview,
    Progress,
)
from decoder_service.runner import DecodeRunner
from glmimage.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, planner_pb2
from servekit.errors import IncompatiblePlan, InvalidRequest
from servekit.server import package_version
from servekit.validation import (
    SIZE_MULTIPLE,
    Limits,
    check_condition_images,
    check_guidance,
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
MAX_PREVIEW_CELLS = 32 * 32  # a preview grid is ~16x16 cells whatever the image's size


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


def preview_job_from_proto(
    request: decoder_pb2.PreviewRequest, limits: Limits, plan_format: str, codebook_size: int, steps: int,
    default_guidance_scale: float, request_id: str = "",
) -> tuple[DecodeJob, tuple[int, ...]]:  # fmt: skip
    """A plan preview as a small DecodeJob of `steps` steps, and its grid's ids."""
    check_request_id(request.request_id)
    check_request_id(request_id)
    check_prompt(request.prompt, limits)
    check_guidance(request, limits)
    check_output(request)
    if request.plan_format != plan_format:
        raise IncompatiblePlan(
            f"the preview grid's plan_format {request.plan_format!r} is not this decoder's {plan_format!r}"
        )
    rows, cols = request.rows, request.cols
    if rows < 1 or cols < 1 or rows * cols > MAX_PREVIEW_CELLS:
        raise InvalidRequest(
            f"a preview grid has 1 to {MAX_PREVIEW_CELLS} cells (rows x cols >= 1), got {rows}x{cols}", "rows"
        )
    if len(request.ids) != rows * cols:
        raise InvalidRequest(f"the preview grid has {len(request.ids)} ids for {rows}x{cols} cells", "ids")
    bad = next((index for index, value in enumerate(request.ids) if value >= codebook_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"preview id {request.ids[bad]} at index {bad} is out of range: the codebook has {codebook_size} entries",
            "ids",
        )
    job = DecodeJob(
        request_id=request.request_id or request_id or uuid.uuid4().hex,
        prompt=request.prompt,
        width=cols * SIZE_MULTIPLE,
        height=rows * SIZE_MULTIPLE,
        seed=request.seed,
        steps=steps,
        guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else default_guidance_scale,
        condition_images=(),
        output_format=_FORMATS_IN[request.output_format],
        output_quality=request.output_quality if request.HasField("output_quality") else None,
    )
    return job, tuple(request.ids)


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


def preview_to_proto(preview: Preview, stage: common_pb2.Stage) -> common_pb2.PreviewImage:
    return common_pb2.PreviewImage(
        index=preview.index, stage=stage, width=preview.width, height=preview.height,
        format=_FORMATS_OUT[preview.format], data=preview.data,
    )  # fmt: skip


def event_to_proto(event: DecodeEvent) -> decoder_pb2.DecodeEvent:
    if isinstance(event, Preview):
        return decoder_pb2.DecodeEvent(preview=preview_to_proto(event, common_pb2.STAGE_DECODING))
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
                previews=event.previews,
                timings=common_pb2.Timings(
                    queue_seconds=t.queue_seconds,
                    decoder_prepare_seconds=t.decoder_prepare_seconds,
                    denoising_seconds=t.denoising_seconds,
                    vae_decode_seconds=t.vae_decode_seconds,
                    encode_seconds=t.encode_seconds,
                    total_seconds=t.total_seconds,
                    previews_seconds=t.previews_seconds,
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
    def __init__(self, runner: DecodeRunner, limits: Limits, default_steps: int, default_guidance_scale: float,
                 preview_steps: int):  # fmt: skip
        self.runner = runner
        self.limits = limits
        self.default_steps = default_steps
        self.default_guidance_scale = default_guidance_scale
        self.preview_steps = preview_steps

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

    async def RenderPreview(self, request, context):
        info = self.runner.info
        job, ids = preview_job_from_proto(
            request, self.limits, info.plan_format, info.codebook_size, self.preview_steps, self.default_guidance_scale,
            _metadata_request_id(context),
        )  # fmt: skip
        preview = await self.runner.render_preview(job, ids, context.time_remaining())
        return preview_to_proto(preview, common_pb2.STAGE_PLANNING)

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
