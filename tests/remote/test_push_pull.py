"""Push and pull through a real registry (tests/remote/conftest.py): round trip, increments,
verification, resume, auth, TLS and standard compliance (skopeo reads what we push)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import must_work
from tests.helpers.trees import assert_same_tree, make_tree, unprotect
from tests.remote.conftest import PASSWORD, USER, Registry
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.remote import Options, pull, push
from veloverlay.remote.auth import Credentials
from veloverlay.store import stage
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.repo import Repo

_counter = [0]


def _repo_name(tag: str) -> str:
    _counter[0] += 1
    return f"test/{tag}-{os.getpid()}-{_counter[0]}"


@pytest.fixture
def other(shm_tmp: str) -> Iterator[Repo]:
    """A second, empty store (the 'other machine'); fsck must pass at the end."""
    r = Repo.open(os.path.join(shm_tmp, "other"), create=True)
    yield r
    report = fsck(r.store, r.m, jobs=1)
    assert report.ok, report.findings
    r.close()


@pytest.fixture(params=["held", "short", "named"])
def hold(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """How a pull stages a pack's small objects: written unnamed and held open until published
    (the default budget of descriptors), the first 100 so and the rest by name (a budget of
    100), or all by name (no budget). Counts the unnamed files made."""
    if request.param == "short":
        monkeypatch.setattr(stage, "_HOLD", 25)  # a pull's budget is 4 times it
    elif request.param == "named":
        monkeypatch.setattr(stage, "_HOLD", 0)
    seen: dict[str, Any] = {"mode": request.param, "unnamed": 0}
    open_unnamed = stage.open_unnamed

    def counting_open(dir_fd: int, **kw: bool) -> int:
        seen["unnamed"] += 1
        return open_unnamed(dir_fd, **kw)

    monkeypatch.setattr(stage, "open_unnamed", counting_open)
    budgets: list[stage.HoldBudget] = []

    class Recorded(stage.HoldBudget):
        def __init__(self, store: Any) -> None:
            super().__init__(store)
            self.files_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            budgets.append(self)

    # (the package's `pull` is the function: patch the module)
    monkeypatch.setattr(sys.modules["veloverlay.remote.pull"], "HoldBudget", Recorded)
    seen["budgets"] = budgets
    return seen


def _all_given_back(hold: dict[str, Any]) -> None:
    """Every descriptor a pull's stages held was given back (published or dropped)."""
    assert hold["budgets"], "the pull made no budget"
    for b in hold["budgets"]:
        assert b.free == b.total, (b.free, b.total)


def _opts(reg: Registry, **kw: Any) -> Options:
    return Options(ca_cert=str(reg.ca), **kw)


def _source(shm_tmp: str, n: int = 300) -> str:
    src = os.path.join(shm_tmp, "src")
    spec: dict[str, object] = {
        f"pkg/m{i // 50}/f{i}.py": (f"# file {i}\n" * (i % 37 + 1)).encode() for i in range(n)
    }
    spec["big/blob.bin"] = os.urandom(3 << 20)  # travels alone
    spec["big/mid.bin"] = os.urandom(900_000)  # packed
    spec["empty.txt"] = b""
    spec["dir/empty"] = None
    spec["bin/python"] = ("link", "/usr/bin/python3")
    spec["odd name \u00e9"] = b"x"
    make_tree(src, spec)
    os.chmod(os.path.join(src, "pkg/m0/f0.py"), 0o755)
    return src


def test_round_trip(
    logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str, hold: dict[str, Any]
) -> None:
    src = _source(shm_tmp)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    target = logged_in.remote(_repo_name("rt"), "v1")
    [pushed] = push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    assert pushed.large_new == 1 and pushed.packs_new >= 2  # nodes + objects
    unnamed = hold["unnamed"]  # the ingest's own
    # a shell's usual limit of open files: the pull raises it while it holds files, then
    # sets it back (the programs a session starts later get the limit they would have had)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, limit[0]), limit[1]))
    try:
        got = pull(other.store, other.m, target, name="env2", options=_opts(logged_in))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(1024, limit[0])
        hard = limit[1] if limit[1] != resource.RLIM_INFINITY else stage.HOLD_FILES
        assert [b.files_limit for b in hold["budgets"]] == [min(hard, stage.HOLD_FILES)]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)
    assert got.root == pushed.root and got.digest == pushed.digest
    packed = got.objects_fetched - 1  # all but big/blob.bin, which travels alone
    expect = {"held": packed, "short": 100, "named": 0}[hold["mode"]]
    assert hold["unnamed"] - unnamed == expect
    _all_given_back(hold)
    out = os.path.join(shm_tmp, "out")
    other.checkout("env2", out)
    assert_same_tree(src, out)
    # pulling again fetches nothing (manifest and config only) and adds no commit
    counted = logged_in.counted(*target.split("/", 1)[1].split(":"))
    before = logged_in.sent()
    # (the proxy is another address, so another registry to the pull: force, as a user would)
    again = pull(other.store, other.m, counted, name="env2", force=True, options=_opts(logged_in))
    assert again.commit is None
    assert logged_in.sent() - before < 20_000


