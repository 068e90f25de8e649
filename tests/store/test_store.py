"""The object store (cas.py), fsck (verify.py), gc (gc.py), and stores that run out of room or
cannot be written."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.trees import make_tree, snapshot, unprotect
from tests.helpers.unpriv import UNPRIV_GID, UNPRIV_UID, run_unprivileged, unpriv_tmpdir
from veloverlay import cli, mount, ns
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.store.cas import OBJECT_MODE, Stage, Store, default_store_path
from veloverlay.store.digest import hash_bytes
from veloverlay.store.tree import Entry, Kind
from veloverlay.verbs import gc as gc_mod
from veloverlay.verbs.fsck import FsckReport, fsck
from veloverlay.verbs.gc import gc
from veloverlay.verbs.repo import Repo

# -- helpers -----------------------------------------------------------------------------------


def put(repo: Repo, *contents: bytes) -> list[bytes]:
    with repo.store.stage() as stage:
        digests = [stage.add_bytes(c) for c in contents]
        stage.publish()
    return digests


def tree_with(repo: Repo, shm_tmp: str, name: str, files: dict[str, bytes]) -> str:
    src = os.path.join(shm_tmp, f"src-{name}")
    make_tree(src, files)  # type: ignore[arg-type]
    ingest(repo.store, repo.m, src, name, jobs=1)
    return src


def objects(repo: Repo) -> set[str]:
    return {n for n, _p in repo.store.iter_objects()}


def check(repo: Repo) -> FsckReport:
    return fsck(repo.store, repo.m, jobs=1)


def velo(store: str | os.PathLike[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real command line in its own process (this process holds the store's LMDB open)."""
    return velo_text(store, *args)


@contextlib.contextmanager
def writable(path: str | os.PathLike[str]) -> Iterator[None]:
    """Let the test change an object as an attacker with root would: +i cleared, mode 0644."""
    mutable(path)
    os.chmod(path, 0o644)
    try:
        yield
    finally:
        os.chmod(path, OBJECT_MODE)


def mutable(path: str | os.PathLike[str]) -> None:
    """Clear +i (objects published as root carry it) so that a test may damage the object."""
    unprotect(path)


# -- the object store --------------------------------------------------------------------------


def test_layout_and_object_files(repo: Repo) -> None:
    root = repo.store.root
    assert (
        (root / "CACHEDIR.TAG")
        .read_bytes()
        .startswith(b"Signature: 8a477f597d28d172789f06886806bc55")
    )
    assert (root / ".gitignore").read_text() == "*\n"
    for d in ("objects-v2", "tmp", "trees-v1", "sessions", "locks-v1", "manifests.lmdb"):
        assert (root / d).is_dir(), d
    (d,) = put(repo, b"hello")
    h = hash_bytes(b"hello").hex()
    assert d.hex() == h
    path = root / "objects-v2" / h[:2] / h
    assert repo.store.object_path(d) == path
    assert path.read_bytes() == b"hello"
    assert path.stat().st_mode & 0o7777 == 0o444  # modes live in manifests, not in objects
    assert repo.store.has(d) and not repo.store.has(hash_bytes(b"other"))
    assert os.listdir(repo.store.tmp) == []  # the stage is gone


def test_add_fd_names_objects_by_the_bytes_written(repo: Repo, shm_tmp: str) -> None:
    data = os.urandom(3 << 20)
    src = os.path.join(shm_tmp, "big")
    with open(src, "wb") as f:
        f.write(data)
    with repo.store.stage() as stage:
        fd = os.open(src, os.O_RDONLY)
        try:
            digest, size, new = stage.add_fd(fd)
            os.lseek(fd, 0, os.SEEK_SET)
            again = stage.add_fd(fd)
        finally:
            os.close(fd)
        assert (digest, size, new) == (hash_bytes(data), len(data), True)
        assert again == (digest, size, False)  # staged once
        assert stage.publish() == 1
    assert repo.store.read_object(digest) == data


def _staged_bytes(stage: Stage, digest: bytes) -> bytes:
    with open(stage.staged[digest], "rb") as f:
        return f.read()


