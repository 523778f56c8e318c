"""The deployed topology on one machine: each stage's pods behind one name (a headless Service),
the gateway given only the names. Failover, draining, scaling out, rolling restarts and a burst,
with real processes."""

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from servers import SERVING, health_status
from stages import busy_pod, health_status_or_none, pixels, restart

from gateway.client import ImageClient
from glmimage.v1 import common_pb2
from testkit import reference
from testkit.cluster import Cluster
from testkit.hosts import HostsEntries

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not HostsEntries.writable(), reason="pods behind one name need write access to /etc/hosts"),
]

PROMPT = "a poster that says 'HELLO'"
STALL_SECONDS = 3
GATEWAY_ARGS = ["--health-interval-seconds", "0.5", "--resolve-interval-seconds", "1", "--health-check-seconds", "0.5",
                "--stall-timeout-seconds", str(STALL_SECONDS)]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(model_dir):
    with Cluster(str(model_dir), engine="transformers", planners=2, decoders=2, behind_names=True,
                 gateway_args=GATEWAY_ARGS) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def client(cluster):
    with ImageClient(cluster.gateway.address) as c:
        yield c


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for_health(service, status: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while health_status_or_none(service.address) != status:
        assert time.monotonic() < deadline, f"{service.name} did not become {status}"
        time.sleep(0.2)


def served_by(pod, request_id: str) -> bool:
    return f"decode {request_id}: completed" in pod.log_path.read_text()  # its RequestLog summary


def test_server_info_lists_every_pod_behind_the_names(client):
    # the gateway is ready with one pod per stage; it sees the others at its next health poll
    deadline = time.monotonic() + 10
    info = client.server_info()
    while not all(s.serving for s in info.stages) and time.monotonic() < deadline:
        time.sleep(0.2)
        info = client.server_info()
    by_role = {role: sorted(s.address for s in info.stages if s.role == role)
               for role in (common_pb2.SERVICE_ROLE_PLANNER, common_pb2.SERVICE_ROLE_DECODER)}  # fmt: skip
    assert [a.rsplit(":", 1)[0] for a in by_role[common_pb2.SERVICE_ROLE_PLANNER]] == ["127.0.1.1", "127.0.1.2"]
    assert [a.rsplit(":", 1)[0] for a in by_role[common_pb2.SERVICE_ROLE_DECODER]] == ["127.0.2.1", "127.0.2.2"]
    assert all(s.serving and s.load.capacity >= 1 for s in info.stages)
    assert info.plan_formats_match and info.plan_format.startswith("glm-image/vq64/")


def test_decoder_pod_killed_mid_denoise_is_replaced_behind_the_name(client, cluster, pipe):
    killed = []

    def on_progress(stage, done, total):
        if stage == common_pb2.STAGE_DECODING and done == 2 and not killed:
            killed.append(busy_pod(cluster.pods("decoder"), "decoder"))
            killed[0].signal(signal.SIGKILL)

    result = client.generate(PROMPT, 256, 256, seed=2, num_inference_steps=40, on_progress=on_progress)
    assert killed and result.completed.decoder_attempts == 2 and result.completed.planner_attempts == 1
    expected = reference.render(pipe, PROMPT, 256, 256, seed=2, steps=40)
    assert np.array_equal(pixels(result.image), np.asarray(expected))
    restart(killed[0])


def test_planner_pod_killed_mid_plan_is_replaced_behind_the_name(client, cluster, pipe):
    killed = []

    def on_progress(stage, done, total):
        if stage == common_pb2.STAGE_PLANNING and done >= 64 and not killed:
            killed.append(busy_pod(cluster.pods("planner"), "planner"))
            killed[0].signal(signal.SIGKILL)

    result = client.generate(PROMPT, 512, 256, seed=6, num_inference_steps=2, on_progress=on_progress)
    assert killed and result.completed.planner_attempts == 2
    expected = reference.render(pipe, PROMPT, 512, 256, seed=6, steps=2)
    assert np.array_equal(pixels(result.image), np.asarray(expected))
    restart(killed[0])


def test_a_draining_pod_gets_no_new_requests(client, cluster):
    """SIGTERM a decoder pod while it denoises a long request: it finishes that one (drain), and
    every request sent meanwhile goes to the other pod, though the name still lists both."""
    long_result = {}
    started = threading.Event()

    def long_request():
        def on_progress(stage, done, total):
            if stage == common_pb2.STAGE_DECODING and done == 1:
                started.set()

        long_result["r"] = client.generate(PROMPT, 512, 512, seed=1, num_inference_steps=100,
                                           request_id="long-one", on_progress=on_progress)  # fmt: skip

    thread = threading.Thread(target=long_request)
    thread.start()
    assert started.wait(60)
    draining = busy_pod(cluster.pods("decoder"), "decoder")
    draining.signal(signal.SIGTERM)
    time.sleep(0.7)  # past one health poll of the gateway
    for i in range(3):
        assert client.generate(PROMPT, 256, 256, seed=i, num_inference_steps=2, request_id=f"during-drain-{i}")
    thread.join(120)
    assert long_result["r"].completed.decoder_attempts == 1  # the draining pod finished it
    assert draining.process.wait(60) == 0
    others = [pod for pod in cluster.pods("decoder") if pod is not draining]
    for i in range(3):
        request_id = f"during-drain-{i}"
        assert not served_by(draining, request_id) and any(served_by(pod, request_id) for pod in others)
    restart(draining)


def test_a_pod_added_behind_the_name_receives_requests(client, cluster):
    new = cluster.add_pod("decoder")
    time.sleep(2.5)  # the gateway re-resolves every second and polls health every half second
    assert any(s.address == new.address for s in client.server_info().stages)
    results, errors = [], []

    def one(i):
        try:
            results.append(client.generate(PROMPT, 256, 256, seed=i, num_inference_steps=8, request_id=f"scale-{i}"))
        except grpc.RpcError as error:
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 6
    assert any(served_by(new, f"scale-{i}") for i in range(6)), "the new pod got no request"


def test_rolling_restart_of_every_pod_loses_no_request(client, cluster):
    stop = threading.Event()
    completed, errors = [], []

    def steady_stream(worker):
        i = 0
        while not stop.is_set():
            try:
                completed.append(client.generate(PROMPT, 256, 256, seed=i, num_inference_steps=4, timeout=120))
            except grpc.RpcError as error:
                errors.append(f"{worker}/{i}: {error.code().name} {error.details()}")
            i += 1

    workers = [threading.Thread(target=steady_stream, args=(w,)) for w in range(2)]
    for w in workers:
        w.start()
    try:
        for kind in ("decoder", "planner"):
            for pod in cluster.pods(kind):
                if not pod.alive():
                    continue
                before = len(completed)
                pod.signal(signal.SIGTERM)
                assert pod.process.wait(60) == 0
                restart(pod)
                deadline = time.monotonic() + 60
                while len(completed) == before:  # requests flow between two restarts
                    assert time.monotonic() < deadline and not errors, errors
                    time.sleep(0.1)
    finally:
        stop.set()
        for w in workers:
            w.join(180)
    assert not errors, errors
    assert len(completed) >= 5


def test_a_burst_at_one_planner_and_one_decoder_with_default_settings_completes(model_dir):
    """24 concurrent requests on 1 + 1 pods, every queue at its default: all complete (the gateway
    holds what the stages cannot take yet)."""
    with Cluster(str(model_dir), planners=1, decoders=1, behind_names=True) as burst_cluster, \
            ImageClient(burst_cluster.gateway.address) as burst_client:  # fmt: skip
        results, errors = [], []

        def one(i):
            try:
                results.append(burst_client.generate(PROMPT, 256, 256, seed=i, num_inference_steps=8, timeout=300))
            except grpc.RpcError as error:
                errors.append(f"{error.code().name}: {error.details()}")

        gateway = burst_cluster.gateway
        seen = {"in_service": 0.0, "decoder_queued": 0.0}
        stop = threading.Event()

        def watch_demand():  # what the gateway has on the decoder, and the decoder's own queue, sampled
            while not stop.is_set():
                in_service = gateway.metric("glmimage_gateway_stage_in_service", stage="decoder")
                seen["in_service"] = max(seen["in_service"], in_service)
                queued = burst_cluster.pods("decoder")[0].metric("glmimage_requests_queued", stage="decoder")
                seen["decoder_queued"] = max(seen["decoder_queued"], queued)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_demand)
        watcher.start()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(360)
        stop.set()
        watcher.join(10)
        assert not errors, errors
        assert len(results) == 24
        assert gateway.metric("glmimage_gateway_retries_total", stage="decoder") == 0
        # the gateway never bound more than the slot + one ready to the decoder, whose own queue stayed
        # short (a finishing call may overlap the next binding for a moment); the rest waited at the gateway
        assert 1 <= seen["in_service"] <= 2 and seen["decoder_queued"] <= 2, seen


