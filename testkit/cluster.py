"""The three services as local processes on loopback: `make serve`, `make demo`, e2e tests, benchmarks.

With `behind_names=True` each stage is deployed as in Kubernetes: its pods listen on their own
loopback addresses (127.0.1.N planners, 127.0.2.N decoders) at one port per stage, and the gateway
is given one name per stage that resolves to all of them (testkit.hosts).

python -m testkit.cluster MODEL_DIR [--engine vllm|transformers]   # serve until Ctrl-C / SIGTERM
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from servekit.healthcheck import check
from testkit.hosts import HostsEntries

REPO = Path(__file__).resolve().parent.parent
# The tiny model serves small images; these limits let it.
DEV_LIMITS = ["--min-side", "256", "--max-side", "1024"]
STAGE_NAMES = {"planner": "glm-planner-{}.test", "decoder": "glm-decoder-{}.test"}  # {}: the hosts marker
STAGE_SUBNETS = {"planner": "127.0.1", "decoder": "127.0.2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    args: list[str]
    port: int
    metrics_port: int
    log_path: Path
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)  # on top of the caller's environment
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, env: dict) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *self.args, "--host", self.host, "--port", str(self.port),
             "--metrics-port", str(self.metrics_port)],
            cwd=REPO, env={**env, **self.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def metric(self, name: str, **labels) -> float:
        """The sum of the samples `name` with `labels` (among others) on this service's /metrics endpoint
        (0 when none): one sample when the labels name one series."""
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, then the exit code (SIGKILL if it outlives `timeout`)."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@dataclass
class Cluster:
    model_dir: str
    engine: str = "transformers"
    planners: int = 1
    decoders: int = 1
    ports: tuple[int, int, int] | None = None  # gateway, first planner, first decoder
    log_dir: Path = REPO / "out" / "logs"
    gateway_args: list[str] = field(default_factory=list)
    stage_args: dict[str, list[str]] = field(default_factory=dict)  # extra flags per stage kind
    stage_env: dict[str, dict[str, str]] = field(default_factory=dict)  # extra environment per stage kind
    # healthcheck.check's TLS arguments per kind (planner, decoder, gateway) that serves TLS
    probe_tls: dict[str, dict[str, str]] = field(default_factory=dict)
    behind_names: bool = False
    services: list[Service] = field(default_factory=list)

    def __post_init__(self):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.hosts = HostsEntries() if self.behind_names else None
        gateway_port, planner_port, decoder_port = self.ports or (free_port(), free_port(), free_port())
        self.stage_ports = {"planner": planner_port, "decoder": decoder_port}
        for kind, count in (("planner", self.planners), ("decoder", self.decoders)):
            for _ in range(count):
                self.services.append(self._pod(kind))
        if self.behind_names:
            targets = {kind: f"dns:///{self.stage_name(kind)}:{port}" for kind, port in self.stage_ports.items()}
        else:
            targets = {kind: ",".join(s.address for s in self.pods(kind)) for kind in ("planner", "decoder")}
        self.gateway = self._service("gateway", ["gateway", "--planner", targets["planner"], "--decoder",
                                                 targets["decoder"], *DEV_LIMITS, *self.gateway_args], gateway_port)  # fmt: skip
        self.services.append(self.gateway)

    def stage_name(self, kind: str) -> str:
        """The name the stage's pods are published under (unique per cluster)."""
        return STAGE_NAMES[kind].format(self.hosts.marker.rsplit(" ", 1)[-1])

    @staticmethod
    def kind(service: Service) -> str:
        return service.name.rstrip("0123456789")

    def pods(self, kind: str) -> list[Service]:
        return [s for s in self.services if s.name.startswith(kind)]

    def _pod(self, kind: str) -> Service:
        """The next pod of a stage (not started): behind the stage's name, or on a port of its own."""
        index = len(self.pods(kind))
        args = ["planner_service", "--model", self.model_dir, "--engine", self.engine] if kind == "planner" else [
            "decoder_service", "--model", self.model_dir]  # fmt: skip
        args += [*DEV_LIMITS, *self.stage_args.get(kind, [])]
        if self.behind_names:
            pod = self._service(f"{kind}{index}", args, self.stage_ports[kind], f"{STAGE_SUBNETS[kind]}.{index + 1}")
        else:
            port = (
                self.stage_ports[kind] + index
                if self.ports
                else (self.stage_ports[kind] if index == 0 else free_port())
            )
            pod = self._service(f"{kind}{index}", args, port)
        pod.env = self.stage_env.get(kind, {})
        return pod

    def add_pod(self, kind: str) -> Service:
        """Starts one more pod of `kind`; behind a name, it is published once it is ready (as Kubernetes
        publishes only ready pods)."""
        pod = self._pod(kind)
        self.services.insert(self.services.index(self.gateway), pod)
        pod.start(dict(os.environ, PYTHONUNBUFFERED="1"))
        self.wait_ready([pod])
        self.publish(pod)
        return pod

    def publish(self, pod: Service) -> None:
        if self.hosts is not None:
            self.hosts.add(pod.host, self.stage_name(self.kind(pod)))

    def unpublish(self, pod: Service) -> None:
        if self.hosts is not None:
            self.hosts.remove(pod.host)

    def _service(self, name: str, args: list[str], port: int, host: str = "127.0.0.1") -> Service:
        return Service(name, args, port, free_port(), self.log_dir / f"{name}.log", host)

    def wait_ready(self, services: list[Service], timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not all(check(s.address, timeout=1, **self.probe_tls.get(self.kind(s), {})) for s in services):
            dead = [s for s in services if not s.alive()]
            if dead or time.monotonic() > deadline:
                reason = f"{dead[0].name} exited" if dead else "not ready in time"
                raise RuntimeError(f"{reason}; logs in {self.log_dir}")
            time.sleep(0.5)

    def by_name(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def start(self, timeout: float = 600) -> "Cluster":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for pod in self.services:
            if pod is not self.gateway:
                self.publish(pod)
        for service in self.services:
            service.start(env)
        try:
            self.wait_ready(self.services, timeout)
        except RuntimeError as error:
            self.stop()
            raise RuntimeError(f"cluster failed to start: {error}") from None
        return self

    def stop(self) -> dict[str, int | None]:
        # gateway first, so nothing new reaches the stages while they drain
        try:
            return {s.name: s.stop() for s in reversed(self.services)}
        finally:
            if self.hosts is not None:
                self.hosts.remove()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve planner, decoder and gateway on loopback.")
    parser.add_argument("model_dir")
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--ports", default="50050,50051,50052", help="gateway,planner,decoder")
    args = parser.parse_args()
    ports = tuple(int(p) for p in args.ports.split(","))
    cluster = Cluster(args.model_dir, engine=args.engine, ports=ports)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    print(f"starting planner ({args.engine}), decoder and gateway; logs in {cluster.log_dir}", flush=True)
    started = time.perf_counter()
    cluster.start()
    print(f"ready in {time.perf_counter() - started:.0f} s: gateway on {cluster.gateway.address} (Ctrl-C stops)",
          flush=True)  # fmt: skip
    while not stop and all(s.alive() for s in cluster.services):
        time.sleep(0.5)
    codes = cluster.stop()
    print("stopped:", ", ".join(f"{name} exit {code}" for name, code in codes.items()), flush=True)


if __name__ == "__main__":
    main()
