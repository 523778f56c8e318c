"""Container health check: exit 0 iff the service reports SERVING.

python -m servekit.healthcheck [--address 127.0.0.1:50051] [--service NAME] [--timeout 3]
                               [--tls-ca-file CA.pem --tls-server-name NAME
                                [--tls-cert-file CERT.pem --tls-key-file KEY.pem]]
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servekit.tls import channel_credentials, read_pem


def check(address: str, service: str = "", timeout: float = 3.0, ca_file: str = "", server_name: str = "",
          cert_file: str = "", key_file: str = "") -> bool:  # fmt: skip
    """With `cert_file` and `key_file`, shows that client certificate (a server with mutual TLS)."""
    if ca_file:
        credentials = channel_credentials(read_pem(cert_file, key_file, ca_file))
        # the probe dials 127.0.0.1, so name the certificate's host explicitly
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, credentials, options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
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
    parser.add_argument("--service", default="", help='health service name ("" = readiness, "liveness")')
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--tls-ca-file", default="", help="PEM CA bundle: check over TLS")
    parser.add_argument("--tls-server-name", default="", help="the name the server's certificate is issued to")
    parser.add_argument("--tls-cert-file", default="", help="PEM client certificate, for a server with mutual TLS")
    parser.add_argument("--tls-key-file", default="", help="PEM private key for --tls-cert-file")
    args = parser.parse_args()
    if bool(args.tls_cert_file) != bool(args.tls_key_file) or (args.tls_cert_file and not args.tls_ca_file):
        parser.error("--tls-cert-file and --tls-key-file go together, with --tls-ca-file")
    try:
        healthy = check(args.address, args.service, args.timeout, args.tls_ca_file, args.tls_server_name,
                        args.tls_cert_file, args.tls_key_file)  # fmt: skip
    except ValueError as error:  # unreadable or invalid TLS files
        parser.error(str(error))
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
