"""servekit: limits, settings, admission and the error interceptor."""

import asyncio
from typing import Literal

import grpc
import pytest
from pydantic_settings import SettingsConfigDict

from glmimage.v1 import common_pb2, image_service_pb2
from servekit import validation
from servekit.admission import Admission
from servekit.errors import InvalidRequest, Overloaded
from servekit.settings import ServerSettings, option, parse_settings
from servekit.validation import Limits

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("width", "height"), [(512, 512), (2048, 512), (544, 1984)])
def test_sizes_within_limits_pass(width, height):
    validation.check_size(width, height, Limits())


@pytest.mark.parametrize(("width", "height", "bad"), [(500, 512, "width"), (512, 480, "height"), (2080, 512, "width")])
def test_sizes_outside_limits_name_the_rule(width, height, bad):
    with pytest.raises(InvalidRequest, match=f"{bad} must be a multiple of 32 between 512 and 2048 pixels"):
        validation.check_size(width, height, Limits())


def test_steps_and_guidance_are_checked_only_when_set():
    validation.check_steps_and_guidance(image_service_pb2.GenerateRequest(), Limits())
    with pytest.raises(InvalidRequest, match="num_inference_steps must be between 1 and 100, got 0"):
        validation.check_steps_and_guidance(image_service_pb2.GenerateRequest(num_inference_steps=0), Limits())
    with pytest.raises(InvalidRequest, match="guidance_scale must be a finite number"):
        validation.check_steps_and_guidance(image_service_pb2.GenerateRequest(guidance_scale=float("inf")), Limits())


def test_sampling_rules():
    validation.check_sampling(common_pb2.PlanSampling(temperature=0, top_p=1.0, top_k=0), codebook_size=64)
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.01), dict(top_k=65)):
        with pytest.raises(InvalidRequest, match="sampling"):
            validation.check_sampling(common_pb2.PlanSampling(**bad), codebook_size=64)


@pytest.mark.parametrize("request_id", ["", "req-1", "a b:c/d_e.f~!", "x" * 128])
def test_request_ids_that_metadata_can_carry_pass(request_id):
    validation.check_request_id(request_id)


@pytest.mark.parametrize("request_id", ["a\nb", "tab\there", "nul\x00", "del\x7f", "caf\u00e9", "\u2603"])
def test_request_ids_metadata_cannot_carry_are_refused(request_id):
    with pytest.raises(InvalidRequest, match=r"printable ASCII characters \(0x20-0x7E"):
        validation.check_request_id(request_id)


@pytest.mark.parametrize("prompt", ["", " ", "\x00", "\t\n\r", "\x00\x1b\x7f", "\u200b\u00a0"])
def test_prompts_without_visible_characters_are_refused(prompt):
    with pytest.raises(InvalidRequest, match="prompt must not be empty: it needs at least one visible character"):
        validation.check_prompt(prompt, Limits())


@pytest.mark.parametrize("prompt", ["a", "\x00a\x00", " 「招牌」 ", "\u00e9"])
def test_prompts_with_visible_characters_pass(prompt):
    validation.check_prompt(prompt, Limits())


def test_message_size_holds_every_condition_image_at_its_largest():
    default = validation.max_message_bytes(Limits())
    assert default == 4 * 8 * 1024 * 1024 + 4 * 4000 + validation.MESSAGE_SLACK_BYTES
    assert validation.max_message_bytes(Limits(max_condition_images=0)) > 1024 * 1024  # an image chunk fits
    # the flags every service shares set its server's limit
    settings = ServerSettings(max_condition_images=2, max_condition_image_bytes=20 * 1024 * 1024)
    assert settings.server_options().max_message_bytes == 40 * 1024 * 1024 + 4 * 4000 + validation.MESSAGE_SLACK_BYTES


def test_metrics_listen_on_the_grpc_host_only():
    import socket
    import urllib.request

    from servekit.server import ServerOptions, start_metrics

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server, thread = start_metrics(ServerOptions("127.0.0.1", 0, metrics_port=port, shutdown_grace_seconds=0))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
        # 127.0.0.2 is this machine too: a server on every interface (0.0.0.0) would answer there
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", port), timeout=5):
            pass
    finally:
        server.shutdown()
        thread.join(5)


def test_inconsistent_limits_are_refused():
    with pytest.raises(ValueError):
        Limits(min_side=1024, max_side=512)


class DemoSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_")

    name: str = option("x", "name")
    enabled: bool = option(False, "switch")
    ratio: float = option(0.5, "ratio", gt=0)
    mode: Literal["a", "b"] = option("a", "mode")

    def check(self) -> None:
        super().check()
        if self.name == "forbidden":
            raise ValueError("--name must not be 'forbidden'")


