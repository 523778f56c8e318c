"""python -m gateway --port 50050 --planner ADDR[,ADDR...] --decoder ADDR[,ADDR...]"""

import asyncio

from gateway.service import gateway_spec
from gateway.settings import GatewaySettings
from servekit import tracing
from servekit.logs import configure_logging
from servekit.server import serve
from servekit.settings import log_settings, parse_settings


def main() -> None:
    settings, rest = parse_settings(GatewaySettings, description="GLM-Image gateway: the public ImageService")
    if rest:
        raise SystemExit(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(settings.log_level, settings.log_format)
    tracing.setup("glm-image-gateway")
    log_settings(settings)
    asyncio.run(serve(gateway_spec(settings), settings.server_options()))


if __name__ == "__main__":
    main()
