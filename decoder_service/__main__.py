"""python -m decoder_service --model DIR [--port 50052] [--device cuda] ... (or DECODER_* variables)"""

import asyncio
import sys

from decoder_service.app import make_service
from decoder_service.settings import ENV_PREFIX, DecoderSettings
from servekit.server import ServerOptions, configure_logging, serve
from servekit.settings import log_settings, parse_settings


def main(argv: list[str] | None = None) -> None:
    settings, rest = parse_settings(DecoderSettings, ENV_PREFIX, argv, description="GLM-Image decoder (DiT) service")
    if rest:
        sys.exit(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(settings.log_level)
    log_settings(settings)
    options = ServerOptions(
        host=settings.host,
        port=settings.port,
        metrics_port=settings.metrics_port,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
    )
    asyncio.run(serve(make_service(settings), options))


if __name__ == "__main__":
    main()