def test_settings_flags_beat_environment_beat_defaults(monkeypatch):
    monkeypatch.setenv("DEMO_PORT", "6000")
    monkeypatch.setenv("DEMO_ENABLED", "true")
    monkeypatch.setenv("DEMO_RATIO", "0.25")
    settings, rest = parse_settings(DemoSettings, ["--name", "y", "--ratio", "2", "--extra", "1"])
    assert (settings.port, settings.name, settings.enabled, settings.ratio, settings.mode) == (6000, "y", True, 2, "a")
    assert rest == ["--extra", "1"]
    settings, _ = parse_settings(DemoSettings, ["--port", "7000", "--enabled", "no", "--max-side", "1024"])
    assert (settings.port, settings.enabled, settings.ratio, settings.limits().max_side) == (7000, False, 0.25, 1024)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port: Input should be less than or equal to 65535"),
        (["--ratio", "0"], "--ratio: Input should be greater than 0"),
        (["--mode", "c"], "--mode: Input should be 'a' or 'b'"),
        (["--enabled", "maybe"], "--enabled: Input should be a valid boolean"),
        (["--name", "forbidden"], "--name must not be 'forbidden'"),
        (["--min-side", "500"], "min_side"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_settings(DemoSettings, argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_bad_environment_stops_start_up_naming_the_flag(monkeypatch, capsys):
    monkeypatch.setenv("DEMO_PORT", "many")
    with pytest.raises(SystemExit):
        parse_settings(DemoSettings, [])
    assert "--port: Input should be a valid integer" in capsys.readouterr().err


def test_admission_bounds_in_flight_and_queue():
    async def scenario():
        admission = Admission("unit", max_in_flight=1, max_queued=1)
        release = asyncio.Event()
        order = []

        async def hold(name):
            async with admission.slot():
                order.append(name)
                await release.wait()

        first = asyncio.create_task(hold("first"))
        await asyncio.sleep(0)
        second = asyncio.create_task(hold("second"))
        await asyncio.sleep(0)
        assert (admission.in_flight, admission.queued) == (1, 1)
        with pytest.raises(Overloaded, match="1 requests in flight \\(max 1\\) and 1 queued \\(max 1\\)"):
            async with admission.slot():
                pass
        release.set()
        await asyncio.gather(first, second)
        assert order == ["first", "second"] and (admission.in_flight, admission.queued) == (0, 0)

    asyncio.run(scenario())


def test_error_interceptor_maps_domain_errors_and_hides_bugs():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from servekit.errors import ErrorInterceptor

    class Faulty(health_pb2_grpc.HealthServicer):
        async def Check(self, request, context):
            if request.service == "bad":
                raise InvalidRequest("service must be empty")
            raise KeyError("secret internals")

    async def scenario():
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        health_pb2_grpc.add_HealthServicer_to_server(Faulty(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                results = []
                for name in ("bad", "boom"):
                    try:
                        await stub.Check(health_pb2.HealthCheckRequest(service=name))
                    except grpc.aio.AioRpcError as error:
                        results.append((error.code(), error.details()))
                return results
        finally:
            await server.stop(0)

    (bad_code, bad_details), (boom_code, boom_details) = asyncio.run(scenario())
    assert (bad_code, bad_details) == (grpc.StatusCode.INVALID_ARGUMENT, "service must be empty")
    assert boom_code == grpc.StatusCode.INTERNAL and "secret" not in boom_details


def test_error_statuses_carry_typed_details_for_clients():
    """google.rpc details: ErrorInfo with the stage, BadRequest naming the field, RetryInfo on overload."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gateway.client import error_details
    from servekit.errors import ErrorInterceptor, Overloaded, UpstreamError, status_details

    class Faulty(health_pb2_grpc.HealthServicer):
        def __init__(self):
            self.upstream = None

        async def Check(self, request, context):
            if request.service == "bad":
                raise InvalidRequest("width must be a multiple of 32", "width")
            if request.service == "busy":
                raise Overloaded("planner is at capacity")
            raise self.upstream

    async def scenario():
        faulty = Faulty()
        server = grpc.aio.server(interceptors=[ErrorInterceptor("planner")])
        health_pb2_grpc.add_HealthServicer_to_server(faulty, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                errors = []
                for name in ("bad", "busy"):
                    try:
                        await stub.Check(health_pb2.HealthCheckRequest(service=name))
                    except grpc.aio.AioRpcError as error:
                        errors.append(error)
                # what the gateway does with a stage's error: the same details, its own message prefix
                faulty.upstream = UpstreamError(errors[0].code(), f"planner: {errors[0].details()}",
                                                status_details(errors[0]))  # fmt: skip
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(service="passed-through"))
                except grpc.aio.AioRpcError as error:
                    errors.append(error)
                return errors
        finally:
            await server.stop(0)

    bad, busy, passed = asyncio.run(scenario())
    assert error_details(bad).reason == "INVALID_REQUEST" and error_details(bad).stage == "planner"
    assert error_details(bad).fields == (("width", "width must be a multiple of 32"),)
    assert error_details(busy).reason == "OVERLOADED" and error_details(busy).retry_after_s == 1.0
    assert passed.details() == "planner: width must be a multiple of 32"
    assert error_details(passed) == error_details(bad)
    assert error_details(bad).lines() == ["reason INVALID_REQUEST (stage planner)",
                                          "field width: width must be a multiple of 32"]  # fmt: skip
