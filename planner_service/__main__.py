"""python -m planner_service --model DIR [--port 50051] [--engine vllm|transformers] [vLLM engine flags]"""

import asyncio
import logging

from planner_service.service import make_engine, planner_spec
from planner_service.settings import PlannerSettings
from servekit import tracing
from servekit.logs import configure_logging
from servekit.server import serve
from servekit.settings import log_settings, parse_settings

logger = logging.getLogger("planner_service")


def main() -> None:
    settings, engine_args = parse_settings(
        PlannerSettings,
        description="GLM-Image planner: the AR stage over gRPC. Flags not listed here are vLLM engine flags "
        "under vLLM's own names (--tensor-parallel-size, --gpu-memory-utilization, --max-num-seqs, --dtype, ...).",
    )
    configure_logging(settings.log_level, settings.log_format)
    tracing.setup("glm-image-planner")
    log_settings(settings)
    engine = make_engine(settings, engine_args)
    asyncio.run(serve(planner_spec(settings, engine), settings.server_options()))


if __name__ == "__main__":
    main()