@pytest.mark.parametrize("refuse", ["none", "ficlone", "both", "short"])
def test_add_fd_copies_large_files_in_the_kernel_or_falls_back(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch, refuse: str
) -> None:
    """A large file goes through copy_file_range (FICLONE is refused here on tmpfs, or by the
    test); where the kernel refuses both, or copy_file_range reads short (as on procfs), the
    bytes are read and written instead, from the same offset. Every way, the staged file is
    the source's bytes and its name is their BLAKE3."""
    from veloverlay import _libc
    from veloverlay.errors import SysError

    data = os.urandom(3 << 20) + b"tail"
    src = os.path.join(shm_tmp, "big")
    with open(src, "wb") as f:
        f.write(data)
    real_cfr = os.copy_file_range
    calls: list[int] = []

    def cfr(a: int, b: int, count: int, *rest: int) -> int:
        calls.append(b)
        if refuse == "both":
            raise OSError(errno.EXDEV, "refused by the test")
        if refuse == "short":
            return 0
        return real_cfr(a, b, count, *rest)

    def ficlone(dst: int, src_fd: int) -> None:
        raise SysError(errno.EOPNOTSUPP, "ioctl(FICLONE)")

    monkeypatch.setattr(os, "copy_file_range", cfr)
    if refuse != "none":
        monkeypatch.setattr(_libc, "ficlone", ficlone)
    with repo.store.stage() as stage:
        fd = os.open(src, os.O_RDONLY)
        try:
            whole = stage.add_fd(fd)
            assert os.lseek(fd, 0, os.SEEK_CUR) == len(data)
            os.lseek(fd, 5, os.SEEK_SET)  # from the current offset, never a clone of it all
            part = stage.add_fd(fd)
        finally:
            os.close(fd)
        assert whole == (hash_bytes(data), len(data), True)
        assert part == (hash_bytes(data[5:]), len(data) - 5, True)
        assert calls, "copy_file_range was not tried"
        for digest, body in ((whole[0], data), (part[0], data[5:])):
            assert _staged_bytes(stage, digest) == body
        assert stage.publish() == 2
    assert repo.store.read_object(whole[0]) == data
    assert repo.store.read_object(part[0]) == data[5:]


