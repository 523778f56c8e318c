"""python -m decoder_service --model DIR [--port 50052] [--device cuda] ... (or DECODER_* variables)"""

import asyncio
import sys

from decoder_service.service import make_service
from decoder_service.settings import ENV_PREFIX, DecoderSettings
from servekit.server import configure_logging, serve
from servekit.settings import log_settings, parse_settings


def main(argv: list[str] | None = None) -> None:
    settings, rest = parse_settings(DecoderSettings, ENV_PREFIX, argv, description="GLM-Image decoder (DiT) service")
    if rest:
        sys.exit(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(settings.log_level)
    log_settings(settings)
    asyncio.run(serve(make_service(settings), settings.server_options()))


if __name__ == "__main__":
    main()