def test_incremental_push_uploads_the_delta(
    logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str
) -> None:
    src = _source(shm_tmp, n=2000)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    target = logged_in.remote(_repo_name("inc"), "v")
    push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    first = pull(other.store, other.m, target, name="env", options=_opts(logged_in))
    full_pull = first.bytes_fetched
    # change 10 files (fresh random content, 20 KB each) and re-ingest
    changed = 0
    for i in range(10):
        p = os.path.join(src, f"pkg/m{i}/f{i * 50 + 1}.py")
        with open(p, "wb") as f:
            f.write(os.urandom(20_000))
        changed += 20_000
    ingest(repo.store, repo.m, src, "env", jobs=1)
    before = logged_in.stored_blob_bytes()
    [second] = push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    stored = logged_in.stored_blob_bytes() - before
    assert second.packs_reused >= 2 and second.large_reused == 1
    # the ten files' bytes plus metadata (a small node pack, indexes, config), not the tree
    assert changed <= stored < changed + 60_000, (stored, changed)
    # and a pull of the new version fetches about the same
    counted = logged_in.counted(*target.split("/", 1)[1].split(":"))
    before = logged_in.sent()
    # (the proxy is another address, so another registry to the pull: force, as a user would)
    pull(other.store, other.m, counted, name="env", force=True, options=_opts(logged_in))
    fetched = logged_in.sent() - before
    assert changed <= fetched < changed + 400_000 < full_pull, (fetched, full_pull)
    out = os.path.join(shm_tmp, "out")
    other.checkout("env", out)
    assert_same_tree(src, out)


def _pushed(logged_in: Registry, repo: Repo, shm_tmp: str, tag: str) -> tuple[str, str]:
    src = _source(shm_tmp)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    target = logged_in.remote(_repo_name(tag), "v1")
    push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    return src, target


def _layers(reg: Registry, target: str) -> list[dict[str, Any]]:
    from veloverlay.remote import Registry as Client
    from veloverlay.remote import parse_remote

    with Client(parse_remote(target), _opts(reg)) as c:
        body, _d, _t = c.get_manifest(parse_remote(target).tag or "")
    layers: list[dict[str, Any]] = json.loads(body)["layers"]
    return layers


def _state(r: Repo) -> tuple[Any, ...]:
    with r.m.read() as txn:
        refs = {x.name for x in r.m.refs(txn)}
    return refs, {n for n, _p in r.store.iter_objects()}


def test_a_pull_restores_objects_fsck_set_aside(
    logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str
) -> None:
    """The ref is up to date, but fsck --repair set two of its objects aside (one that travels
    in a pack, one alone): pulling the same version again fetches exactly those."""

    src, target = _pushed(logged_in, repo, shm_tmp, "heal")
    pull(other.store, other.m, target, name="env", options=_opts(logged_in))
    for rel in ("pkg/m0/f1.py", "big/blob.bin"):
        (entry,) = other.ls("env", rel)
        obj = os.fspath(other.store.object_path(bytes.fromhex(entry.digest)))
        unprotect(obj)
        os.chmod(obj, 0o644)
        with open(obj, "r+b") as f:
            f.write(b"rot")
    rep = fsck(other.store, other.m, jobs=1, repair=True)
    assert rep.quarantined == 2, rep.findings
    again = pull(other.store, other.m, target, name="env", options=_opts(logged_in))
    assert again.commit is None  # the same version: no new commit
    assert again.objects_fetched == 2
    out = os.path.join(shm_tmp, "out")
    other.checkout("env", out)
    assert_same_tree(src, out)  # and the `other` fixture's fsck passes


