"""The client without a registry: remote names, credential files, the bearer-token flow, retries,
pack indexes. A fake registry (httpx.MockTransport) answers as the distribution spec says."""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest

from veloverlay.errors import Reason, VeloError
from veloverlay.remote import Options, Registry, parse_remote
from veloverlay.remote.auth import find_credentials, parse_challenge
from veloverlay.remote.pack import PACK_HEADER, PackWriter, decode_index

DIG = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("localhost:5000/team/envs:py311", ("https", "localhost:5000", "team/envs", "py311", None)),
        ("http://127.0.0.1:5000/a/b", ("http", "127.0.0.1:5000", "a/b", None, None)),
        ("ghcr.io/org/env@" + DIG, ("https", "ghcr.io", "org/env", None, DIG)),
        ("ubuntu:22.04", ("https", "docker.io", "library/ubuntu", "22.04", None)),
        ("localhost/x", ("https", "localhost", "x", None, None)),
        ("python:3", ("https", "docker.io", "library/python", "3", None)),
        ("team/envs", ("https", "docker.io", "team/envs", None, None)),
    ],
)  # fmt: skip
def test_parse_remote(text: str, want: tuple[str, str, str, str | None, str | None]) -> None:
    r = parse_remote(text)
    assert (r.scheme, r.host, r.repo, r.tag, r.digest) == want


@pytest.mark.parametrize(
    "text", ["localhost:5000/Team/x", "localhost:5000/x:-bad", "h.io/x@sha256:12", "h.io/a//b", ""]
)
def test_parse_remote_refuses(text: str) -> None:
    with pytest.raises(VeloError) as ei:
        parse_remote(text)
    assert ei.value.reason is Reason.BAD_NAME


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("http://registry/team/envs:t", ("http", "registry", "team/envs", "t")),
        ("https://registry/team:t", ("https", "registry", "team", "t")),
        ("http://127.0.0.1:5000", None),
        ("https://ghcr.io", None),
        ("http://registry", None),
        ("localhost:5000", None),
        ("registry.example.com", None),
        ("127.0.0.1:5000", None),
        ("ghcr.io:v1", None),
    ],
)  # fmt: skip
def test_a_remote_that_says_its_scheme_names_its_registry_never_docker_hub(
    text: str, want: tuple[str, str, str, str] | None
) -> None:
    """`http://HOST/...` is the registry HOST without TLS (docs/remote.md, README). A HOST
    without a dot or a port (a host name on the local network) used to make the name Docker
    Hub's repository `HOST/...`, reached at http://registry-1.docker.io with Docker Hub's
    credentials in clear; `http://HOST:PORT` alone was `library/HOST` tagged PORT there. Such
    a name means HOST now, and one without a repository is refused; so is a registry alone
    without a scheme (`localhost:5000`, `registry.example.com`), which went to Docker Hub."""
    if want is None:
        with pytest.raises(VeloError) as ei:
            parse_remote(text)
        assert ei.value.reason is Reason.BAD_NAME
        assert "no repository" in ei.value.message
        return
    r = parse_remote(text)
    assert (r.scheme, r.host, r.repo, r.tag) == want
    assert r.base_url == f"{want[0]}://{want[1]}"


@pytest.mark.parametrize(
    "text",
    [
        "https://bob:hunter2@h.io/team/env:v1",
        "bob:hunter2@h.io:5000/team/env",
        "http://bob:hunter2@h.io/x@sha256:12",
        "bob:hunter2@h.io",
    ],
)
def test_a_password_in_a_remote_name_is_not_shown(text: str) -> None:
    """A URL pasted with its user:password is refused, and the error does not repeat it."""
    with pytest.raises(VeloError) as ei:
        parse_remote(text)
    assert ei.value.reason is Reason.BAD_NAME
    assert "hunter2" not in str(ei.value.as_dict()), ei.value.as_dict()


