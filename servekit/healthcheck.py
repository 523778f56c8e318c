"""Container health check: exit 0 iff the service reports SERVING.

python -m servekit.healthcheck [--address 127.0.0.1:50051] [--service NAME] [--timeout 3]
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help='health service name ("" = overall readiness)')
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    sys.exit(0 if check(args.address, args.service, args.timeout) else 1)


if __name__ == "__main__":
    main()
