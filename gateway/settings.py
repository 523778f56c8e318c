"""The gateway's settings: flags and GATEWAY_* environment."""

from pydantic_settings import SettingsConfigDict

from gateway.auth import ApiKeys, Gatekeeper, KeyLimits
from gateway.chain import ChainOptions
from gateway.discovery import Target
from servekit.settings import ServerSettings, option
from servekit.tls import read_pem


class GatewaySettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    planner: str = option(
        "127.0.0.1:50051", "planner targets, comma-separated (host:port or dns:///name:port; a name is "
        "re-resolved and each of its addresses is a replica)",
    )  # fmt: skip
    decoder: str = option("127.0.0.1:50052", "decoder targets, comma-separated (as --planner)")
    port: int = option(50050, "gRPC port", ge=0, le=65535)
    metrics_port: int = option(9090, "Prometheus /metrics port (0 = off)", ge=0, le=65535)
    max_in_flight: int = option(256, "requests served at once", ge=1)
    max_queued: int = option(256, "requests waiting for a slot before RESOURCE_EXHAUSTED", ge=0)
    planner_attempts: int = option(3, "most planner replicas one request may try", ge=1)
    decoder_attempts: int = option(3, "most decoder replicas one request may try", ge=1)
    default_timeout_seconds: float = option(600.0, "deadline for requests that carry none", gt=0)
    health_interval_seconds: float = option(1.0, "how often each stage replica's health and load are checked", gt=0)
    resolve_interval_seconds: float = option(
        5.0, "how often stage names are re-resolved (and at once after a failure)", gt=0
    )
    stall_timeout_seconds: float = option(
        30.0, "a stage replica that should be working and sends nothing for this long has failed", gt=0
    )
    decoder_bind_lead_seconds: float = option(
        1.0, "bind a request to a decoder when its plan has about this long left (0: when complete; inf: at once)",
        ge=0,
    )  # fmt: skip
    decoder_lookahead: int = option(1, "requests bound to a decoder beyond its denoising slots (ready to start)", ge=0)
    stage_tls_ca_file: str = option("", "PEM CA bundle: talk TLS to the stages, verifying their certificates")
    stage_tls_cert_file: str = option(
        "", "PEM client certificate shown to the stages (mutual TLS; with --stage-tls-ca-file), re-read when it changes"
    )
    stage_tls_key_file: str = option("", "PEM private key for --stage-tls-cert-file")
    http_port: int = option(0, "OpenAI-compatible Images API over HTTP on this port (0 = off)", ge=0, le=65535)
    served_model_name: str = option("glm-image", "the model name the HTTP API serves (`model`, /v1/models)")
    http_max_images: int = option(4, "most images (`n`) one HTTP request may ask for", ge=1)
    api_keys_file: str = option(
        "", "keys gRPC and HTTP clients must send as 'authorization: Bearer KEY', one 'sha256:<hex digest> [name]' "
        "a line, re-read when it changes (empty: the gateway is open to anyone who reaches it)",
    )  # fmt: skip
    key_requests_per_minute: int = option(0, "requests one API key may start a minute (0 = no limit)", ge=0)
    key_max_in_flight: int = option(0, "requests one API key may have in flight (0 = no limit)", ge=0)

    def check(self) -> None:
        super().check()
        if not self.planner_targets() or not self.decoder_targets():
            raise ValueError("--planner and --decoder each need at least one target")
        for target in (*self.planner_targets(), *self.decoder_targets()):
            Target.parse(target)  # raises with the accepted forms
        if not self.served_model_name.strip():
            raise ValueError("--served-model-name must not be empty")
        if self.tls_client_ca_file and self.http_port:
            raise ValueError("--tls-client-ca-file cannot go with --http-port: HTTP clients show no certificate")
        if bool(self.stage_tls_cert_file) != bool(self.stage_tls_key_file) or (
            self.stage_tls_cert_file and not self.stage_tls_ca_file
        ):
            raise ValueError("--stage-tls-cert-file and --stage-tls-key-file go together, with --stage-tls-ca-file")
        if self.stage_tls_ca_file:
            read_pem(self.stage_tls_cert_file, self.stage_tls_key_file, self.stage_tls_ca_file)  # names a bad file
        if (self.key_requests_per_minute or self.key_max_in_flight) and not self.api_keys_file:
            raise ValueError("--key-requests-per-minute and --key-max-in-flight need --api-keys-file")
        self.gatekeeper()  # raises when the keys file is unreadable or malformed

    def gatekeeper(self) -> Gatekeeper:
        keys = ApiKeys(self.api_keys_file) if self.api_keys_file else None
        return Gatekeeper(keys, KeyLimits(self.key_requests_per_minute, self.key_max_in_flight))

    def planner_targets(self) -> list[str]:
        return [t.strip() for t in self.planner.split(",") if t.strip()]

    def decoder_targets(self) -> list[str]:
        return [t.strip() for t in self.decoder.split(",") if t.strip()]

    def chain_options(self) -> ChainOptions:
        return ChainOptions(
            planner_attempts=self.planner_attempts,
            decoder_attempts=self.decoder_attempts,
            bind_lead_s=self.decoder_bind_lead_seconds,
            stall_s=self.stall_timeout_seconds,
        )
