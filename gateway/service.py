"""Wires settings, stage pools and the servicer into the shared server lifecycle."""

import logging

import grpc

from gateway.auth import Gatekeeper
from gateway.http_api import HttpFront, HttpOptions
from gateway.replicas import ReplicaPool
from gateway.servicer import ImageServicer
from gateway.settings import GatewaySettings
from glmimage.v1 import decoder_pb2_grpc, image_service_pb2, image_service_pb2_grpc, planner_pb2_grpc
from servekit.admission import Admission
from servekit.errors import Unavailable
from servekit.server import ServiceSpec, package_version
from servekit.tls import ChannelTLS
from servekit.validation import max_message_bytes

logger = logging.getLogger(__name__)

SERVICE_NAME = image_service_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name


def _stage_tls(settings: GatewaySettings) -> ChannelTLS | None:
    if not settings.stage_tls_ca_file:
        return None
    return ChannelTLS(settings.stage_tls_ca_file, settings.stage_tls_cert_file, settings.stage_tls_key_file)


def _gatekeeper(settings: GatewaySettings) -> Gatekeeper:
    gatekeeper = settings.gatekeeper()
    if gatekeeper.keys is None:
        logger.warning("no --api-keys-file: anyone who reaches this gateway can generate")
    return gatekeeper


def gateway_spec(settings: GatewaySettings) -> ServiceSpec:
    """Ready (SERVING) while at least one planner and one decoder replica are SERVING. With --http-port,
    the OpenAI-compatible HTTP front serves from start-up (liveness at once, readiness like gRPC's)."""
    pools: dict[str, ReplicaPool] = {}  # made in register(): aio channels need the running loop
    fronts: list[HttpFront] = []

    def register(server: grpc.aio.Server) -> None:
        tls = _stage_tls(settings)  # one for both pools: they see a rotation together
        intervals = settings.health_interval_seconds, settings.resolve_interval_seconds
        message_bytes = max_message_bytes(settings.limits())
        pools["planner"] = ReplicaPool(
            "planner", settings.planner_targets(), planner_pb2_grpc.PlannerServiceStub, tls, *intervals,
            max_message_bytes=message_bytes,
        )  # fmt: skip
        pools["decoder"] = ReplicaPool(
            "decoder", settings.decoder_targets(), decoder_pb2_grpc.DecoderServiceStub, tls, *intervals,
            lookahead=settings.decoder_lookahead, max_message_bytes=message_bytes,
        )  # fmt: skip
        servicer = ImageServicer(
            planners=pools["planner"],
            decoders=pools["decoder"],
            admission=Admission("gateway", settings.max_in_flight, settings.max_queued),
            limits=settings.limits(),
            chain_options=settings.chain_options(),
            default_timeout_s=settings.default_timeout_seconds,
            version=package_version(),
            gatekeeper=_gatekeeper(settings),
        )
        image_service_pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
        if settings.http_port:
            options = HttpOptions(
                host=settings.host, port=settings.http_port, served_model_name=settings.served_model_name,
                max_images=settings.http_max_images,
                grace_seconds=settings.shutdown_grace_seconds, tls_cert_file=settings.tls_cert_file,
                tls_key_file=settings.tls_key_file,
            )  # fmt: skip
            fronts.append(HttpFront(servicer, options, check))
            fronts[0].start()

    async def start() -> None:
        for pool in pools.values():
            pool.start()
        for pool in pools.values():
            await pool.wait_serving()

    async def check() -> None:
        for stage, pool in pools.items():
            if not pool.serving():
                raise Unavailable(f"no {stage} replica is SERVING")
        if any(not front.serving() for front in fronts):
            raise Unavailable("the HTTP server has stopped")

    async def drain(grace: float) -> None:
        for front in fronts:
            await front.drain(grace)

    async def stop() -> None:
        for pool in pools.values():
            await pool.close()

    return ServiceSpec(names=[SERVICE_NAME], register=register, start=start, stop=stop, check=check, stage="gateway",
                       drain=drain)  # fmt: skip
