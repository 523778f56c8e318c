"""Stage targets and the pod addresses behind them.

A target is `host:port` or `dns:///host:port` (gRPC's spelling). A name that resolves to several
addresses (a Kubernetes headless Service lists every ready pod) is several replicas: the gateway
resolves it itself, with the system resolver (DNS, /etc/hosts), because gRPC Python does not show
the addresses its own resolver found, and per-pod health, load and failover need them.
"""

import asyncio
import ipaddress
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Target":
        spec = text.strip()
        for prefix in ("dns:///", "dns:"):
            if spec.startswith(prefix):
                spec = spec[len(prefix) :]
                break
        host, sep, port = spec.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a stage target is host:port or dns:///host:port, got {text!r}")
        return cls(host, int(port))

    @property
    def is_name(self) -> bool:
        """A DNS name (not an IP literal): TLS certificates are checked against it."""
        try:
            ipaddress.ip_address(self.host)
            return False
        except ValueError:
            return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def resolve(self) -> list[str]:
        """The gRPC channel targets of every address behind this target, sorted (OSError if none)."""
        infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        addresses = set()
        for family, _, _, _, sockaddr in infos:
            host, port = sockaddr[0], sockaddr[1]
            if not (isinstance(host, str) and isinstance(port, int)):
                continue  # (family, raw bytes): an IPv6 address to a Python built with --disable-ipv6
            if family == socket.AF_INET:
                addresses.add(f"ipv4:{host}:{port}")
            elif family == socket.AF_INET6:
                addresses.add(f"ipv6:[{host}]:{port}")
        return sorted(addresses)
