"""API keys file and per-key limits (gateway.auth), without a server."""

import hashlib
import os

import grpc
import pytest

from gateway import auth
from gateway.auth import ApiKeys, Gatekeeper, KeyLimits, RateLimited, Unauthenticated, parse_keys

pytestmark = pytest.mark.unit


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_keys_file_format():
    text = f"# team keys\nsha256:{digest('a')} team-a\n\n  sha256:{digest('b')}   # no name\n"
    assert parse_keys(text, "keys") == {digest("a"): "team-a", digest("b"): f"sha256:{digest('b')[:8]}"}
    for bad, line in [("sk-plain-key", 1), (f"# ok\nsha256:{digest('a')[:60]} short", 2),
                      (f"sha256:{digest('a').upper()}", 1), (f"sha256:{digest('a')}\nsha256:{digest('a')} x", 2)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"keys:{line}: "):
            parse_keys(bad, "keys")


def test_keys_are_checked_and_the_file_is_re_read_when_it_changes(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"sha256:{digest('key-a')} a\nsha256:{digest('key-b')} b\n")
    keys = ApiKeys(str(path))
    assert keys.name_of("Bearer key-a") == "a" and keys.name_of("bearer  key-b ") == "b"
    for header, message in [(None, "an API key is required"), ("Basic key-a", "an API key is required"),
                            ("Bearer ", "an API key is required"), ("Bearer key-c", "not valid")]:  # fmt: skip
        with pytest.raises(Unauthenticated, match=message) as caught:
            keys.name_of(header)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    # revoke b, add c: a replaced file (as a Secret update swaps it) is read on the next call
    replacement = tmp_path / "keys.new"
    replacement.write_text(f"sha256:{digest('key-a')} a\nsha256:{digest('key-c')} c\n")
    os.replace(replacement, path)
    assert keys.name_of("Bearer key-c") == "c"
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        keys.name_of("Bearer key-b")
    # a broken or missing file keeps the keys last read
    path.write_text("not a key line\n")
    assert keys.name_of("Bearer key-a") == "a"
    path.unlink()
    assert keys.name_of("Bearer key-a") == "a"
    with pytest.raises(Unauthenticated):
        keys.name_of("Bearer key-b")


def test_a_bad_keys_file_stops_the_gateway_at_start(tmp_path):
    with pytest.raises(ValueError, match="No such file"):
        ApiKeys(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("# nobody yet\n")
    with pytest.raises(ValueError, match="lists no key"):
        ApiKeys(str(tmp_path / "empty"))


def test_requests_per_minute_refill_and_say_when_to_retry(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    limits = KeyLimits(requests_per_minute=3, max_in_flight=0)
    for _ in range(3):
        with limits.hold("a"):
            pass
    with pytest.raises(RateLimited, match="3 requests a minute") as caught:
        with limits.hold("a"):
            pass
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_after_s == pytest.approx(20.0)  # one request every 20 s
    with limits.hold("b"):  # each key has its own budget
        pass
    now[0] += 20
    with limits.hold("a"):
        pass


def test_requests_in_flight_per_key():
    limits = KeyLimits(requests_per_minute=0, max_in_flight=2)
    with limits.hold("a"), limits.hold("a"):
        with pytest.raises(RateLimited, match="2 requests in flight"), limits.hold("a"):
            pass
        with limits.hold("b"):
            pass
    with limits.hold("a"):  # released when the requests ended
        pass


def test_an_open_gateway_names_every_caller_anonymous():
    gatekeeper = Gatekeeper(None, KeyLimits(0, 0))
    assert gatekeeper.authenticate(None) == gatekeeper.authenticate("Bearer anything") == auth.ANONYMOUS