def test_a_frozen_decoder_pod_is_abandoned_and_the_plan_replayed(client, cluster, pipe):
    """SIGSTOP mid-denoise: no event for the stall timeout, so the gateway replays the plan on the
    other pod instead of waiting for the deadline."""
    frozen = []

    def on_progress(stage, done, total):
        if stage == common_pb2.STAGE_DECODING and done == 2 and not frozen:
            frozen.append(busy_pod(cluster.pods("decoder"), "decoder"))
            frozen[0].signal(signal.SIGSTOP)

    started = time.monotonic()
    try:
        result = client.generate(PROMPT, 256, 256, seed=3, num_inference_steps=40, on_progress=on_progress, timeout=60)
    finally:
        for pod in frozen:
            pod.signal(signal.SIGCONT)
    assert frozen and result.completed.decoder_attempts == 2
    assert time.monotonic() - started < STALL_SECONDS + 15
    expected = reference.render(pipe, PROMPT, 256, 256, seed=3, steps=40)
    assert np.array_equal(pixels(result.image), np.asarray(expected))


def test_the_gateway_is_not_ready_while_a_stage_has_no_serving_pod(client, cluster):
    planners = [p for p in cluster.pods("planner") if p.alive()]
    for pod in planners:
        pod.signal(signal.SIGSTOP)
    try:
        wait_for_health(cluster.gateway, NOT_SERVING)
        assert health_status(cluster.gateway.address, "liveness") == SERVING  # alive: not to be restarted
    finally:
        for pod in planners:
            pod.signal(signal.SIGCONT)
    wait_for_health(cluster.gateway, SERVING)
    assert client.generate(PROMPT, 256, 256, seed=1, num_inference_steps=2).image
