"""Where a registry may send a request on to. A registry on the internet that redirects a blob
GET (or names an upload Location, a Link, a token realm) to a loopback, link-local or private
address would make this machine fetch from its own network on the registry's behalf (blind
SSRF: the cloud metadata service on 169.254.169.254, a service on 127.0.0.1). Such a request is
refused before it is made (remote-redirect), unless the registry itself is on an address of
that kind (tests/remote/test_hostile_registry.py: a registry on loopback redirecting to
another loopback port). Credentials never follow to another origin: test_hostile_registry.py.
The registry here is a public address served by an httpx mock transport: nothing leaves it."""

from __future__ import annotations

import hashlib
import http.server
from typing import Any

import httpx
import pytest

from tests.remote.fake_registry import FakeRegistry
from veloverlay.errors import Reason, VeloError
from veloverlay.remote.client import Options, Registry
from veloverlay.remote.name import parse_remote

BLOB = b"blob bytes\n"
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
PUBLIC = "93.184.215.14"  # a global unicast address (never contacted: mock transport)


def _registry(target: str, seen: list[str]) -> Registry:
    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.host)
        if req.url.host == PUBLIC:
            return httpx.Response(307, headers={"Location": f"{target}/cdn/{DIGEST}"})
        return httpx.Response(200, content=BLOB)

    opts = Options(retries=0, timeout=5, backoff=0.01)
    return Registry(parse_remote(f"{PUBLIC}/team/x:t"), opts, transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254",
        "http://127.0.0.1:8080",
        "http://localhost",
        "http://10.0.0.7",
        "http://192.168.1.1",
        "http://[::1]",
        "http://[fe80::1]",
        "http://[::ffff:169.254.169.254]",
    ],
)
def test_a_public_registry_cannot_send_a_blob_get_inside(target: str) -> None:
    seen: list[str] = []
    with _registry(target, seen) as reg, pytest.raises(VeloError) as ei:
        reg.get_blob(DIGEST, len(BLOB))
    assert ei.value.reason is Reason.REMOTE_REDIRECT, ei.value
    assert ei.value.hint
    assert seen == [PUBLIC]  # the inner address was never asked


def test_a_public_registry_may_send_a_blob_get_to_a_public_cdn() -> None:
    seen: list[str] = []
    with _registry("https://151.101.1.1", seen) as reg:
        assert reg.get_blob(DIGEST, len(BLOB)) == BLOB
    assert seen == [PUBLIC, "151.101.1.1"]


def test_address_kinds_follow_the_address_ranges() -> None:
    import ipaddress

    from veloverlay.remote.transport import address_kinds

    for host, kind in [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("100.64.0.1", "private"),
        ("fd00::1", "private"),
        (PUBLIC, "public"),
    ]:
        ip = ipaddress.ip_address(host)
        assert ip.is_global == (kind == "public")  # the stdlib's own classification
        assert address_kinds(host) == {kind}, host


def test_a_loopback_registry_may_send_on_to_loopback(fake: FakeRegistry) -> None:
    """The registry on 127.0.0.1 (as a local registry in front of local storage): allowed."""
    other = FakeRegistry()
    try:

        def front(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
            if "/blobs/" in h.path:
                h.send(307, headers={"Location": f"http://{other.host}/cdn"})  # type: ignore[attr-defined]
                return True
            return False

        def cdn(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
            h.send(200, BLOB)  # type: ignore[attr-defined]
            return True

        fake.hook, other.hook = front, cdn
        opts = Options(retries=0, timeout=5, backoff=0.01)
        with Registry(parse_remote(fake.remote()), opts) as reg:
            assert reg.get_blob(DIGEST, len(BLOB)) == BLOB
    finally:
        other.close()


def _rebinding(
    monkeypatch: pytest.MonkeyPatch, fake: FakeRegistry, other: FakeRegistry, answers: list[str]
) -> tuple[Registry, list[str]]:
    """A registry named registry.example (public, says the resolver stub) on `fake`, whose blob
    GETs redirect to cdn.example on `other`; cdn.example resolves to `answers` in turn (the last
    one from then on). Every connection is really made to 127.0.0.1 (the fakes) whatever host
    it was asked for, which is recorded."""
    import socket

    import httpcore

    real_resolve = socket.getaddrinfo
    real_connect = httpcore.SyncBackend.connect_tcp
    asked: list[str] = []
    left = list(answers)

    def resolve(host: Any, port: Any, *a: Any, **kw: Any) -> Any:
        if host == "registry.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port or 0))]
        if host == "cdn.example":
            addr = left.pop(0) if len(left) > 1 else left[0]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port or 0))]
        return real_resolve(host, port, *a, **kw)

    def connect(self: Any, host: str, port: int, *a: Any, **kw: Any) -> Any:
        asked.append(host)
        return real_connect(self, "127.0.0.1", port, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect)

    def front(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if "/blobs/" in h.path:
            h.send(307, headers={"Location": f"http://cdn.example:{other.port}/cdn"})  # type: ignore[attr-defined]
            return True
        return False

    def cdn(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        h.send(200, BLOB)  # type: ignore[attr-defined]
        return True

    fake.hook, other.hook = front, cdn
    opts = Options(retries=0, timeout=5, backoff=0.01)
    return Registry(parse_remote(f"http://registry.example:{fake.port}/team/x:t"), opts), asked


def test_a_name_that_rebinds_to_loopback_after_the_check(
    fake: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Public when the redirect is checked, loopback when the connection resolves it again:
    refused at the connection, which goes to the address it checked or nowhere."""
    other = FakeRegistry()
    try:
        reg, asked = _rebinding(monkeypatch, fake, other, [PUBLIC, "127.0.0.1"])
        with reg, pytest.raises(VeloError) as ei:
            reg.get_blob(DIGEST, len(BLOB))
        assert ei.value.reason is Reason.REMOTE_REDIRECT, ei.value
        assert "cdn.example" in ei.value.message and "loopback" in ei.value.message
        assert other.seen == []  # the loopback service was never asked
        assert "cdn.example" not in asked
    finally:
        other.close()


def test_a_connection_goes_to_the_address_that_was_checked(
    fake: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = FakeRegistry()
    try:
        reg, asked = _rebinding(monkeypatch, fake, other, ["151.101.1.1"])
        with reg:
            assert reg.get_blob(DIGEST, len(BLOB)) == BLOB
        assert asked == ["registry.example", "151.101.1.1"]  # by address, not by name again
        assert len(other.seen) == 1
    finally:
        other.close()
