"""python -m gateway --port 50050 --planner ADDR[,ADDR...] --decoder ADDR[,ADDR...]"""

import asyncio

from gateway.service import gateway_spec
from gateway.settings import GatewaySettings
from servekit.server import configure_logging, serve
from servekit.settings import log_settings, parse_settings


def main() -> None:
    settings, rest = parse_settings(
        GatewaySettings, "GATEWAY", description="GLM-Image gateway: the public ImageService"
    )
    if rest:
        raise SystemExit(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(settings.log_level)
    log_settings(settings)
    asyncio.run(serve(gateway_spec(settings), settings.server_options()))


if __name__ == "__main__":
    main()
