"""python -m decoder_service --model DIR [--port 50052] [--device cuda] ... (or DECODER_* variables)"""

import asyncio
import sys

from decoder_service.service import make_service
from decoder_service.settings import DecoderSettings
from servekit import tracing
from servekit.logs import configure_logging
from servekit.server import serve
from servekit.settings import log_settings, parse_settings


def main(argv: list[str] | None = None) -> None:
    settings, rest = parse_settings(DecoderSettings, argv, description="GLM-Image decoder (DiT) service")
    if rest:
        sys.exit(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(settings.log_level, settings.log_format)
    tracing.setup("glm-image-decoder")
    log_settings(settings)
    asyncio.run(serve(make_service(settings), settings.server_options()))


if __name__ == "__main__":
    main()