@pytest.mark.parametrize("which", ["pack", "large"])
def test_tampered_blob_is_refused_and_nothing_named(
    logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str, which: str, hold: dict[str, Any]
) -> None:
    _src, target = _pushed(logged_in, repo, shm_tmp, "tamper")
    layers = _layers(logged_in, target)
    if which == "pack":
        layer = next(
            x
            for x in layers
            if x["mediaType"].endswith("pack.v1")
            and x["annotations"]["org.veloverlay.pack.kind"] == "objects"
        )
    else:
        layer = next(x for x in layers if x["mediaType"].endswith("object.v1"))
    path = logged_in.blob_path(layer["digest"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last entry's last byte (a pack) / the object's last byte
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    before = _state(other)
    try:
        with pytest.raises(VeloError) as ei:
            pull(other.store, other.m, target, name="env", options=_opts(logged_in))
        assert ei.value.reason is Reason.REMOTE_INVALID, ei.value
        refs, objects = _state(other)
        assert refs == before[0]  # no ref
        # no object under a name it does not hash to (fsck at teardown), and the damaged one is
        # not stored under any name: every object stored now is one the source store holds
        assert objects <= {n for n, _p in repo.store.iter_objects()}
        if which == "pack":  # the tree's one pack of objects: at most the lone blob arrived
            (blob,) = repo.ls("env", "big/blob.bin")
            assert len([x for x in layers if x["mediaType"].endswith("pack.v1")]) == 2
            assert objects - before[1] <= {blob.digest}
        assert os.listdir(other.store.tmp) == []
        _all_given_back(hold)
    finally:
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


def test_killed_pull_resumes(logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str) -> None:
    src, target = _pushed(logged_in, repo, shm_tmp, "resume")
    layers = _layers(logged_in, target)
    target = logged_in.counted(*target.split("/", 1)[1].split(":"))
    full = sum(x["size"] for x in layers if not x["mediaType"].endswith("index.v1"))
    script = (
        "import sys\n"
        "from veloverlay.verbs.repo import Repo\n"
        "from veloverlay.remote import Options, pull\n"
        "r = Repo.open(sys.argv[1])\n"
        "opts = Options(ca_cert=sys.argv[3], jobs=1)\n"
        "pull(r.store, r.m, sys.argv[2], name='env', options=opts, publish_bytes=1)\n"
    )
    env = dict(os.environ, VELO_INTERNAL__TEST_FAULT="remote.pull.published:1")
    before = logged_in.sent()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(other.store.root), target, str(logged_in.ca)],
        env=env,
        capture_output=True,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    first = logged_in.sent() - before
    refs, objects = _state(other)
    assert "env" not in refs  # no half-made ref
    assert objects  # one blob was published before the kill
    before = logged_in.sent()
    res = pull(other.store, other.m, target, name="env", options=_opts(logged_in))
    second = logged_in.sent() - before
    assert res.objects_fetched < res.objects
    assert second < full <= first + second, (first, second, full)
    out = os.path.join(shm_tmp, "out")
    other.checkout("env", out)
    assert_same_tree(src, out)


def _isolate_auth(monkeypatch: pytest.MonkeyPatch, shm_tmp: str, content: object) -> str:
    path = os.path.join(shm_tmp, "auth.json")
    with open(path, "w") as f:
        json.dump(content, f)
    for var in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.setenv(var, os.path.join(shm_tmp, "nothing"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", path)
    return path


def test_wrong_credentials_give_a_clear_error(
    registry: Registry, repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest(repo.store, repo.m, _source(shm_tmp, n=3), "env", jobs=1)
    target = registry.remote(_repo_name("auth"), "v1")
    import base64

    bad = base64.b64encode(f"{USER}:wrong".encode()).decode()
    path = _isolate_auth(monkeypatch, shm_tmp, {"auths": {registry.host: {"auth": bad}}})
    with pytest.raises(VeloError) as ei:
        push(repo.store, repo.m, ["env"], target, options=_opts(registry))
    e = ei.value
    assert e.reason is Reason.REMOTE_AUTH
    assert USER in e.message and path in e.message and "wrong" not in str(e.as_dict())
    _isolate_auth(monkeypatch, shm_tmp, {})
    with pytest.raises(VeloError) as ei:
        push(repo.store, repo.m, ["env"], target, options=_opts(registry))
    assert ei.value.reason is Reason.REMOTE_AUTH and "no credentials" in ei.value.message
    # explicit credentials win over the files
    creds = Credentials(USER, PASSWORD, "test")
    [res] = push(repo.store, repo.m, ["env"], target, options=_opts(registry, credentials=creds))
    assert res.blobs_uploaded > 0


def test_tls_needs_the_ca_or_no_verify(logged_in: Registry, repo: Repo, shm_tmp: str) -> None:
    ingest(repo.store, repo.m, _source(shm_tmp, n=3), "env", jobs=1)
    target = logged_in.remote(_repo_name("tls"), "v1")
    with pytest.raises(VeloError) as ei:
        push(repo.store, repo.m, ["env"], target, options=Options(retries=0))
    assert ei.value.reason is Reason.REMOTE_TLS and "--ca-cert" in (ei.value.hint or "")
    [res] = push(repo.store, repo.m, ["env"], target, options=Options(tls_verify=False))
    assert res.digest.startswith("sha256:")


def test_skopeo_reads_what_we_push(logged_in: Registry, repo: Repo, shm_tmp: str) -> None:
    if shutil.which("skopeo") is None:
        why = "skopeo is not installed here (apt-get install skopeo)"
        if "tools" in must_work() or "all" in must_work():  # CI: the README's set-up installs it
            pytest.fail(f"VELO_TEST_MUST_WORK names 'tools' but {why}")
        pytest.skip(why)
    _src, target = _pushed(logged_in, repo, shm_tmp, "skopeo")
    certs = os.path.join(shm_tmp, "certs")
    os.mkdir(certs)
    with open(os.path.join(certs, "ca.crt"), "wb") as f:
        f.write(logged_in.ca.read_bytes())
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--cert-dir", certs, "--creds", f"{USER}:{PASSWORD}",
         f"docker://{target}"],
        capture_output=True,
        check=True,
    )  # fmt: skip
    m = json.loads(out.stdout)
    assert m["artifactType"] == "application/vnd.veloverlay.version.v1"
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert {x["digest"] for x in m["layers"]} == {x["digest"] for x in _layers(logged_in, target)}


def test_push_to_another_repository_mounts_blobs(
    logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str
) -> None:
    src = _source(shm_tmp)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    first = logged_in.counted(_repo_name("mount-a"), "v1")  # both pushes through the proxy
    push(repo.store, repo.m, ["env"], first, options=_opts(logged_in))
    repo_b = _repo_name("mount-b")
    second = logged_in.counted(repo_b, "v1")
    before = logged_in.received()
    [res] = push(repo.store, repo.m, ["env"], second, options=_opts(logged_in))
    sent_up = logged_in.received() - before
    layers = _layers(logged_in, first)
    assert res.blobs_mounted == len(layers)
    blobs = sum(x["size"] for x in layers)
    assert sent_up < 30_000 < blobs, (sent_up, blobs)  # requests and the config, no blob bytes
    linked = logged_in.storage / "docker/registry/v2/repositories" / repo_b / "_layers/sha256"
    assert {x["digest"].split(":")[1] for x in layers} <= set(os.listdir(linked))
    pull(other.store, other.m, second, name="env", options=_opts(logged_in))
    out = os.path.join(shm_tmp, "out")
    other.checkout("env", out)
    assert_same_tree(src, out)


def test_pull_reads_only_missing_entries_with_ranges(
    logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str
) -> None:
    src, target = _pushed(logged_in, repo, shm_tmp, "ranges")
    # the other store already holds every object but five small ones (from its own ingest)
    partial = os.path.join(shm_tmp, "partial")
    shutil.copytree(src, partial, symlinks=True)
    gone = [f"pkg/m{i}/f{i * 50 + 7}.py" for i in range(5)]
    for g in gone:
        os.unlink(os.path.join(partial, g))
    ingest(other.store, other.m, partial, "mine", jobs=1)
    layers = _layers(logged_in, target)
    packs = sum(x["size"] for x in layers if x["mediaType"].endswith("pack.v1"))
    counted = logged_in.counted(*target.split("/", 1)[1].split(":"))
    before = logged_in.sent()
    res = pull(other.store, other.m, counted, name="env", options=_opts(logged_in))
    fetched = logged_in.sent() - before
    assert res.objects_fetched == 5
    assert fetched < packs / 4, (fetched, packs)
    out = os.path.join(shm_tmp, "out")
    other.checkout("env", out)
    assert_same_tree(src, out)


class _Requests:
    """Every HTTP request the client sends to the registry (at httpx's transport, so each one
    counted here went to the real registry)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import httpx

        self.seen: list[tuple[str, str]] = []
        real = httpx.HTTPTransport.handle_request

        def handle(transport: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
            self.seen.append((request.method, request.url.path))
            return real(transport, request)

        monkeypatch.setattr(httpx.HTTPTransport, "handle_request", handle)

    def blob_gets(self) -> list[str]:
        return [p for m, p in self.seen if m == "GET" and "/blobs/sha256:" in p]


def _change(src: str, first: int) -> None:
    for i in range(10):
        with open(os.path.join(src, f"pkg/m{i}/f{i * 50 + first}.py"), "wb") as f:
            f.write(os.urandom(20_000))


def test_incremental_push_reads_no_index_again(
    logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-push after a 10-file change costs a manifest GET, the new blobs and the manifest PUT:
    the have-list (the tag's pack indexes) comes from the store's own copy, checked against the
    digests the manifest names; a damaged copy is fetched again, and the result stays right."""
    src = _source(shm_tmp, n=2000)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    target = logged_in.remote(_repo_name("inc-req"), "v")
    push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    _change(src, 1)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    seen = _Requests(monkeypatch)
    [second] = push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    assert second.packs_reused >= 2
    assert seen.blob_gets() == [], seen.seen  # no index fetched again
    heads = [p for m, p in seen.seen if m == "HEAD"]
    assert len(heads) == second.blobs_uploaded + second.blobs_present <= 6, seen.seen
    assert len(seen.seen) <= 6 + 3 * len(heads), seen.seen
    # damaged copies of the indexes are not trusted: fetched again, and the push stays right
    cache = os.path.join(repo.store.root, "remote-v1", "blobs")
    for name in os.listdir(cache):
        with open(os.path.join(cache, name), "r+b") as f:
            f.seek(20)
            f.write(b"\xff" * 8)
    _change(src, 2)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    seen.seen.clear()
    [third] = push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    indexes = [x for x in _layers(logged_in, target) if x["mediaType"].endswith("index.v1")]
    assert 0 < len(seen.blob_gets()) <= len(indexes), seen.seen
    assert third.packs_reused >= 2
    pull(other.store, other.m, target, name="env", options=_opts(logged_in))
    out = os.path.join(shm_tmp, "out")
    other.checkout("env", out)
    assert_same_tree(src, out)


def test_push_refuses_a_damaged_object(logged_in: Registry, repo: Repo, shm_tmp: str) -> None:
    """A small object whose bytes no longer match its name is never sent (it is hashed as it is
    read for its pack), and the tag is not made."""
    from veloverlay import fsflags

    src = _source(shm_tmp)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    digest = next(
        d for d in (bytes.fromhex(n) for n, _p in repo.store.iter_objects())
        if os.path.getsize(repo.store.object_path(d)) == len(b"# file 3\n" * 4)
    )  # fmt: skip
    path = os.fsdecode(repo.store.object_path(digest))
    with contextlib.suppress(OSError):
        fsflags.set_immutable(path, False)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        good = f.read()
        f.seek(0)
        f.write(b"X")  # same size, other bytes
    target = logged_in.remote(_repo_name("damaged"), "v1")
    try:
        with pytest.raises(VeloError) as ei:
            push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    finally:
        with open(path, "wb") as f:
            f.write(good)  # the fixture's fsck checks the store at the end
        os.chmod(path, 0o444)
    assert ei.value.reason is Reason.OBJECT_CORRUPT, ei.value
    assert digest.hex() in ei.value.message
    with pytest.raises(VeloError) as nf:
        _layers(logged_in, target)
    assert nf.value.reason is Reason.NOT_FOUND


def test_empty_files_are_pulled(logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str) -> None:
    """An empty file's object is a zero-length entry of a pack. Where a pull reads the entries it
    wants by ranges (less than half a pack), a range ended before an empty entry at its end, so
    the object never arrived and the pull failed with remote-invalid ("object af1349b9... did not
    arrive", the BLAKE3 of nothing): found pushing a tree with an empty file and pulling it.
    Every package tree has empty files (`__init__.py`)."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a.py": b"x = 1\n", "pkg/__init__.py": b"", "z": os.urandom(50_000)})
    ingest(repo.store, repo.m, src, "env", jobs=1)
    target = logged_in.remote(f"test/empty-{os.getpid()}", "v1")
    push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    other_src = os.path.join(shm_tmp, "has-z")  # the store already has the big entry:
    make_tree(other_src, {"z": open(os.path.join(src, "z"), "rb").read()})  # a range is read
    ingest(other.store, other.m, other_src, "mine", jobs=1)
    pull(other.store, other.m, target, name="env", options=_opts(logged_in))
    out = os.path.join(shm_tmp, "out")
    other.checkout("env", out)
    assert_same_tree(src, out)
