"""The three services as local processes on loopback: `make serve`, `make demo`, e2e tests, benchmarks.

python -m testkit.cluster MODEL_DIR [--engine vllm|transformers]   # serve until Ctrl-C / SIGTERM
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from servekit.healthcheck import check

REPO = Path(__file__).resolve().parent.parent
# The tiny model serves small images; these limits let it.
DEV_LIMITS = ["--min-side", "256", "--max-side", "1024"]


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
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, env: dict) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *self.args, "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

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
    services: list[Service] = field(default_factory=list)

    def __post_init__(self):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        gateway_port, planner_port, decoder_port = self.ports or (free_port(), free_port(), free_port())
        for i in range(self.planners):
            port = planner_port + i if self.ports else (planner_port if i == 0 else free_port())
            self.services.append(self._service(f"planner{i}", ["planner_service", "--model", self.model_dir,
                                                               "--engine", self.engine, *DEV_LIMITS], port))  # fmt: skip
        for i in range(self.decoders):
            port = decoder_port + i if self.ports else (decoder_port if i == 0 else free_port())
            self.services.append(self._service(f"decoder{i}", ["decoder_service", "--model", self.model_dir,
                                                               *DEV_LIMITS], port))  # fmt: skip
        targets = {kind: ",".join(s.address for s in self.services if s.name.startswith(kind))
                   for kind in ("planner", "decoder")}  # fmt: skip
        self.gateway = self._service("gateway", ["gateway", "--planner", targets["planner"], "--decoder",
                                                 targets["decoder"], *DEV_LIMITS, *self.gateway_args], gateway_port)  # fmt: skip
        self.services.append(self.gateway)

    def _service(self, name: str, args: list[str], port: int) -> Service:
        return Service(name, args, port, free_port(), self.log_dir / f"{name}.log")

    def by_name(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def start(self, timeout: float = 600) -> "Cluster":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for service in self.services:
            service.start(env)
        deadline = time.monotonic() + timeout
        while not all(check(s.address, timeout=1) for s in self.services):
            dead = [s for s in self.services if not s.alive()]
            if dead or time.monotonic() > deadline:
                self.stop()
                reason = f"{dead[0].name} exited" if dead else "not ready in time"
                raise RuntimeError(f"cluster failed to start: {reason}; logs in {self.log_dir}")
            time.sleep(0.5)
        return self

    def stop(self) -> dict[str, int | None]:
        # gateway first, so nothing new reaches the stages while they drain
        return {s.name: s.stop() for s in reversed(self.services)}

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
