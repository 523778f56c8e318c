"""Typed settings from flags and environment: one dataclass per service.

Each dataclass field becomes `--field-name` and `PREFIX_FIELD_NAME`; a flag beats the environment,
the environment beats the default. `help` goes in the field's metadata. Values are validated by the
dataclass's own `validate()` at start-up, so a bad setting stops the service before it loads a model.
"""

import argparse
import dataclasses
import logging
import os
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from servekit.server import ServerOptions
from servekit.tls import read_pem
from servekit.validation import Limits, max_message_bytes

logger = logging.getLogger(__name__)

T = TypeVar("T", bound="ServerSettings")


def option(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A settings field: its default and help text (and argparse extras such as choices)."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class ServerSettings:
    """What every service shares: its server and the request limits it enforces. Each service
    subclasses it with its own fields and redeclares `port` and `metrics_port` with its defaults."""

    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(0, "gRPC port (0: any free port)")
    metrics_port: int = option(0, "Prometheus /metrics port (0: none)")
    shutdown_grace_seconds: float = option(30.0, "seconds in-flight requests may finish after SIGTERM")
    tls_cert_file: str = option("", "PEM certificate chain: serve TLS instead of plaintext")
    tls_key_file: str = option("", "PEM private key for --tls-cert-file")
    tls_client_ca_file: str = option(
        "", "PEM CA bundle: require client certificates it verifies (mutual TLS; needs --tls-cert-file)"
    )
    log_level: str = option("info", "logging level", choices=("debug", "info", "warning", "error"))
    log_format: str = option(
        "text",
        "log lines: text (for terminals) or json (one object a line, for log collectors)",
        choices=("text", "json"),
    )
    health_check_seconds: float = option(5.0, "how often the engine's own health is checked once loaded")
    min_side: int = option(Limits.min_side, "smallest width/height in pixels (a multiple of 32)")
    max_side: int = option(Limits.max_side, "largest width/height in pixels (a multiple of 32)")
    max_steps: int = option(Limits.max_steps, "most denoising steps a request may ask for")
    max_prompt_chars: int = option(Limits.max_prompt_chars, "longest prompt in characters")
    max_condition_images: int = option(Limits.max_condition_images, "most condition images per request")
    max_condition_image_bytes: int = option(Limits.max_condition_image_bytes, "largest encoded condition image")
    max_previews: int = option(Limits.max_previews, "most preview images a request may ask for")

    def validate(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        if self.tls_cert_file:
            read_pem(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)  # raises naming the bad file
        if self.shutdown_grace_seconds < 0:
            raise ValueError("--shutdown-grace-seconds must be >= 0")
        if self.health_check_seconds <= 0:
            raise ValueError("--health-check-seconds must be > 0")
        self.limits()  # raises on an inconsistent range

    def limits(self) -> Limits:
        return Limits(
            min_side=self.min_side,
            max_side=self.max_side,
            max_steps=self.max_steps,
            max_prompt_chars=self.max_prompt_chars,
            max_condition_images=self.max_condition_images,
            max_condition_image_bytes=self.max_condition_image_bytes,
            max_previews=self.max_previews,
        )

    def server_options(self) -> ServerOptions:
        return ServerOptions(
            host=self.host,
            port=self.port,
            metrics_port=self.metrics_port,
            shutdown_grace_seconds=self.shutdown_grace_seconds,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
            tls_client_ca_file=self.tls_client_ca_file,
            health_check_seconds=self.health_check_seconds,
            max_message_bytes=max_message_bytes(self.limits()),
        )


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(field_type: Any):
    origin = typing.get_origin(field_type)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [t for t in typing.get_args(field_type) if t is not type(None)]
        return _converter(inner[0])
    return {bool: _parse_bool, int: int, float: float}.get(field_type, str)


def add_arguments(parser: argparse.ArgumentParser, settings_type: type, env_prefix: str) -> None:
    hints = typing.get_type_hints(settings_type)
    for field in dataclasses.fields(settings_type):
        flag = "--" + field.name.replace("_", "-")
        env_name = f"{env_prefix}_{field.name.upper()}"
        convert = _converter(hints[field.name])
        default = field.default
        if env_name in os.environ:
            try:
                default = convert(os.environ[env_name])
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"{env_name}: {error}")
        extra = {k: v for k, v in field.metadata.items() if k != "help"}
        parser.add_argument(
            flag,
            dest=field.name,
            type=convert,
            default=default,
            help=f"{field.metadata.get('help', '')} (env {env_name}; default: %(default)s)",
            **extra,
        )


def parse_settings(
    settings_type: type[T], env_prefix: str, argv: Sequence[str] | None = None, description: str = ""
) -> tuple[T, list[str]]:
    """Returns the settings and the arguments it did not recognise (for a pass-through parser)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    add_arguments(parser, settings_type, env_prefix)
    namespace, rest = parser.parse_known_args(argv)
    settings = settings_type(**vars(namespace))
    try:
        settings.validate()
    except ValueError as error:
        parser.error(str(error))
    return settings, rest


def log_settings(settings: Any) -> None:
    for field in dataclasses.fields(settings):
        logger.info("setting %s = %r", field.name, getattr(settings, field.name))