def test_credentials_from_files(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = str(tmp_path)
    for var in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.setenv(var, os.path.join(d, var))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    assert find_credentials("h.io", "a/b") is None
    os.makedirs(os.path.join(d, "DOCKER_CONFIG"))
    docker = os.path.join(d, "DOCKER_CONFIG", "config.json")
    with open(docker, "w") as f:
        json.dump({"auths": {"https://h.io/v1/": {"auth": base64.b64encode(b"u1:p1").decode()}}}, f)
    c = find_credentials("h.io", "a/b")
    assert c is not None and (c.username, c.secret, c.source) == ("u1", "p1", docker)
    assert "p1" not in repr(c)
    # podman's file comes first, and a repository-specific key beats the registry's
    os.makedirs(os.path.join(d, "XDG_RUNTIME_DIR", "containers"))
    podman = os.path.join(d, "XDG_RUNTIME_DIR", "containers", "auth.json")
    with open(podman, "w") as f:
        u3 = base64.b64encode(b"u3:p3").decode()
        json.dump(
            {"auths": {"h.io": {"username": "u2", "password": "p2"}, "h.io/a": {"auth": u3}}}, f
        )
    c = find_credentials("h.io", "a/b")
    assert c is not None and c.username == "u3"
    c = find_credentials("h.io", "z")
    assert c is not None and c.username == "u2"
    with open(podman, "w") as f:
        f.write("{not json")
    with pytest.raises(VeloError) as ei:
        find_credentials("h.io", "z")
    assert ei.value.reason is Reason.REMOTE_AUTH and podman in ei.value.message


def test_parse_challenge() -> None:
    s, p = parse_challenge('Bearer realm="https://a/token",service="reg",scope="repository:x:pull"')
    assert s == "bearer" and p == {
        "realm": "https://a/token",
        "service": "reg",
        "scope": "repository:x:pull",
    }


class FakeTokenRegistry:
    """Registry with token auth: /v2/* needs `Bearer good-token`; /token wants u:p."""

    def __init__(self, fail_first: int = 0, reset_first: int = 0) -> None:
        self.token_requests: list[httpx.Request] = []
        self.fail_first = fail_first
        self.reset_first = reset_first
        self.seen = 0

    def __call__(self, req: httpx.Request) -> httpx.Response:
        if req.url.path == "/token":
            self.token_requests.append(req)
            if req.headers.get("authorization") != "Basic " + base64.b64encode(b"u:p").decode():
                return httpx.Response(401)
            return httpx.Response(200, json={"token": "good-token"})
        if req.headers.get("authorization") != "Bearer good-token":
            return httpx.Response(
                401,
                headers={
                    "WWW-Authenticate": 'Bearer realm="https://reg.test/token",service="reg.test",'
                    'scope="repository:team/x:pull"'
                },
            )
        self.seen += 1
        if self.seen <= self.reset_first:
            raise httpx.ReadError("connection reset by peer", request=req)
        if self.seen <= self.reset_first + self.fail_first:
            return httpx.Response(503)
        return httpx.Response(200, content=b"{}", headers={"Content-Type": "x"})


def _client(fake: FakeTokenRegistry, user: str = "u", pw: str = "p") -> Registry:
    from veloverlay.remote.auth import Credentials

    opts = Options(credentials=Credentials(user, pw, "test"), backoff=0.0, retries=3)
    return Registry(parse_remote("reg.test/team/x:t"), opts, transport=httpx.MockTransport(fake))


def test_bearer_flow() -> None:
    fake = FakeTokenRegistry()
    with _client(fake) as c:
        body, _d, _t = c.get_manifest("t")
        assert body == b"{}" and c.auth_scheme == "bearer"
        c.get_manifest("t")  # the token is reused
    assert len(fake.token_requests) == 1
    q = fake.token_requests[0].url.params
    assert q.get("service") == "reg.test" and q.get_list("scope") == ["repository:team/x:pull"]


class FakeOAuthRegistry(FakeTokenRegistry):
    """The same registry whose token service takes only an OAuth2 refresh token, by POST."""

    def __call__(self, req: httpx.Request) -> httpx.Response:
        if req.url.path != "/token":
            return super().__call__(req)
        self.token_requests.append(req)
        form = urllib.parse.parse_qs(req.content.decode())
        if req.method != "POST" or "authorization" in req.headers:
            return httpx.Response(401)
        if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != ["idt"]:
            return httpx.Response(401)
        if form.get("service") != ["reg.test"] or not form.get("client_id"):
            return httpx.Response(400)
        assert form.get("scope") == ["repository:team/x:pull"]
        return httpx.Response(200, json={"access_token": "good-token"})


def test_an_identity_token_is_traded_by_the_oauth2_post() -> None:
    """`docker login` to an OAuth2 registry (Azure's, Harbor with OIDC) keeps an identity token:
    a refresh token for the token service. It was sent as the password of a Basic GET, which
    such a service refuses, so every pull and push with those credentials failed."""
    from veloverlay.remote.auth import Credentials

    fake = FakeOAuthRegistry()
    creds = Credentials("<token>", "idt", "test", identity_token=True)
    opts = Options(credentials=creds, backoff=0.0, retries=0)
    transport = httpx.MockTransport(fake)
    with Registry(parse_remote("reg.test/team/x:t"), opts, transport=transport) as c:
        body, _d, _t = c.get_manifest("t")
    assert body == b"{}" and len(fake.token_requests) == 1
    assert fake.token_requests[0].method == "POST"


def test_bearer_refused() -> None:
    with _client(FakeTokenRegistry(), pw="bad") as c, pytest.raises(VeloError) as ei:
        c.get_manifest("t")
    assert ei.value.reason is Reason.REMOTE_AUTH and "'u'" in ei.value.message


def test_retries_on_5xx_and_resets() -> None:
    fake = FakeTokenRegistry(fail_first=2, reset_first=1)
    with _client(fake) as c:
        c.get_manifest("t")
        assert c.retried == 3
    fake = FakeTokenRegistry(fail_first=10)
    with _client(fake) as c, pytest.raises(VeloError) as ei:
        c.get_manifest("t")
    assert ei.value.reason is Reason.REMOTE_ERROR and "503" in (ei.value.detail or "")


def test_pack_index_round_trip_and_checks() -> None:
    w = PackWriter(1)
    w.add(b"\x02" * 32, b"bb")
    w.add(b"\x01" * 32, b"a")
    pack, index = w.finish()
    entries = decode_index(index, len(pack))
    assert [(e.digest[0], pack[e.offset : e.offset + e.length]) for e in entries] == [
        (1, b"a"),
        (2, b"bb"),
    ]
    assert pack.startswith(PACK_HEADER)
    with pytest.raises(VeloError):
        decode_index(index, len(pack) - 1)  # an entry past the end
    rec = struct.Struct("<B32sQQ")
    bad = index[:16] + rec.pack(1, b"\x01" * 32, 12, 2) + rec.pack(1, b"\x02" * 32, 13, 1)
    with pytest.raises(VeloError) as ei:
        decode_index(bad, 100)
    assert ei.value.reason is Reason.REMOTE_INVALID and "overlap" in ei.value.message


def test_a_blob_longer_than_named_is_not_followed() -> None:
    from veloverlay.remote.fetch import BlobReader
    from veloverlay.remote.progress import Meter

    def endless() -> Iterator[bytes]:
        while True:
            yield b"x" * 1000

    rd = BlobReader(endless(), Meter("pull", 0, 0, None))
    assert rd.exact(10) == b"x" * 10
    with pytest.raises(VeloError) as ei:
        rd.drain(5000)
    assert ei.value.reason is Reason.REMOTE_INVALID and rd.pos <= 6000


class _Taker(httpx.BaseTransport):
    """Starts uploads and takes their bodies a chunk at a time, `pause` seconds per chunk."""

    def __init__(self, pause: float) -> None:
        self.pause, self.taken, self.puts, self.biggest = pause, 0, 0, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/team/x/blobs/uploads/u1"})
        if request.method == "PUT":
            self.puts += 1
            for chunk in request.stream:  # type: ignore[union-attr]
                self.taken += len(chunk)
                self.biggest = max(self.biggest, len(chunk))
                if self.pause:
                    time.sleep(self.pause)
            return httpx.Response(201)
        return httpx.Response(404)


@pytest.mark.parametrize("given", ["bytes", "chunks"])
def test_an_upload_the_registry_takes_too_slowly_is_cut(given: str) -> None:
    # The write timeout starts again with every byte sent: a registry taking a body at a drip
    # would hold a push as long as it likes. Below low_speed_limit over low_speed_time the
    # upload is cut (and retried as any transport error), whole blobs and streams alike.
    data = os.urandom(4 << 20)

    def content() -> object:
        return (
            data
            if given == "bytes"
            else iter([data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)])
        )

    opts = Options(retries=1, backoff=0.0, low_speed_limit=50 << 20, low_speed_time=0.2)
    slow = _Taker(0.05)
    with (
        Registry(parse_remote("reg.test/team/x:t"), opts, transport=slow) as c,
        pytest.raises(VeloError) as ei,
    ):
        c.upload_blob(DIG, len(data), content)
    assert ei.value.reason is Reason.REMOTE_UNREACHABLE
    assert "takes uploads too slowly" in ei.value.message and "were sent" in ei.value.message
    assert slow.puts == 2 and slow.taken < 2 * len(data)  # cut twice (one retry), never whole
    fast = _Taker(0.0)
    with Registry(parse_remote("reg.test/team/x:t"), opts, transport=fast) as c:
        c.upload_blob(DIG, len(data), content)
    assert fast.puts == 1 and fast.taken == len(data)
    # the pace is checked between pieces: none is bigger than the bound says
    assert 0 < slow.biggest <= 64 << 10 and fast.biggest <= 64 << 10


