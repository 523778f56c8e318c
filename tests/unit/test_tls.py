"""TLS files: checked at start-up, re-read when they change, a half-written rotation skipped; the
gateway's stage channels replaced when its files change. (Real connections: tests/e2e/test_stage_tls.py.)"""

import asyncio
import logging

import pytest
from certs import CA, write_secret

from gateway.replicas import ReplicaPool
from gateway.settings import GatewaySettings
from glmimage.v1 import planner_pb2_grpc
from servekit.settings import ServerSettings
from servekit.tls import ChannelTLS, PemFiles, read_pem

pytestmark = pytest.mark.unit


@pytest.fixture
def secret(tmp_path):
    """A Secret folder with tls.crt, tls.key and ca.crt; returns (folder, CA, write(issued, ca_cert))."""
    ca = CA("test CA")
    folder = tmp_path / "tls"

    def write(issued, ca_cert=ca.cert):
        write_secret(folder, {"tls.crt": issued.cert, "tls.key": issued.key, "ca.crt": ca_cert})

    write(ca.issue("first"))
    return folder, ca, write


def paths(folder) -> tuple[str, str, str]:
    return str(folder / "tls.crt"), str(folder / "tls.key"), str(folder / "ca.crt")


def test_bad_files_name_the_problem(secret, tmp_path):
    folder, ca, _ = secret
    cert, key, ca_file = paths(folder)
    assert read_pem(cert, key, ca_file).ca == ca.cert
    with pytest.raises(ValueError, match="cannot read .*missing.pem"):
        read_pem(cert, key, str(tmp_path / "missing.pem"))
    (tmp_path / "other.key").write_bytes(ca.issue("other").key)
    with pytest.raises(ValueError, match="not a PEM certificate and its key.*KEY_VALUES_MISMATCH"):
        read_pem(cert, str(tmp_path / "other.key"))
    with pytest.raises(ValueError, match="not a PEM CA bundle"):
        read_pem(ca_file=key)


def test_changed_files_are_reloaded_and_a_half_written_rotation_is_skipped_with_one_warning(secret, caplog):
    folder, ca, write = secret
    files = PemFiles(*paths(folder))
    first = files.current
    write(ca.issue("first again"))  # the same names, a new certificate
    assert files.reload() and files.current != first
    second = files.current
    assert not files.reload()  # unchanged
    (folder / "..data" / "tls.crt").write_bytes(second.cert[: len(second.cert) // 2])  # rotation half-written
    with caplog.at_level(logging.WARNING, logger="servekit.tls"):
        assert not files.reload() and not files.reload()
    assert files.current == second
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keeping the previous ones" in warnings[0]
    third = ca.issue("third")
    write(third)
    assert files.reload() and files.current.cert == third.cert


def test_tls_settings_are_checked_at_start_up(secret, tmp_path):
    folder, ca, _ = secret
    cert, key, ca_file = paths(folder)
    ServerSettings(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca_file)
    with pytest.raises(ValueError, match="--tls-client-ca-file needs --tls-cert-file"):
        ServerSettings(tls_client_ca_file=ca_file)
    with pytest.raises(ValueError, match="not a PEM CA bundle"):
        ServerSettings(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=key)
    GatewaySettings(stage_tls_ca_file=ca_file, stage_tls_cert_file=cert, stage_tls_key_file=key)
    for wrong in ({"stage_tls_cert_file": cert, "stage_tls_key_file": key}, {"stage_tls_ca_file": ca_file,
                                                                             "stage_tls_cert_file": cert}):  # fmt: skip
        with pytest.raises(ValueError, match="--stage-tls-cert-file and --stage-tls-key-file go together"):
            GatewaySettings(**wrong)
    with pytest.raises(ValueError, match="--tls-client-ca-file cannot go with --http-port"):
        GatewaySettings(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca_file, http_port=8000)


def test_new_gateway_certificates_move_each_replica_to_a_new_channel(secret):
    """The old replica is retired: no new requests, closed once its last one ends."""
    folder, ca, write = secret
    cert, key, ca_file = paths(folder)

    async def scenario():
        tls = ChannelTLS(ca_file, cert, key)
        pool = ReplicaPool("decoder", ["127.0.0.1:1"], planner_pb2_grpc.PlannerServiceStub, tls, 1.0, 5.0)
        try:
            await pool._resolve()
            (old,) = pool.replicas.values()
            old.outstanding = 1  # a request still runs on it
            await pool._renew_channels()
            assert pool.replicas[old.address] is old  # files unchanged
            write(ca.issue("rotated"))
            await pool._renew_channels()
            new = pool.replicas[old.address]
            assert new is not old and new.channel is not old.channel and old.retired and old in pool._retired
            pool.release(old)
            await asyncio.sleep(0.01)
            assert old not in pool._retired  # closed
        finally:
            await pool.close()

    asyncio.run(scenario())
