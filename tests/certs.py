"""Certificates made for a test: a CA and the certificates it signs, and PEM files replaced the way
the kubelet updates a mounted Secret (which is how cert-manager's rotations arrive in a pod)."""

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# every certificate names loopback, where the tests dial
LOOPBACK = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


@dataclass(frozen=True)
class Issued:
    cert: bytes  # PEM
    key: bytes  # PEM (PKCS#8)
    serial: int


class CA:
    def __init__(self, name: str):
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            _builder(name, self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str) -> Issued:
        """A certificate valid for a server on loopback and for a client, as a stage's own certificate
        must be when its health probe shows it to the stage itself."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            _builder(name, self._name, key.public_key())
            .add_extension(x509.SubjectAlternativeName(LOOPBACK), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return Issued(certificate.public_bytes(serialization.Encoding.PEM), _pem_key(key), certificate.serial_number)


def write_secret(directory: Path, files: dict[str, bytes]) -> None:
    """Writes `files` into `directory` as the kubelet updates a Secret volume: the new set goes into a
    fresh folder, `..data` is switched to it by one rename, the old folder is removed, and each name
    is a symlink through `..data`."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..{time.time_ns()}"
    version.mkdir()
    for name, data in files.items():
        (version / name).write_bytes(data)
    data_link = directory / "..data"
    previous = os.readlink(data_link) if data_link.is_symlink() else None
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", data_link)
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    if previous:
        shutil.rmtree(directory / previous)


def peer_serial(address: str, ca_file: Path, cert_file: Path, key_file: Path) -> int:
    """The serial number of the certificate a TLS server presents to a new connection."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca_file))
    context.load_cert_chain(str(cert_file), str(key_file))
    context.set_alpn_protocols(["h2"])  # gRPC's servers speak HTTP/2 only
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number
