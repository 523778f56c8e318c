"""Typed settings from flags and environment, on pydantic-settings: one class per service.

Each field is `--field-name` and `PREFIX_FIELD_NAME` (the class's `env_prefix`); a flag beats the
environment, the environment beats the default. A field's type, choices (`Literal`) and range
(`ge`, `gt`, `le`) are declared with it; what spans several fields is checked in `check()`. Values
are validated when the settings are made, so a bad setting stops the service before it loads a model.
"""

import argparse
import logging
from collections.abc import Sequence
from typing import Any, Literal, Self, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

from servekit.server import ServerOptions
from servekit.tls import read_pem
from servekit.validation import Limits, max_message_bytes

logger = logging.getLogger(__name__)

T = TypeVar("T", bound="ServerSettings")


def option(default: Any, help: str, **constraints: Any) -> Any:  # noqa: A002 - the flag's help
    """A settings field: its default, help text and range (pydantic's ge, gt, le, ...)."""
    return Field(default, description=help, **constraints)


class ServerSettings(BaseSettings):
    """What every service shares: its server and the request limits it enforces. Each service
    subclasses it with its own fields and `env_prefix`, and redeclares `port` and `metrics_port`
    with its defaults."""

    model_config = SettingsConfigDict(env_prefix="SERVEKIT_", extra="forbid")

    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(0, "gRPC port (0: any free port)", ge=0, le=65535)
    metrics_port: int = option(0, "Prometheus /metrics port (0: none)", ge=0, le=65535)
    shutdown_grace_seconds: float = option(30.0, "seconds in-flight requests may finish after SIGTERM", ge=0)
    tls_cert_file: str = option("", "PEM certificate chain: serve TLS instead of plaintext")
    tls_key_file: str = option("", "PEM private key for --tls-cert-file")
    tls_client_ca_file: str = option(
        "", "PEM CA bundle: require client certificates it verifies (mutual TLS; needs --tls-cert-file)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = option("info", "logging level")
    log_format: Literal["text", "json"] = option(
        "text", "log lines: text (for terminals) or json (one object a line, for log collectors)"
    )
    health_check_seconds: float = option(5.0, "how often the engine's own health is checked once loaded", gt=0)
    min_side: int = option(Limits.min_side, "smallest width/height in pixels (a multiple of 32)")
    max_side: int = option(Limits.max_side, "largest width/height in pixels (a multiple of 32)")
    max_steps: int = option(Limits.max_steps, "most denoising steps a request may ask for")
    max_prompt_chars: int = option(Limits.max_prompt_chars, "longest prompt in characters")
    max_condition_images: int = option(Limits.max_condition_images, "most condition images per request")
    max_condition_image_bytes: int = option(Limits.max_condition_image_bytes, "largest encoded condition image")
    max_previews: int = option(Limits.max_previews, "most preview images a request may ask for")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        self.check()
        return self

    def check(self) -> None:
        """What no single field's declaration can say; subclasses extend it (raising ValueError)."""
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        if self.tls_cert_file:
            read_pem(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)  # raises naming the bad file
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


def _flag(loc: tuple) -> str:
    return "--" + "-".join(str(part) for part in loc).replace("_", "-")


def describe(error: ValidationError) -> str:
    """One line per problem, naming the flag: `--port: Input should be ...`, or check()'s own message."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{_flag(problem['loc'])}: {message}" if problem["loc"] else message)
    return "; ".join(lines)


def parse_settings(
    settings_type: type[T], argv: Sequence[str] | None = None, description: str = ""
) -> tuple[T, list[str]]:
    """The settings from `argv` (default: sys.argv) and the environment, and the arguments they did not
    recognise (for a pass-through parser). A bad value exits with a usage error that names the flag."""
    prefix = settings_type.model_config.get("env_prefix", "")
    epilog = f"Every flag is also read from the environment as {prefix}<FLAG> (--max-side: {prefix}MAX_SIDE)."
    parser = argparse.ArgumentParser(description=description, epilog=epilog, allow_abbrev=False)
    cli: CliSettingsSource[argparse.ArgumentParser] = CliSettingsSource(
        settings_type, root_parser=parser, cli_kebab_case=True
    )
    namespace, rest = parser.parse_known_args(argv)
    try:
        settings = settings_type(_cli_settings_source=cli(parsed_args=namespace))
    except ValidationError as error:
        parser.error(describe(error))
    return settings, rest


def log_settings(settings: BaseSettings) -> None:
    for name in type(settings).model_fields:
        logger.info("setting %s = %r", name, getattr(settings, name))
