"""Wires settings, engine, runner and servicer into the shared server lifecycle."""

from decoder_service.engine import DecoderEngine
from decoder_service.runner import DecodeRunner, RunnerOptions
from decoder_service.servicer import DecoderServicer
from decoder_service.settings import DecoderSettings
from glmimage.v1 import decoder_pb2, decoder_pb2_grpc
from servekit.server import ServiceSpec

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name


def make_engine(settings: DecoderSettings) -> DecoderEngine:
    from decoder_service.diffusers_engine import DiffusersEngine  # torch: imported here, not by the servicer

    return DiffusersEngine(settings.model, settings.device, settings.dtype, settings.plan_format)


def make_service(settings: DecoderSettings, engine: DecoderEngine | None = None) -> ServiceSpec:
    limits = settings.limits()
    runner = DecodeRunner(
        engine or make_engine(settings),
        RunnerOptions(
            max_concurrent_decodes=settings.max_concurrent_decodes,
            max_queued=settings.max_queued,
            plan_stall_timeout_s=settings.plan_stall_timeout_seconds,
            heartbeat_s=settings.heartbeat_seconds,
            chunk_bytes=settings.chunk_bytes,
            png_compress_level=settings.png_compress_level,
            warm_up=settings.warm_up,
            warm_up_side=limits.min_side,
            preview_max_side=settings.preview_max_side,
        ),
    )
    servicer = DecoderServicer(
        runner, limits, settings.default_steps, settings.default_guidance_scale, settings.preview_steps
    )
    return ServiceSpec(
        names=[SERVICE_NAME],
        register=lambda server: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(servicer, server),
        start=runner.start,
        stop=runner.stop,
        stage="decoder",
    )
