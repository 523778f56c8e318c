"""Mutual TLS between the gateway and the stages, as real processes, with certificates made here and
rotated while everything runs the way cert-manager rotates a mounted Secret (a symlink swap).

The tests run in order and share the processes: the rotations build on each other."""

import io
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest
from certs import CA, peer_serial, write_secret
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from servers import SERVING

from gateway.client import ImageClient
from testkit.cluster import Cluster

pytestmark = pytest.mark.e2e

PROMPT = "a poster that says 'HELLO'"
STAGES = ("planner", "decoder")


class Pki:
    """The certificates in use: the stages' Secret (their certificate, and ca.crt: the CA their
    clients' certificates must come from) and the gateway's (its client certificate, and ca.crt:
    the CA the stages' certificates must come from)."""

    def __init__(self, root):
        self.root = root
        self.ca = CA("first CA")
        self.next_ca = CA("second CA")  # what the rotations move to
        self.stage = self.ca.issue("stage")
        self.gateway = self.ca.issue("gateway")
        self.stage_client_ca = self.gateway_ca = self.ca.cert
        self.write()

    def file(self, secret: str, name: str) -> str:
        return str(self.root / secret / name)

    def write(self) -> None:
        write_secret(self.root / "stage", {"tls.crt": self.stage.cert, "tls.key": self.stage.key,
                                           "ca.crt": self.stage_client_ca})  # fmt: skip
        write_secret(self.root / "gateway", {"tls.crt": self.gateway.cert, "tls.key": self.gateway.key,
                                             "ca.crt": self.gateway_ca})  # fmt: skip

    def stage_probe(self) -> dict[str, str]:
        """healthcheck.check's arguments for a stage: its own certificate as the client's, as a probe
        inside its pod would show."""
        return {"ca_file": self.file("stage", "ca.crt"), "cert_file": self.file("stage", "tls.crt"),
                "key_file": self.file("stage", "tls.key")}  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def cluster(model_dir, pki, tmp_path_factory):
    server_tls = ["--tls-cert-file", pki.file("stage", "tls.crt"), "--tls-key-file", pki.file("stage", "tls.key")]
    client_tls = ["--stage-tls-ca-file", pki.file("gateway", "ca.crt"), "--stage-tls-cert-file",
                  pki.file("gateway", "tls.crt"), "--stage-tls-key-file", pki.file("gateway", "tls.key")]  # fmt: skip
    with Cluster(
        str(model_dir), engine="transformers", gateway_args=[*client_tls, "--health-interval-seconds", "0.5"],
        stage_args={kind: server_tls for kind in STAGES},
        # the client CA through the environment, as a chart would set it
        stage_env={kind: {f"{kind.upper()}_TLS_CLIENT_CA_FILE": pki.file("stage", "ca.crt")} for kind in STAGES},
        probe_tls={kind: pki.stage_probe() for kind in STAGES}, log_dir=tmp_path_factory.mktemp("logs"),
    ) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def client(cluster):
    with ImageClient(cluster.gateway.address) as c:
        yield c


def stage_health(address: str, credentials: grpc.ChannelCredentials | None = None):
    """The stage's readiness, or the status code of the failed call."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as error:
            return error.code()


def assert_generates(client: ImageClient) -> None:
    result = client.generate(PROMPT, 256, 256, seed=1, num_inference_steps=2)
    assert Image.open(io.BytesIO(result.image)).size == (256, 256)


def gateway_connections(cluster) -> set[tuple]:
    """The gateway's TCP connections to the stages (local and remote address)."""
    stage_ports = {pod.port for kind in STAGES for pod in cluster.pods(kind)}
    connections = psutil.Process(cluster.gateway.process.pid).net_connections(kind="tcp")
    return {(c.laddr, c.raddr) for c in connections if c.raddr and c.raddr.port in stage_ports
            and c.status == psutil.CONN_ESTABLISHED}  # fmt: skip


def wait_connected(cluster, before: set[tuple], only_new: bool, timeout: float = 15.0) -> set[tuple]:
    """The gateway's connections once it has new ones (not in `before`) to every stage pod, and with
    `only_new` no old ones left."""
    pods = {pod.port for kind in STAGES for pod in cluster.pods(kind)}
    deadline = time.monotonic() + timeout
    while True:
        now = gateway_connections(cluster)
        if {remote.port for _, remote in now - before} == pods and not (only_new and now & before):
            return now
        assert time.monotonic() < deadline, f"the gateway did not reconnect: before {before}, now {now}"
        time.sleep(0.1)


