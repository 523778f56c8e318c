"""Wires settings, engine and servicer into the shared server lifecycle."""

from glmimage.v1 import planner_pb2, planner_pb2_grpc
from imagekit.condition_images import ResizeRule
from planner_service.engine import PlanEngine
from planner_service.servicer import PlannerServicer
from planner_service.settings import PlannerSettings
from servekit.admission import Admission
from servekit.plan_format import export as export_plan_format
from servekit.plan_format import plan_format
from servekit.server import ServiceSpec, package_version

SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name
WARMUP_PROMPT = "warm-up"


def make_engine(settings: PlannerSettings, engine_args: list[str]) -> PlanEngine:
    if settings.engine == "transformers":
        if engine_args:
            raise SystemExit(f"unrecognized arguments for the transformers engine: {' '.join(engine_args)}")
        from planner_service.transformers_engine import TransformersEngine

        return TransformersEngine(settings.model, settings.device)
    from planner_service.vllm_engine import VllmEngine

    return VllmEngine(settings.model, engine_args, settings.limits())


def planner_spec(settings: PlannerSettings, engine: PlanEngine) -> ServiceSpec:
    limits = settings.limits()
    servicer = PlannerServicer(
        engine=engine,
        admission=Admission("planner", settings.max_in_flight or engine.default_max_in_flight, settings.max_queued),
        limits=limits,
        resize_rule=ResizeRule.from_checkpoint(settings.model),
        plan_format=plan_format(settings.model),
        model=settings.model,
        chunk_tokens=settings.chunk_tokens,
        chunk_interval_s=settings.chunk_interval_seconds,
        version=package_version(),
    )

    async def start() -> None:
        await engine.start()
        export_plan_format("planner", servicer.plan_format)
        servicer.loaded = True
        await warm_up(servicer, limits)

    return ServiceSpec(
        names=[SERVICE_NAME],
        register=lambda server: planner_pb2_grpc.add_PlannerServiceServicer_to_server(servicer, server),
        start=start,
        stop=engine.shutdown,
        check=engine.check_health,
        stage="planner",
    )


async def warm_up(servicer: PlannerServicer, limits) -> None:
    """One smallest plan through the whole path before the service reports SERVING."""
    request = planner_pb2.PlanRequest(
        request_id="warm-up", prompt=WARMUP_PROMPT, width=limits.min_side, height=limits.min_side, seed=0
    )
    async for _ in servicer.Plan(request, None):
        pass
