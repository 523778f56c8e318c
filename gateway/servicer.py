"""ImageService: validates and admits requests, resolves defaults, and runs the chain."""

import logging
import math
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from gateway.auth import ANONYMOUS, Gatekeeper
from gateway.chain import Chain, ChainOptions, ResolvedRequest
from gateway.replicas import ReplicaPool
from glmimage.v1 import common_pb2, image_service_pb2, image_service_pb2_grpc
from servekit import tracing, validation
from servekit.admission import Admission
from servekit.errors import Unavailable
from servekit.logs import RequestLog
from servekit.validation import Limits

logger = logging.getLogger(__name__)


def resolve(request: image_service_pb2.GenerateRequest, limits: Limits) -> ResolvedRequest:
    """Validates what the gateway can check without a model, and fills in request id and seed."""
    validation.check_request_id(request.request_id)
    validation.check_prompt(request.prompt, limits)
    validation.check_size(request.width, request.height, limits)
    validation.check_steps_and_guidance(request, limits)
    validation.check_condition_images(request.condition_images, limits)
    validation.check_previews(request.previews, limits)
    validation.check_output(request)
    return ResolvedRequest(
        request_id=request.request_id or secrets.token_hex(8),
        prompt=request.prompt,
        width=request.width,
        height=request.height,
        seed=request.seed if request.HasField("seed") else secrets.randbits(63),
        steps=request.num_inference_steps if request.HasField("num_inference_steps") else None,
        guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
        sampling=request.sampling,
        condition_images=list(request.condition_images),
        output_format=request.output_format or common_pb2.IMAGE_FORMAT_PNG,
        output_quality=request.output_quality if request.HasField("output_quality") else None,
        previews=request.previews,
    )


class ImageServicer(image_service_pb2_grpc.ImageServiceServicer):
    def __init__(self, planners: ReplicaPool, decoders: ReplicaPool, admission: Admission, limits: Limits,
                 chain_options: ChainOptions, default_timeout_s: float, version: str,
                 gatekeeper: Gatekeeper):  # fmt: skip
        self.planners = planners
        self.gatekeeper = gatekeeper
        self.decoders = decoders
        self.admission = admission
        self.limits = limits
        self.chain_options = chain_options
        self._defaults: tuple[int, float] | None = None
        self.default_timeout_s = default_timeout_s
        self.version = version

    def _decoder_defaults(self) -> tuple[int, float]:
        """Steps and guidance the decoders use for unset fields (what `accepted` reports); the last
        ones seen while no decoder is SERVING (the request waits for one)."""
        for replica in self.decoders.serving():
            info = replica.info
            if info is not None and info.default_num_inference_steps:
                self._defaults = info.default_num_inference_steps, info.default_guidance_scale
        if self._defaults is None:
            raise Unavailable("decoder: no replica has been SERVING yet")
        return self._defaults

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        return self.gatekeeper.authenticate(dict(context.invocation_metadata() or ()).get("authorization"))

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        key = self._caller(context)
        remaining = context.time_remaining()
        timeout = None if remaining is None or math.isinf(remaining) else remaining
        async for event in self.generate(request, timeout, key):
            yield event

    async def generate(
        self, request: image_service_pb2.GenerateRequest, timeout_s: float | None = None, key: str = ANONYMOUS
    ) -> AsyncIterator[image_service_pb2.GenerateEvent]:
        """One image, whoever asks (gRPC Generate, the HTTP front) with an authenticated `key` name: the
        key's limits, validation, admission, the deadline (`timeout_s`, or the default), `accepted`,
        then the chain's events (counted in the metrics by the front that asked: servekit.metrics). Raises
        ServiceError; the request id is `request.request_id`, assigned when empty."""
        deadline = time.monotonic() + (self.default_timeout_s if timeout_s is None else timeout_s)
        with self.gatekeeper.limits.hold(key):
            async for event in self._admitted(request, deadline, key):
                yield event

    async def _admitted(self, request: image_service_pb2.GenerateRequest, deadline: float, key: str):
        resolved = resolve(request, self.limits)
        with RequestLog(logger, "generate", resolved.request_id, size=f"{resolved.width}x{resolved.height}") as summary:
            logger.info("%s: %dx%d for key %s", resolved.request_id, resolved.width, resolved.height, key)
            async with self.admission.slot() as waited:
                summary.seconds["admission"] = waited
                tracing.waited(waited, "gateway admission")
                arrival = time.monotonic()
                steps, guidance = self._decoder_defaults()
                if resolved.steps is None:
                    resolved.steps = steps
                if resolved.guidance_scale is None:
                    resolved.guidance_scale = guidance
                yield image_service_pb2.GenerateEvent(
                    accepted=image_service_pb2.Accepted(
                        request_id=resolved.request_id, seed=resolved.seed, width=resolved.width,
                        height=resolved.height, num_inference_steps=resolved.steps,
                        guidance_scale=resolved.guidance_scale,
                    )
                )  # fmt: skip
                chain = Chain(resolved, self.planners, self.decoders, arrival, deadline, self.chain_options)
                async for event in chain.run():
                    if event.WhichOneof("event") == "completed":
                        done = event.completed
                        summary.details.update(planner_attempts=done.planner_attempts,
                                               decoder_attempts=done.decoder_attempts)  # fmt: skip
                        summary.seconds.update(first_plan_token=done.timings.first_plan_token_seconds,
                                               planning=done.timings.planning_seconds)  # fmt: skip
                    yield event

    async def GetServerInfo(self, request, context):
        self._caller(context)
        stages = []
        for role, pool in ((common_pb2.SERVICE_ROLE_PLANNER, self.planners),
                           (common_pb2.SERVICE_ROLE_DECODER, self.decoders)):  # fmt: skip
            for replica, info in pool.infos():
                stage = common_pb2.ServerInfo(role=role)
                if info is not None:
                    stage.CopyFrom(info)
                stage.address = replica.host_port
                stage.serving = replica.serving
                stages.append(stage)
        planner_formats = {s.plan_format for s in stages if s.role == common_pb2.SERVICE_ROLE_PLANNER and s.plan_format}
        decoder_formats = {s.plan_format for s in stages if s.role == common_pb2.SERVICE_ROLE_DECODER and s.plan_format}
        return common_pb2.ServerInfo(
            role=common_pb2.SERVICE_ROLE_GATEWAY,
            engine="gateway",
            limits=self.limits.to_proto(),
            version=self.version,
            stages=stages,
            plan_formats_match=len(planner_formats) == 1 and planner_formats == decoder_formats,
            plan_format=next(iter(planner_formats)) if len(planner_formats) == 1 else "",
        )