def test_add_fd_names_what_it_copied_when_the_source_changes_meanwhile(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that changes the source in the middle of the in-kernel copy: the staged file
    holds a mix of versions, and its name is the BLAKE3 of that mix (never of the source as it
    was before or after), so the object cannot lie; ingest's stat check then refuses it."""
    old = os.urandom(4 << 20)
    new = os.urandom(4 << 20)
    src = os.path.join(shm_tmp, "big")
    with open(src, "wb") as f:
        f.write(old)
    real_cfr = os.copy_file_range
    copied = 0

    def cfr(a: int, b: int, count: int, *rest: int) -> int:
        nonlocal copied
        n = real_cfr(a, b, min(count, 1 << 20), *rest)
        copied += n
        if copied == 1 << 20:  # after the first MiB: the writer rewrites the whole file
            with open(src, "r+b") as w:
                w.write(new)
        return n

    monkeypatch.setattr(os, "copy_file_range", cfr)
    with repo.store.stage() as stage:
        fd = os.open(src, os.O_RDONLY)
        try:
            digest, size, _new = stage.add_fd(fd)
        finally:
            os.close(fd)
        mix = old[: 1 << 20] + new[1 << 20 :]
        assert size == len(mix)
        assert _staged_bytes(stage, digest) == mix
        assert digest == hash_bytes(mix)


def test_publishing_an_existing_object_keeps_the_old_inode(repo: Repo) -> None:
    (d,) = put(repo, b"same")
    ino = os.stat(repo.store.object_path(d)).st_ino
    # Two writers that both staged the content before either published.
    with repo.store.stage() as a, repo.store.stage() as b:
        (a.staged)[d] = _stage_raw(a, b"same")
        (b.staged)[d] = _stage_raw(b, b"same")
        assert a.publish() == 0 and b.publish() == 0
    assert os.stat(repo.store.object_path(d)).st_ino == ino
    assert os.listdir(repo.store.tmp) == []


def _stage_raw(stage: object, data: bytes) -> bytes:
    path = stage._tmpname()  # type: ignore[attr-defined]
    with open(path, "wb") as f:
        f.write(data)
    return path  # type: ignore[no-any-return]


def test_stages_of_dead_writers_are_reclaimed(repo: Repo) -> None:
    pid = os.fork()
    if pid == 0:  # a writer that dies between staging and publishing
        stage = repo.store.stage()
        stage.open()
        stage.add_bytes(b"orphan" * 100)
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.listdir(repo.store.tmp)  # its stage dir and lock are left behind
    with repo.store.stage() as live:
        live.add_bytes(b"mine")
        assert repo.store.reclaim_tmp() >= 1
        assert sorted(os.listdir(repo.store.tmp)) == sorted([live.name, live.name + ".lock"])
        live.publish()
    assert os.listdir(repo.store.tmp) == []
    assert not repo.store.has(hash_bytes(b"orphan" * 100))


def test_a_dead_stage_without_its_lock_file_is_reclaimed_by_gc(repo: Repo) -> None:
    """A stage whose `.lock` was removed (by hand, a cleaner of tmp files) was never reclaimed,
    not even by gc: reclaiming went by the lock files alone. gc, holding the store lock
    exclusively (no writer alive), now removes it; a writer's reclaim, which cannot tell a
    live stage from a dead one without the lock, leaves it."""
    pid = os.fork()
    if pid == 0:  # a writer that dies between staging and publishing
        stage = repo.store.stage()
        stage.open()
        stage.add_bytes(b"orphan" * 100)
        os._exit(0)
    os.waitpid(pid, 0)
    (lock,) = [n for n in os.listdir(repo.store.tmp) if n.endswith(".lock")]
    os.unlink(os.path.join(repo.store.tmp, lock))
    dead = lock[: -len(".lock")]
    with repo.store.stage() as live:  # a live stage (its lock file removed too) is kept
        os.unlink(os.path.join(repo.store.tmp, live.name + ".lock"))
        live.add_bytes(b"mine")
        repo.store.reclaim_tmp()
        assert sorted(os.listdir(repo.store.tmp)) == sorted([dead, live.name])
        live.publish()
    assert os.listdir(repo.store.tmp) == [dead] and repo.store.has(hash_bytes(b"mine"))
    gc(repo.store, repo.m, grace=0)
    assert os.listdir(repo.store.tmp) == []
    assert not repo.store.has(hash_bytes(b"orphan" * 100))


def test_default_store_is_never_relative_to_the_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty or relative HOME/XDG_DATA_HOME (an `env -i` cron job, a script's typo) gave a
    store path relative to wherever the command ran, or `/.local/share/veloverlay` for HOME="":
    each verb then used another store. The XDG spec says to ignore a relative value."""
    import pwd

    monkeypatch.delenv("VELO_STORE", raising=False)
    home = pwd.getpwuid(os.getuid()).pw_dir
    monkeypatch.setenv("HOME", "")
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")
    assert os.fspath(default_store_path()) == os.path.join(home, ".local/share/veloverlay")
    monkeypatch.setenv("HOME", "somewhere")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert os.fspath(default_store_path()) == os.path.join(home, ".local/share/veloverlay")


def _store_path_without_home(where: str) -> tuple[str, str | None, list[str]]:
    os.chdir(where)
    for name in ("HOME", "VELO_STORE", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        os.environ.pop(name, None)
    from veloverlay.remote.auth import auth_files

    try:
        got = os.fspath(default_store_path())
    except VeloError as exc:
        return exc.reason.value, exc.hint, auth_files()
    return got, None, auth_files()


def test_no_home_at_all_is_a_clear_error(shm_tmp: str) -> None:
    """A uid with no passwd entry and no HOME (`env -i`, a container's arbitrary uid): Python's
    expanduser leaves `~` as it is, so `init` made `./~/.local/share/veloverlay` in the cwd, and
    push/pull read credentials from `./~/.docker/config.json` there."""
    import pwd

    try:
        pwd.getpwuid(UNPRIV_UID)
        pytest.skip(f"uid {UNPRIV_UID} has a passwd entry here")
    except KeyError:
        pass
    with unpriv_tmpdir() as where:
        reason, hint, auth = run_unprivileged(_store_path_without_home, where)
        assert reason == Reason.STORE_MISSING.value
        assert hint is not None and "--store" in hint
        assert all(os.path.isabs(p) for p in auth), auth
        assert os.listdir(where) == []


def test_store_location(monkeypatch: pytest.MonkeyPatch, shm_tmp: str) -> None:
    monkeypatch.setenv("VELO_STORE", "/somewhere/velo")
    assert os.fspath(default_store_path()) == "/somewhere/velo"
    monkeypatch.delenv("VELO_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    assert os.fspath(default_store_path()) == "/xdg/veloverlay"
    with pytest.raises(VeloError) as ei:
        Store.open(os.path.join(shm_tmp, "nothing-here"))
    assert ei.value.reason is Reason.STORE_MISSING
    # init is idempotent
    s = Store.init(os.path.join(shm_tmp, "s"))
    Store.init(s.root)
    assert Store.open(s.root).root == s.root


def test_missing_object_is_named(repo: Repo) -> None:
    with pytest.raises(VeloError) as ei:
        repo.store.open_object(b"\1" * 32)
    assert ei.value.reason is Reason.OBJECT_MISSING
    assert ("01" * 32) in ei.value.message


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_missing_many_agrees_with_has_one_by_one(shm_tmp: str, layout: str) -> None:
    """`Store.missing` (a pull's closure at once) says what `has` says of each digest, however
    the fan-out directories it meets look: absent, short (listed), long (looked up one by one),
    holding one or two of the digests asked about; in either layout."""
    root = os.path.join(shm_tmp, "s")
    if layout == "v1":
        os.makedirs(os.path.join(root, "objects-v1"))
    repo = Repo.open(root, create=True)
    try:
        # a long directory: 600 objects whose names begin with 0x00 (8 x 72 bytes per digest
        # asked about is the listing's break-even), and a few objects elsewhere
        crowded: list[bytes] = []
        i = 0
        while len(crowded) < 600:
            data = b"c%d" % i
            i += 1
            if hash_bytes(data)[0] == 0:
                crowded.append(data)
        stored = put(repo, *crowded, *(b"o%d" % j for j in range(40)))
        absent = [hash_bytes(b"absent %d" % j) for j in range(300)]
        zero = [d for d in absent if d[0] == 0][:2]
        asked = stored[:5] + stored[600:620] + absent + zero + stored[630:631] + stored[:3]
        expect = sorted({d for d in asked if not repo.store.has(d)})
        assert expect and len(expect) < len(set(asked))
        assert repo.store.missing(asked) == expect
        assert repo.store.missing(stored) == []
        assert repo.store.missing([]) == []

        # Names that are no regular file (a damaged or planted store): a dangling link, a link
        # to a stored object, a directory. Neither `has` nor `missing` counts them as objects.
        def lead_5a(tag: bytes, k: int) -> list[bytes]:  # contents whose digests share a shard
            out, j = [], 0
            while len(out) < k:
                j += 1
                if hash_bytes(b"%s%d" % (tag, j))[0] == 0x5A:
                    out.append(b"%s%d" % (tag, j))
            return out

        real = put(repo, *lead_5a(b"real", 2))
        odd = sorted(hash_bytes(x) for x in lead_5a(b"odd", 3))
        for n, d in enumerate(odd):
            path = repo.store.object_path(d)
            os.makedirs(path.parent, exist_ok=True)
            if n % 3 == 0:
                os.symlink("nowhere", path)
            elif n % 3 == 1:
                os.symlink(repo.store.object_path(stored[0]), path)
            else:
                os.mkdir(path)
        assert not any(repo.store.has(d) for d in odd) and all(repo.store.has(d) for d in real)
        assert repo.store.missing(odd + real) == odd  # five in a short shard: listed
        assert repo.store.missing(odd[:1] + real[:1]) == odd[:1]  # two: looked up one by one
        if layout == "v2":
            # a fan-out entry that is a link to a directory (a damaged store): not listed
            # through the link, but each object looked up as `has` looks it up
            objects = repo.store.objects
            shard = objects / stored[0][:1].hex()
            os.rename(shard, objects / "moved")
            os.symlink("moved", shard)
            expect = sorted({d for d in asked if not repo.store.has(d)})
            assert repo.store.missing(asked) == expect
            os.unlink(shard)
            os.rename(objects / "moved", shard)
    finally:
        repo.close()


def test_has_listed_answers_as_has_from_one_listing_per_short_shard(shm_tmp: str) -> None:
    """A stage's lookups (`has_listed`) say what `has` says of objects stored before the shard
    was listed, list a short shard once and look up a long one object by object; an object
    stored after the listing reads as absent, and staging it again keeps one object."""
    repo = Repo.open(os.path.join(shm_tmp, "s"), create=True)
    try:
        store = repo.store

        def with_lead(lead: int, tag: bytes, k: int) -> list[bytes]:
            out, j = [], 0
            while len(out) < k:
                j += 1
                if hash_bytes(b"%s%d" % (tag, j))[0] == lead:
                    out.append(b"%s%d" % (tag, j))
            return out

        short = put(repo, *with_lead(0x11, b"s", 3))
        long_ = put(repo, *with_lead(0x22, b"l", 400))  # more than one block of names
        odd = hash_bytes(with_lead(0x11, b"odd", 1)[0])
        os.symlink(store.object_path(short[0]), store.object_path(odd))
        absent = [hash_bytes(x) for x in with_lead(0x11, b"a", 2) + with_lead(0x22, b"b", 2)]
        listings: dict[int, set[str] | None] = {}
        asked = short + long_[:5] + absent + [odd]
        assert [store.has_listed(d, listings) for d in asked] == [store.has(d) for d in asked]
        assert listings[0x11] is not None and listings[0x22] is None
        assert set(listings[0x11] or ()) == {d.hex() for d in short}  # the link is no object
        late = put(repo, *with_lead(0x11, b"late", 1))[0]
        assert store.has(late) and not store.has_listed(late, listings)  # stale: absent
        with store.stage() as stage:
            stage._listings = listings
            assert stage.add_bytes(with_lead(0x11, b"late", 1)[0]) == late
            stage.publish()
        assert store.has(late) and store.read_object(late) == with_lead(0x11, b"late", 1)[0]
    finally:
        repo.close()


# -- fsck --------------------------------------------------------------------------------------


@pytest.fixture
def populated(repo: Repo, shm_tmp: str) -> Repo:
    tree_with(
        repo, shm_tmp, "r", {"a.txt": b"alpha" * 100, "d/b.txt": b"beta", "d/e/c.txt": b"gamma"}
    )
    assert check(repo).ok
    return repo


def obj(repo: Repo, content: bytes) -> tuple[str, str]:
    d = hash_bytes(content)
    return d.hex(), os.fspath(repo.store.object_path(d))


def assert_names(report: FsckReport, kind: str, culprit: str) -> None:
    assert not report.ok
    assert any(f.kind == kind and culprit in f.what for f in report.findings), report.findings


@pytest.mark.corrupts_store
def test_fsck_names_a_flipped_object(populated: Repo) -> None:
    h, path = obj(populated, b"beta")
    with writable(path), open(path, "r+b") as f:
        f.seek(2)
        byte = f.read(1)
        f.seek(2)
        f.write(bytes([byte[0] ^ 0x01]))
    report = check(populated)
    assert_names(report, "object-corrupt", h)
    assert len(report.findings) == 1
    p = velo(populated.store.root, "fsck", "--debug")
    assert p.returncode == 1
    assert h in p.stdout and "error:" in p.stderr and "reason: object-corrupt" in p.stderr
    p = velo(populated.store.root, "fsck", "--json")
    assert p.returncode == 1
    first = json.loads(p.stdout[: p.stdout.index("\n}\n") + 3])
    assert first["ok"] is False and h in first["findings"][0]["what"]


@pytest.mark.corrupts_store
def test_fsck_names_a_truncated_object(populated: Repo) -> None:
    h, path = obj(populated, b"alpha" * 100)
    with writable(path):
        os.truncate(path, 10)
    assert_names(check(populated), "object-corrupt", h)
    with writable(path):
        os.truncate(path, 0)
    assert_names(check(populated), "object-corrupt", h)
    p = velo(populated.store.root, "fsck", "--debug")
    assert p.returncode == 1 and h in p.stdout


@pytest.mark.corrupts_store
def test_fsck_names_a_missing_object(populated: Repo) -> None:
    h, path = obj(populated, b"gamma")
    mutable(path)
    os.unlink(path)
    report = check(populated)
    assert_names(report, "object-missing", h)
    p = velo(populated.store.root, "fsck", "--debug")
    assert p.returncode == 1 and h in p.stdout and "reason: object-" in p.stderr


@pytest.mark.corrupts_store
@pytest.mark.parametrize("how", ["other-valid-node", "garbage", "empty"])
def test_fsck_names_an_altered_node(populated: Repo, how: str) -> None:
    m = populated.m
    with m.read() as txn:
        d = m.lookup(txn, populated.resolve_root("r"), b"d/e")
        assert d is not None
        key = d.digest
    if how == "other-valid-node":
        from veloverlay.store import tree

        _dg, value = tree.encode(0o700, 1, [Entry(b"x", Kind.MASK)])
    else:
        value = b"garbage" if how == "garbage" else b"\0"
    with m.write() as txn:
        txn.put(key, value, db=m._nodes)
    m._cache.clear()
    report = check(populated)
    assert_names(report, "node-corrupt", key.hex())
    p = velo(populated.store.root, "fsck", "--debug")
    assert p.returncode == 1 and key.hex() in p.stdout and "reason: manifest-corrupt" in p.stderr


@pytest.mark.corrupts_store
def test_fsck_names_a_missing_node_and_commit(populated: Repo) -> None:
    m = populated.m
    with m.read() as txn:
        d = m.lookup(txn, populated.resolve_root("r"), b"d")
        assert d is not None
        head = m.require_ref(txn, "r").head
    with m.write() as txn:
        m.delete_node(txn, d.digest)
        m.delete_commit(txn, head)
    report = check(populated)
    assert_names(report, "node-missing", d.digest.hex())
    assert_names(report, "commit-missing", head)


@pytest.mark.corrupts_store
def test_fsck_flags_writable_stray_and_misplaced_objects(populated: Repo) -> None:
    h, path = obj(populated, b"beta")
    mutable(path)
    os.chmod(path, 0o644)
    assert_names(check(populated), "object-writable", h)
    os.chmod(path, OBJECT_MODE)
    stray = populated.store.objects / "ab" / "cd"
    stray.mkdir(parents=True, exist_ok=True)
    (stray / "not-an-object").write_bytes(b"x")
    assert_names(check(populated), "object-stray", "not-an-object")
    os.unlink(stray / "not-an-object")
    wrong = stray / h  # the right name in the wrong shard
    wrong.write_bytes(b"beta")
    assert_names(check(populated), "object-misplaced", h)


@pytest.mark.corrupts_store
def test_fsck_in_parallel_finds_the_one_bad_object(repo: Repo) -> None:
    digests = put(repo, *(b"object %d" % i for i in range(2100)))
    bad = os.fspath(repo.store.object_path(digests[1234]))
    with writable(bad), open(bad, "ab") as f:
        f.write(b"!")
    report = fsck(repo.store, repo.m, jobs=2)
    assert report.objects == 2100
    assert [f.kind for f in report.findings] == ["object-corrupt"]
    assert digests[1234].hex() in report.findings[0].what


# -- gc ----------------------------------------------------------------------------------------


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> None:
    """gc's clock, 1000 s ahead: every object in the store is then 1000 s old."""
    import time

    real = time.time
    monkeypatch.setattr(gc_mod.time, "time", lambda: real() + 1000)


def test_gc_keeps_what_refs_and_commits_reach(repo: Repo, shm_tmp: str, later: None) -> None:
    src = tree_with(repo, shm_tmp, "r", {"a": b"v1", "keep": b"k"})
    with open(os.path.join(src, "a"), "wb") as f:
        f.write(b"v2")
    ingest(repo.store, repo.m, src, "r", jobs=1)
    tree_with(repo, shm_tmp, "other", {"x": b"other"})
    (orphan,) = put(repo, b"nobody needs me")
    before = objects(repo)
    rep = gc(repo.store, repo.m, grace=500)
    assert rep.deleted == [orphan.hex()] and rep.objects_deleted == 1
    assert objects(repo) == before - {orphan.hex()}
    for c in (b"v1", b"v2", b"k", b"other"):  # v1 only in the older commit: kept (keep=all)
        assert repo.store.has(hash_bytes(c))
    assert check(repo).ok


def test_gc_grace_period_keeps_young_objects(repo: Repo) -> None:
    (orphan,) = put(repo, b"just stored")
    rep = gc(repo.store, repo.m, grace=3600)
    assert (rep.objects_deleted, rep.young_kept) == (0, 1)
    assert repo.store.has(orphan)
    rep = gc(repo.store, repo.m, grace=0)
    assert rep.objects_deleted == 1 and not repo.store.has(orphan)


def test_gc_dry_run_counts_what_a_real_run_deletes(repo: Repo, shm_tmp: str, later: None) -> None:
    for i in range(3):
        tree_with(repo, shm_tmp, f"r{i}", {"f": b"ref %d" % i, "shared": b"s"})
    repo.delete_ref("r1")
    put(repo, b"orphan 1", b"orphan 2")
    before = (objects(repo), snapshot(repo.store.root / "manifests.lmdb"))
    dry = gc(repo.store, repo.m, grace=500, dry_run=True)
    assert (objects(repo), snapshot(repo.store.root / "manifests.lmdb")) == before  # untouched
    assert dry.objects_deleted == 3 and dry.commits_deleted == 1 and dry.nodes_deleted >= 1
    real = gc(repo.store, repo.m, grace=500)
    assert (real.objects_deleted, real.commits_deleted, real.nodes_deleted) == (
        dry.objects_deleted,
        dry.commits_deleted,
        dry.nodes_deleted,
    )
    assert sorted(real.deleted) == sorted(dry.deleted)
    assert objects(repo) == before[0] - set(dry.deleted)
    assert gc(repo.store, repo.m, grace=500).objects_deleted == 0
    assert repo.store.has(hash_bytes(b"s"))


def test_gc_keep_drops_older_commits_exclusive_objects(
    repo: Repo, shm_tmp: str, later: None
) -> None:
    src = tree_with(repo, shm_tmp, "r", {"f": b"version 1", "same": b"always"})
    for v in (b"version 2", b"version 3"):
        with open(os.path.join(src, "f"), "wb") as f:
            f.write(v)
        ingest(repo.store, repo.m, src, "r", jobs=1)
    assert len(repo.log("r")) == 3
    rep = gc(repo.store, repo.m, keep=1, grace=500)
    assert rep.commits_deleted == 2
    assert sorted(rep.deleted) == sorted(hash_bytes(v).hex() for v in (b"version 1", b"version 2"))
    assert repo.store.has(hash_bytes(b"version 3")) and repo.store.has(hash_bytes(b"always"))
    # The kept history still reads: the log ends where gc cut it.
    log = repo.log("r")
    assert [c.root for c in log] == [repo.resolve_root("r").hex()]
    with pytest.raises(VeloError) as ei:
        repo.resolve_root("r@{1}")
    assert ei.value.reason is Reason.NOT_FOUND
    assert check(repo).ok


@pytest.mark.parametrize("keep", [0, -1])
def test_gc_keep_below_one_is_refused_before_anything_is_deleted(
    repo: Repo, shm_tmp: str, keep: int, later: None
) -> None:
    src = tree_with(repo, shm_tmp, "r", {"f": b"version 1"})
    with open(os.path.join(src, "f"), "wb") as f:
        f.write(b"version 2")
    ingest(repo.store, repo.m, src, "r", jobs=1)
    log = repo.log("r")
    with pytest.raises(VeloError) as ei:
        gc(repo.store, repo.m, keep=keep, grace=0)
    assert ei.value.reason is Reason.USAGE
    assert repo.log("r") == log and check(repo).ok


def test_gc_keeps_objects_of_session_state_roots(repo: Repo, later: None) -> None:
    (d,) = put(repo, b"only a session has me")
    with repo.m.write() as txn:
        sub = repo.m.put_node(txn, 0o755, 0, [Entry(b"f", Kind.FILE, 0o644, 21, 0, d, b"", 2)])
        root = repo.m.put_node(txn, 0o755, 0, [Entry(b"d", Kind.DIR, digest=sub)])
    state = repo.store.sessions / "s-123"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"roots": [root.hex()], "other": "fields"}))
    rep = gc(repo.store, repo.m, grace=500)
    assert rep.objects_deleted == 0 and repo.store.has(d)
    with repo.m.read() as txn:
        assert repo.m.has_node(txn, sub) and repo.m.has_node(txn, root)
    (state / "state.json").unlink()
    rep = gc(repo.store, repo.m, grace=500)
    assert rep.deleted == [d.hex()] and rep.nodes_deleted == 2


@pytest.mark.parametrize("garbage", [b'{"roots": ["', b"[1, 2]"])
def test_gc_refuses_while_a_session_state_cannot_be_read(
    repo: Repo, later: None, garbage: bytes
) -> None:
    """A session whose state file cannot be read may be live: gc skipped it, and took what its
    state named (a stacked view only it keeps). Now gc refuses, saying which session and how to
    go on; once that session's directory is gone, gc sweeps as before."""
    (d,) = put(repo, b"a live session may need me")
    state = repo.store.sessions / "s-456"
    state.mkdir(parents=True)
    (state / "state.json").write_bytes(garbage)
    with pytest.raises(VeloError) as ei:
        gc(repo.store, repo.m, grace=500)
    assert ei.value.reason is Reason.SESSION_ACTIVE and "s-456" in ei.value.message
    assert "s-456" in (ei.value.hint or "") and repo.store.has(d)
    (state / "state.json").unlink()
    state.rmdir()
    rep = gc(repo.store, repo.m, grace=500)
    assert rep.deleted == [d.hex()]


def test_gc_via_cli(repo: Repo, shm_tmp: str) -> None:
    tree_with(repo, shm_tmp, "r", {"a": b"1"})
    put(repo, b"orphan")
    p = velo(repo.store.root, "gc", "--grace", "0", "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    dry = json.loads(p.stdout)
    assert dry["objects_deleted"] == 1 and dry["dry_run"] is True
    assert repo.store.has(hash_bytes(b"orphan"))
    p = velo(repo.store.root, "gc", "--grace", "0", "--json")
    assert json.loads(p.stdout)["objects_deleted"] == 1
    assert not repo.store.has(hash_bytes(b"orphan"))


# -- stores that are full or not writable -------------------------------------------------------


def _ingest_into_small_tmpfs(mnt: str, src: str, small: str) -> dict[str, object]:
    ns.enter_userns(map_root=True)
    mount.make_rprivate("/")
    mount.mount_tmpfs(mnt, "size=2m")
    repo = Repo.open(os.path.join(mnt, "store"), create=True)
    out: dict[str, object] = {}
    for jobs in (1, 2):
        try:
            ingest(repo.store, repo.m, src, "big", jobs=jobs)
            out[f"reason{jobs}"] = None
        except VeloError as exc:
            out[f"reason{jobs}"] = exc.reason
    with repo.m.read() as txn:
        out["refs"] = [r.name for r in repo.m.refs(txn)]
    report = fsck(repo.store, repo.m, jobs=1)
    out["fsck"] = (report.ok, report.findings)
    out["tmp"] = os.listdir(repo.store.tmp)
    # The store is not wedged: a tree that fits goes in.
    res = ingest(repo.store, repo.m, small, "small", jobs=1)
    buf = io.BytesIO()
    repo.cat("small", "s", buf)
    out["small"] = (res.files, buf.getvalue())
    out["fsck_after"] = fsck(repo.store, repo.m, jobs=1).ok
    repo.close()
    return out


@pytest.mark.needs("userns")
@pytest.mark.parametrize(
    "n,size", [(4, 700_000), (2, 3 << 19)], ids=["read-write", "copy_file_range"]
)
def test_ingest_into_a_full_filesystem(shm_tmp: str, n: int, size: int) -> None:
    src = os.path.join(shm_tmp, "big")
    make_tree(src, {f"f{i}": os.urandom(size) for i in range(n)})  # 2.8 or 3 MiB > 2 MiB
    small = os.path.join(shm_tmp, "small")
    make_tree(small, {"s": b"fits"})
    mnt = os.path.join(shm_tmp, "mnt")
    os.mkdir(mnt)
    out = ns.run_in_child(_ingest_into_small_tmpfs, mnt, src, small)
    assert out["reason1"] is Reason.STORE_FULL
    assert out["reason2"] is Reason.STORE_FULL
    assert out["refs"] == []  # nothing committed
    assert out["fsck"] == (True, [])
    assert out["tmp"] == []  # staged files were removed
    assert out["small"] == (1, b"fits")
    assert out["fsck_after"] is True
    assert os.listdir(mnt) == []  # the mount died with the child


def test_a_full_lmdb_map_is_map_full(shm_tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELO_MAP_SIZE", str(256 << 10))
    repo = Repo.open(os.path.join(shm_tmp, "store"), create=True)
    try:
        src = os.path.join(shm_tmp, "many")
        make_tree(
            src, {f"d{i}/{'n' * 200}{j}": b"%d.%d" % (i, j) for i in range(300) for j in range(3)}
        )
        with pytest.raises(VeloError) as ei:
            ingest(repo.store, repo.m, src, "many", jobs=1)
        assert ei.value.reason is Reason.MAP_FULL
        with repo.m.read() as txn:
            assert repo.m.refs(txn) == []
        assert fsck(repo.store, repo.m, jobs=1).ok
    finally:
        repo.close()


def _as_unprivileged(store: str, src: str) -> list[str]:
    reasons = []
    try:
        repo = Repo.open(store)
        try:
            ingest(repo.store, repo.m, src, "r", jobs=1)
        finally:
            repo.close()
        reasons.append("ok")
    except VeloError as exc:
        reasons.append(exc.reason.value)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["--store", store, "--json", "ingest", src, "--name", "r"])
    reasons.append(f"rc={rc}")
    reasons.append(err.getvalue())
    return reasons


@pytest.mark.parametrize("how", ["owned-by-root", "objects-read-only"])
def test_a_store_that_is_not_writable_is_store_permission(how: str) -> None:
    with unpriv_tmpdir() as base:
        store = os.path.join(base, "store")
        src = os.path.join(base, "src")
        make_tree(src, {"f": b"x"})
        Repo.open(store, create=True).close()
        if how == "objects-read-only":
            for dirpath, dirnames, filenames in os.walk(base):
                for n in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, n), UNPRIV_UID, UNPRIV_GID)
            os.chmod(os.path.join(store, "objects-v2"), 0o555)
        else:
            os.chown(src, UNPRIV_UID, UNPRIV_GID)
        if (os.getuid(), os.getgid()) == (UNPRIV_UID, UNPRIV_GID) and how == "owned-by-root":
            pytest.skip("the suite runs unprivileged: there is no other owner to test against")
        lib, rc, stderr = run_unprivileged(_as_unprivileged, store, src)
        assert lib == "store-permission"
        assert rc == "rc=1"
        assert "error:" in stderr and "reason: store-permission" in stderr
        os.chmod(os.path.join(store, "objects-v2"), 0o755)


