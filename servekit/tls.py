"""TLS from PEM files that are replaced while the process runs (cert-manager rotates a mounted
Secret in place, by swapping a symlink): servers and clients use the new files for new connections;
connections already open keep the certificates they were made with.

Files are compared by content, not modification time: a rewrite within the file system's timestamp
granularity, or a symlink swap to files with old timestamps, still counts. They are small and read
only on a new handshake (servers) or a periodic check (the gateway).
"""

import logging
import ssl
from pathlib import Path
from typing import NamedTuple

import grpc

logger = logging.getLogger(__name__)


class Pem(NamedTuple):
    """A certificate chain with its private key, and/or a CA bundle ("" paths read as None)."""

    cert: bytes | None
    key: bytes | None
    ca: bytes | None


def _read(paths: tuple[str, ...]) -> tuple[bytes | None, ...]:
    return tuple(Path(path).read_bytes() if path else None for path in paths)


def _check(cert_file: str, key_file: str, ca_file: str) -> None:
    """Raises ValueError unless the files parse and the key belongs to the certificate (what grpc
    would otherwise find only at the next handshake, failing it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file, password=b"")  # password: fail, never prompt
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"{cert_file} with {key_file}: not a PEM certificate and its key ({error})") from None
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"{ca_file}: not a PEM CA bundle ({error})") from None


def read_pem(cert_file: str = "", key_file: str = "", ca_file: str = "") -> Pem:
    """Reads and checks the files as one set; raises ValueError naming what is wrong, also when they
    changed while being read (half of a rotation)."""
    paths = (cert_file, key_file, ca_file)
    try:
        contents = _read(paths)
    except OSError as error:
        raise ValueError(f"cannot read {error.filename}: {error.strerror}") from None
    _check(*paths)
    if _read(paths) != contents:
        raise ValueError(f"{', '.join(p for p in paths if p)} changed while being read")
    return Pem(*contents)


class PemFiles:
    """A set of PEM files that may be replaced: `current` is the last complete, valid set read."""

    def __init__(self, cert_file: str = "", key_file: str = "", ca_file: str = ""):
        self._paths = (cert_file, key_file, ca_file)
        self.current = read_pem(*self._paths)  # at start-up, bad files are an error
        self._skipped: tuple | None = None  # contents found invalid: warned about once

    def reload(self) -> bool:
        """True when the files now hold a different valid set (then in `current`). A set that does
        not parse or match, as while a rotation is half-written, is skipped with one warning: the
        previous set stays in use until the files change again."""
        try:
            contents = _read(self._paths)
        except OSError:
            contents = None  # a symlink being swapped: try again next time
        if contents in (None, self.current, self._skipped):
            return False
        try:
            fresh = read_pem(*self._paths)
        except ValueError as error:
            self._skipped = contents
            logger.warning("TLS files changed but cannot be used yet, keeping the previous ones: %s", error)
            return False
        self.current = fresh
        logger.info("TLS files reloaded: %s", ", ".join(p for p in self._paths if p))
        return True


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """A server certificate, and with `client_ca_file` required client certificates verified against
    it. grpc asks for the configuration at each new handshake; it gets a new one only when the files
    changed, so a rotation needs no restart and open connections are left alone."""
    files = PemFiles(cert_file, key_file, client_ca_file)

    def configuration() -> grpc.ServerCertificateConfiguration:
        pem = files.current
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], root_certificates=pem.ca)

    return grpc.dynamic_ssl_server_credentials(
        configuration(), lambda: configuration() if files.reload() else None, bool(client_ca_file)
    )


def channel_credentials(pem: Pem) -> grpc.ChannelCredentials:
    """Verifies servers against `pem.ca`; shows `pem.cert` to them when there is one."""
    return grpc.ssl_channel_credentials(root_certificates=pem.ca, private_key=pem.key, certificate_chain=pem.cert)


class ChannelTLS:
    """Client TLS from files. grpc's channel credentials are fixed once made, so `refresh()` makes
    new ones when the files change and counts them in `generation`: channels made before are
    outdated, and their owner replaces them."""

    def __init__(self, ca_file: str, cert_file: str = "", key_file: str = ""):
        self._files = PemFiles(cert_file, key_file, ca_file)
        self.credentials = channel_credentials(self._files.current)
        self.generation = 0

    def refresh(self) -> None:
        if self._files.reload():
            self.credentials = channel_credentials(self._files.current)
            self.generation += 1
