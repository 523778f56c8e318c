"""python -m decoder_service --model DIR [--port 50052] [--device cuda] ... (or DECODER_* variables)"""

import asyncio
import logging
import sys
from pathlib import Path

from decoder_service.app import make_service
from decoder_service.settings import ENV_PREFIX, DecoderSettings
from servekit.server import ServerOptions, configure_logging, serve
from servekit.settings import log_settings, parse_settings

logger = logging.getLogger("decoder_service")

TINY_MODEL_DIR = Path(".cache/tiny-glm-image")


def _tiny_model() -> str:
    """The embedded default: the tiny random GLM-Image (noise images, every code path real)."""
    try:
        from testkit.tiny_model import write_tiny_model
    except ImportError:
        sys.exit("--model is required (this installation has no tiny model builder)")
    write_tiny_model(TINY_MODEL_DIR)
    logger.warning("no --model given: serving the tiny random model in %s", TINY_MODEL_DIR)
    return str(TINY_MODEL_DIR)


def main(argv: list[str] | None = None) -> None:
    settings, rest = parse_settings(DecoderSettings, ENV_PREFIX, argv, description="GLM-Image decoder (DiT) service")
    if rest:
        sys.exit(f"unrecognized arguments: {' '.join(rest)}")
    configure_logging(settings.log_level)
    if not settings.model:
        settings.model = _tiny_model()
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