def test_no_space_for_a_shard_directory_is_store_full(
    repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC can come from creating a shard directory too (found by the ingest benchmark on a
    filesystem out of inodes): it is STORE_FULL like a failed write, not a raw OSError."""
    import errno as _errno

    from veloverlay.store.cas import Store as _Store

    def full(self: _Store, hexname: bytes) -> int:
        raise OSError(_errno.ENOSPC, "No space left on device")

    with repo.store.stage() as st:
        st.add_bytes(b"some content")
        monkeypatch.setattr(_Store, "open_shard", full)
        with pytest.raises(VeloError) as ei:
            st.publish()
    assert ei.value.reason is Reason.STORE_FULL


def test_a_link_planted_as_a_stage_is_removed_not_followed(repo: Repo, shm_tmp: str) -> None:
    """Stage reclaim lists and deletes what it finds at a dead writer's stage: a symbolic link
    in that place (planted by whoever could write tmp/) must not lead it into another tree."""
    victim = os.path.join(shm_tmp, "victim")
    os.makedirs(os.path.join(victim, "sub"))
    for rel in ("keep", "sub/keep"):
        with open(os.path.join(victim, rel), "w") as f:
            f.write("mine\n")
    tmp = repo.store.tmp
    os.makedirs(tmp, exist_ok=True)
    os.symlink(victim, tmp / "stage-x")
    with open(tmp / "stage-x.lock", "w"):
        pass  # a lock nobody holds: a dead writer's stage
    repo.store.reclaim_tmp()
    assert sorted(os.listdir(victim)) == ["keep", "sub"]
    assert os.listdir(os.path.join(victim, "sub")) == ["keep"]
    assert os.listdir(tmp) == []


def _under_an_address_space_limit(store_root: str, src: str) -> object:
    import resource

    first = Repo.open(store_root, create=True)  # made without a limit, then closed (unmapped)
    ingest(first.store, first.m, src, "first", jobs=1)
    first.close()
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    room = vm // 2 + (512 << 20)  # what the map may take: more than a quarter of the limit
    resource.setrlimit(resource.RLIMIT_AS, (vm + room, resource.RLIM_INFINITY))
    try:
        repo = Repo.open(store_root)
        try:
            ingest(repo.store, repo.m, src, "again", jobs=1)
            return sorted(r.name for r, _c in repo.refs())
        finally:
            repo.close()
    except VeloError as exc:
        return exc.reason.value


def test_an_address_space_limit_is_not_a_damaged_database(shm_tmp: str) -> None:
    """`ulimit -v` (RLIMIT_AS, as batch schedulers set it) below the 64 GiB LMDB map: every verb
    failed with ENOMEM reported as 'the manifest database is damaged ... restore manifests.lmdb
    from a backup'. The map now fits the limit; the store reads and takes a new version."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a": b"a\n", "d/b": b"b\n"})
    store = os.path.join(shm_tmp, "store")
    assert ns.run_in_child(_under_an_address_space_limit, store, src) == ["again", "first"]