def planning(cluster) -> bool:
    return cluster.pods("planner")[0].metric("glmimage_requests_in_flight", stage="planner") > 0


def test_the_gateway_generates_through_mutual_tls(client):
    assert_generates(client)


@pytest.mark.parametrize("kind", STAGES)
def test_only_clients_with_a_certificate_from_the_trusted_ca_get_through(cluster, pki, kind):
    address = cluster.pods(kind)[0].address
    stranger = CA("another CA").issue("stranger")
    assert stage_health(address) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert stage_health(address, grpc.ssl_channel_credentials(pki.ca.cert)) == grpc.StatusCode.UNAVAILABLE
    untrusted = grpc.ssl_channel_credentials(pki.ca.cert, stranger.key, stranger.cert)
    assert stage_health(address, untrusted) == grpc.StatusCode.UNAVAILABLE
    trusted = grpc.ssl_channel_credentials(pki.ca.cert, pki.gateway.key, pki.gateway.cert)
    assert stage_health(address, trusted) == SERVING


def test_the_health_check_cli_shows_a_client_certificate(cluster, pki):
    probe = pki.stage_probe()
    command = [sys.executable, "-m", "servekit.healthcheck", "--address", cluster.pods("planner")[0].address,
               "--tls-ca-file", probe["ca_file"]]  # fmt: skip
    with_certificate = [*command, "--tls-cert-file", probe["cert_file"], "--tls-key-file", probe["key_file"]]
    assert subprocess.run(with_certificate, timeout=30).returncode == 0
    assert subprocess.run(command, timeout=30).returncode == 1


def test_a_rotated_stage_certificate_is_served_to_new_connections(cluster, client, pki):
    """The stages move to a certificate from a new CA; the gateway, given a CA bundle that holds it
    too, reconnects and verifies the new certificate."""
    addresses = [cluster.pods(kind)[0].address for kind in STAGES]
    files = [pki.file("gateway", "ca.crt"), pki.file("gateway", "tls.crt"), pki.file("gateway", "tls.key")]
    assert [peer_serial(a, *files) for a in addresses] == [pki.stage.serial] * 2
    pki.stage = pki.next_ca.issue("stage, rotated")
    pki.gateway_ca = pki.ca.cert + pki.next_ca.cert  # trust both while the rotation rolls out
    before = gateway_connections(cluster)
    pki.write()
    assert [peer_serial(a, *files) for a in addresses] == [pki.stage.serial] * 2
    wait_connected(cluster, before, only_new=True)
    assert_generates(client)


def test_a_rotated_gateway_certificate_is_used_for_new_connections(cluster, client, pki):
    """The stages trust only the new CA from now on. A request in flight keeps its connection until
    it ends; the gateway's new connections show its new certificate (the stages refuse the old)."""
    pki.stage_client_ca = pki.next_ca.cert
    pki.write()
    address = cluster.pods("planner")[0].address
    old_certificate = grpc.ssl_channel_credentials(pki.gateway_ca, pki.gateway.key, pki.gateway.cert)
    assert stage_health(address, old_certificate) == grpc.StatusCode.UNAVAILABLE
    before = gateway_connections(cluster)
    done: list = []
    # 1024x1024: seconds of planning, on the old connection
    request = threading.Thread(target=lambda: done.append(client.generate(PROMPT, 1024, 1024, seed=2,
                                                                           num_inference_steps=2)))  # fmt: skip
    request.start()
    while not planning(cluster):
        assert request.is_alive(), "the request ended before it was seen planning"
        time.sleep(0.05)
    pki.gateway = pki.next_ca.issue("gateway, rotated")
    pki.write()
    now = wait_connected(cluster, before, only_new=False)
    assert request.is_alive() and now & before, "the old connection should serve the request to its end"
    request.join(120)
    assert len(done) == 1 and Image.open(io.BytesIO(done[0].image)).size == (1024, 1024)
    wait_connected(cluster, before, only_new=True)
    assert_generates(client)