def test_docker_hub_credentials_under_its_other_names(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker login` stores Docker Hub's credentials under https://index.docker.io/v1/ (in the
    file or in a helper); config files also name it index.docker.io or registry-1.docker.io."""
    d = str(tmp_path)
    helper = os.path.join(d, "docker-credential-fake")
    with open(helper, "w") as f:  # answers for Docker's key for the Hub only
        f.write(
            "#!/bin/sh\nread s\n"
            'if [ "$s" = "https://index.docker.io/v1/" ]; then\n'
            '  echo \'{"Username":"hubuser","Secret":"hubpw"}\'; exit 0\nfi\n'
            "echo 'credentials not found in native keychain'; exit 1\n"
        )
    os.chmod(helper, 0o755)
    monkeypatch.setenv("PATH", d + os.pathsep + os.environ.get("PATH", ""))
    for var in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(var, os.path.join(d, var))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", d)
    conf = os.path.join(d, "config.json")
    for data in (
        {"auths": {"https://index.docker.io/v1/": {}}, "credsStore": "fake"},
        {"credHelpers": {"index.docker.io": "fake"}},
        {"credHelpers": {"https://index.docker.io/v1/": "fake"}},
    ):
        with open(conf, "w") as f:
            json.dump(data, f)
        c = find_credentials("docker.io", "library/ubuntu")
        assert c is not None and (c.username, c.secret) == ("hubuser", "hubpw"), data
    u = base64.b64encode(b"u:p").decode()
    for key in ("index.docker.io", "registry-1.docker.io/team"):
        with open(conf, "w") as f:
            json.dump({"auths": {key: {"auth": u}}}, f)
        c = find_credentials("docker.io", "team/env")
        assert c is not None and c.username == "u", key
    with open(conf, "w") as f:  # a repository path is kept: not another repository's
        json.dump({"auths": {"registry-1.docker.io/team": {"auth": u}}}, f)
    assert find_credentials("docker.io", "other/env") is None


def test_credentials_nested_past_the_parser_are_an_auth_error(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credentials file, or a credential helper's answer, nested deeper than the JSON parser
    goes ended the pull in a RecursionError traceback."""
    d = str(tmp_path)
    deep = "[" * 100_000 + "]" * 100_000
    conf = os.path.join(d, "auth.json")
    with open(conf, "w") as f:
        f.write(deep)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", conf)
    with pytest.raises(VeloError) as ei:
        find_credentials("h.io", "a")
    assert ei.value.reason is Reason.REMOTE_AUTH and conf in ei.value.message
    helper = os.path.join(d, "docker-credential-deep")
    with open(os.path.join(d, "answer"), "w") as f:
        f.write(deep)
    with open(helper, "w") as f:
        f.write(f"#!/bin/sh\ncat {d}/answer\n")
    os.chmod(helper, 0o755)
    monkeypatch.setenv("PATH", d + os.pathsep + os.environ.get("PATH", ""))
    with open(conf, "w") as f:
        json.dump({"credsStore": "deep"}, f)
    with pytest.raises(VeloError) as ei:
        find_credentials("h.io", "a")
    assert ei.value.reason is Reason.REMOTE_AUTH and "docker-credential-deep" in ei.value.message
