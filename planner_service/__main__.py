"""python -m planner_service --model DIR [--port 50051] [--engine vllm|transformers] [vLLM engine flags]"""

import asyncio
import logging

from planner_service.service import make_engine, planner_spec
from planner_service.settings import PlannerSettings
from servekit.server import ServerOptions, configure_logging, serve
from servekit.settings import log_settings, parse_settings

logger = logging.getLogger("planner_service")


def main() -> None:
    settings, engine_args = parse_settings(
        PlannerSettings, "PLANNER", description="GLM-Image planner: the AR stage over gRPC"
    )
    configure_logging(settings.log_level)
    log_settings(settings)
    engine = make_engine(settings, engine_args)
    options = ServerOptions(
        host=settings.host,
        port=settings.port,
        metrics_port=settings.metrics_port,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
    )
    asyncio.run(serve(planner_spec(settings, engine), options))


if __name__ == "__main__":
    main()
