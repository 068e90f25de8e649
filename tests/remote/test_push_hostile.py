"""A push to a registry that lies (tests/remote/fake_registry.py): what the registry says it
stored is held to what was sent, and the tag is not moved, nor noted, on a lie."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers.trees import make_tree
from tests.remote.fake_registry import FakeRegistry, Handler, sha
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.remote import Options, push
from veloverlay.remote.state import Versions
from veloverlay.verbs.repo import Repo

OPTS = Options(retries=0, timeout=10, backoff=0.01)


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    f = FakeRegistry()
    yield f
    f.close()


def _env(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a.txt": b"a\n", "d/b.txt": b"b\n" * 100, "big": os.urandom(1 << 20)})
    ingest(repo.store, repo.m, src, "env", jobs=1)


def _says(target: str, what: str) -> object:
    """A hook answering PUTs of `target` ("blob"/"manifest") with the digest of other bytes."""

    def hook(h: Handler, method: str) -> bool:
        is_manifest = "/manifests/" in h.path
        if method != "PUT" or is_manifest != (target == "manifest"):
            return False
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        h.send(201, headers={"Docker-Content-Digest": sha(body + b"x")})
        return True

    return hook


@pytest.mark.parametrize("target", ["blob", "manifest"])
def test_a_registry_that_names_other_bytes_is_not_believed(
    fake: FakeRegistry, repo: Repo, shm_tmp: str, target: str
) -> None:
    _env(repo, shm_tmp)
    fake.hook = _says(target, target)  # type: ignore[assignment]
    with pytest.raises(VeloError) as ei:
        push(repo.store, repo.m, ["env"], fake.remote("v1"), options=OPTS)
    assert ei.value.reason is Reason.REMOTE_INVALID, ei.value
    assert Versions(repo.store).load() == {}  # no digest noted that the registry does not hold
    if target == "blob":  # the tag was not moved: no manifest was sent
        assert not [p for m, p, _a in fake.seen if m == "PUT" and "/manifests/" in p]


def test_a_plain_http_registry_is_reached_through_the_environments_proxy(
    fake: FakeRegistry, repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for an https registry (and as curl, podman): HTTP_PROXY is honoured for http://
    registries too, NO_PROXY exempts one. The fake stands for the proxy, serving the registry."""
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://{fake.host}")
    prefix = "http://registry.invalid:5000"

    def as_proxy(h: Handler, method: str) -> bool:
        if not h.path.startswith(prefix + "/"):
            h.send(502)
            return True
        h.path = h.path[len(prefix) :]  # served as the registry would
        return False

    fake.hook = as_proxy
    _env(repo, shm_tmp)
    [res] = push(repo.store, repo.m, ["env"], f"{prefix}/team/env:v1", options=OPTS)
    assert fake.manifests["v1"] and res.digest == sha(fake.manifests["v1"])
    monkeypatch.setenv("NO_PROXY", "registry.invalid")
    with pytest.raises(VeloError) as ei:  # not through the proxy: the name does not resolve
        push(repo.store, repo.m, ["env"], f"{prefix}/team/env:v2", options=OPTS)
    assert ei.value.reason is Reason.REMOTE_UNREACHABLE, ei.value
