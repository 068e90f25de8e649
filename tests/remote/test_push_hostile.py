"""A push to a registry that lies (tests/remote/fake_registry.py): what the registry says it
stored is held to what was sent, and the tag is not moved, nor noted, on a lie."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from tests.helpers.trees import assert_same_tree, make_tree
from tests.remote.fake_registry import FakeRegistry, Handler, sha
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.remote import Options, pull, push
from veloverlay.remote.state import Versions
from veloverlay.verbs.repo import Repo

OPTS = Options(retries=0, timeout=10, backoff=0.01)


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
    registries too, NO_PROXY exempts one, and loopback is never proxied. The fake stands for the
    proxy, serving the registry."""
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
    monkeypatch.delenv("NO_PROXY")
    fake.hook = None  # a registry on loopback is reached directly, as by podman and skopeo
    push(repo.store, repo.m, ["env"], f"http://{fake.host}/team/env:v3", options=OPTS)
    assert not [p for _m, p, _a in fake.seen if p.startswith("http://127.")], fake.seen


def test_blobs_the_registry_lost_are_uploaded_again(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    """The tag's version names packs and a large object the registry no longer holds: it refuses
    a manifest naming them (MANIFEST_BLOB_UNKNOWN, as distribution does), and the push checks
    what it would have listed again and uploads what is missing, instead of failing for good."""
    _env(repo, shm_tmp)
    push(repo.store, repo.m, ["env"], fake.remote("v"), options=OPTS)
    first = json.loads(fake.manifests["v"])
    lost = {x["digest"] for x in first["layers"]}
    for d in lost:
        del fake.blobs[d]
    with open(os.path.join(shm_tmp, "src", "a.txt"), "wb") as f:
        f.write(b"changed\n")
    ingest(repo.store, repo.m, os.path.join(shm_tmp, "src"), "env", jobs=1)
    [res] = push(repo.store, repo.m, ["env"], fake.remote("v"), options=OPTS)
    second = json.loads(fake.manifests["v"])
    assert res.digest == sha(fake.manifests["v"])
    assert all(x["digest"] in fake.blobs for x in second["layers"])
    other = Repo.open(os.path.join(shm_tmp, "other"), create=True)
    try:
        pull(other.store, other.m, fake.remote("v"), options=OPTS)
        out = os.path.join(shm_tmp, "out")
        other.checkout("env", out)
        assert_same_tree(os.path.join(shm_tmp, "src"), out)
    finally:
        other.close()


def test_a_mount_answered_for_a_blob_the_registry_lacks_is_uploaded(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    """A push to another repository mounts the blobs of the version this store last pushed; a
    registry answering 201 for blobs it lost gets them uploaded, not a manifest naming them."""
    _env(repo, shm_tmp)
    push(repo.store, repo.m, ["env"], fake.remote("v"), options=OPTS)
    for x in json.loads(fake.manifests["v"])["layers"]:
        del fake.blobs[x["digest"]]

    def lying_mount(h: Handler, method: str) -> bool:
        if method == "POST" and "mount=" in h.path:
            h.send(201)
            return True
        return False

    fake.hook = lying_mount
    other = f"http://{fake.host}/team/other:v"
    [res] = push(repo.store, repo.m, ["env"], other, options=OPTS)
    assert all(x["digest"] in fake.blobs for x in json.loads(fake.manifests["v"])["layers"])
    assert res.blobs_uploaded > 0


def test_a_large_object_damaged_after_it_was_hashed_never_arrives_whole(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    """A large object whose sha256 the store remembers (the ShaMap) is not hashed before it is
    sent: it is checked as it goes, and its last piece is held back until the check passed, so a
    registry that stores what it is given unchecked (the fake) never gets the damaged bytes."""
    from veloverlay import fsflags

    _env(repo, shm_tmp)
    push(repo.store, repo.m, ["env"], fake.remote("v"), options=OPTS)  # the ShaMap learns it
    (big,) = repo.ls("env", "big")
    path = os.fsdecode(repo.store.object_path(bytes.fromhex(big.digest)))
    with contextlib.suppress(OSError):
        fsflags.set_immutable(path, False)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        good = f.read()
        f.seek(len(good) - 1)
        f.write(bytes([good[-1] ^ 0xFF]))  # the last byte: found only at the end
    fresh = FakeRegistry()
    got: list[int] = []

    def count(h: Handler, method: str) -> bool:
        if method == "PUT" and h.path.startswith("/upload/"):
            n = int(h.headers.get("Content-Length") or 0)
            if n == len(good):
                got.append(len(h.rfile.read(n)))
                h.send(201)
                return True
        return False

    fresh.hook = count
    try:
        with pytest.raises(VeloError) as ei:
            push(repo.store, repo.m, ["env"], fresh.remote("v"), options=OPTS)
    finally:
        fresh.close()
        with open(path, "wb") as f:
            f.write(good)
        os.chmod(path, 0o444)
    assert ei.value.reason is Reason.OBJECT_CORRUPT, ei.value
    assert got and max(got) < len(good), got  # the damaged object never arrived whole
