"""Store integrity against a damaged manifest database, lying bundles, rewritten objects and
read-only stores (issue 14). Every check compares with what is really on disk: the source files'
bytes, the objects present before, the commands' exit status and reason line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.trees import has_immutable, inode_flags_at, make_tree, unprotect
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.store.digest import hash_bytes
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.gc import gc
from veloverlay.verbs.repo import Repo

FILES = {"a.txt": b"alpha\n", "d/b.bin": bytes(range(256)) * 64, "d/e/c": b"gamma"}


def velo(store: str | os.PathLike[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real command line in its own process (a SIGBUS shows as a negative status), with
    --json: failures then show their `reason:` line on stderr."""
    return velo_text(store, "--json", *args)


def stored_objects(store: str) -> set[str]:
    out = set()
    for _dirpath, _dirs, files in os.walk(os.path.join(store, "objects-v2")):
        out.update(f for f in files if len(f) == 64)
    return out


def source_digests() -> set[str]:
    return {hash_bytes(data).hex() for data in FILES.values()}


@pytest.fixture
def ingested(shm_tmp: str) -> str:
    """A store with one ref `t` of FILES; returns the store path (closed: nothing holds it)."""
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, FILES)  # type: ignore[arg-type]
    repo = Repo.open(store, create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()
    assert source_digests() <= stored_objects(store)
    return store


def _assert_refused_corrupt(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "error:" in res.stderr and "reason: manifest-corrupt" in res.stderr, res.stderr
    assert "hint:" in res.stderr


# -- item 1: a damaged manifest database is manifest-corrupt, never "empty" ------------------


@pytest.mark.parametrize("keep", ["nothing", "half", "one-page"])
def test_a_truncated_database_is_manifest_corrupt_and_gc_deletes_nothing(
    ingested: str, keep: str
) -> None:
    data = os.path.join(ingested, "manifests.lmdb", "data.mdb")
    size = os.path.getsize(data)
    os.truncate(data, {"nothing": 0, "half": size // 2, "one-page": 4096}[keep])
    before = stored_objects(ingested)
    for args in (["refs"], ["ls", "t"], ["fsck"], ["gc", "--grace", "0"], ["log", "t"]):
        _assert_refused_corrupt(velo(ingested, *args))
    assert stored_objects(ingested) == before
    assert source_digests() <= before


def test_a_database_replaced_by_an_empty_one_is_manifest_corrupt(ingested: str) -> None:
    """A valid LMDB file without veloverlay's schema record (e.g. recreated by a tool)."""
    db = os.path.join(ingested, "manifests.lmdb")
    shutil.rmtree(db)
    import lmdb

    lmdb.open(db, max_dbs=8).close()
    before = stored_objects(ingested)
    _assert_refused_corrupt(velo(ingested, "refs"))
    _assert_refused_corrupt(velo(ingested, "gc", "--grace", "0"))
    assert stored_objects(ingested) == before


def test_a_missing_database_in_a_store_with_objects_is_manifest_corrupt(ingested: str) -> None:
    shutil.rmtree(os.path.join(ingested, "manifests.lmdb"))
    _assert_refused_corrupt(velo(ingested, "refs"))
    _assert_refused_corrupt(velo(ingested, "gc", "--grace", "0"))
    assert source_digests() <= stored_objects(ingested)
    assert not os.path.exists(os.path.join(ingested, "manifests.lmdb", "data.mdb"))


def test_a_store_whose_creation_was_killed_is_made_by_the_next_run(shm_tmp: str) -> None:
    """`init` killed after LMDB made the database file, before the schema commit: the next
    `init` finishes the store (it said "manifest-corrupt ... restore from a backup" for ever),
    and the store then works as one made in one go."""
    store = os.path.join(shm_tmp, "store")
    env = {**os.environ, "VELO_STORE": store, "VELO_INTERNAL__TEST_FAULT": "manifests.create:1"}
    killed = subprocess.run(
        [sys.executable, "-m", "veloverlay", "init"], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert os.path.getsize(os.path.join(store, "manifests.lmdb", "data.mdb")) > 0
    res = velo(store, "init")
    assert res.returncode == 0, res.stderr
    src = os.path.join(shm_tmp, "src")
    make_tree(src, FILES)  # type: ignore[arg-type]
    res = velo(store, "ingest", src, "--name", "t")
    assert res.returncode == 0, res.stderr
    assert source_digests() <= stored_objects(store)
    assert velo(store, "cat", "t", "a.txt").stdout == FILES["a.txt"].decode()
    assert velo(store, "fsck").returncode == 0


def test_an_unused_database_is_damage_in_a_store_that_counted_refs(shm_tmp: str) -> None:
    """A database with no schema and nothing in it is only taken for an unfinished creation
    while the store has no objects and its record counts no refs: an empty tree's ref has no
    object, and its store record still tells the loss."""
    store = os.path.join(shm_tmp, "store")
    empty = os.path.join(shm_tmp, "empty")
    os.makedirs(empty)
    assert velo(store, "init").returncode == 0
    assert velo(store, "ingest", empty, "--name", "e").returncode == 0
    assert stored_objects(store) == set()
    db = os.path.join(store, "manifests.lmdb")
    shutil.rmtree(db)
    import lmdb

    lmdb.open(db, max_dbs=8).close()
    _assert_refused_corrupt(velo(store, "init"))
    _assert_refused_corrupt(velo(store, "refs"))


def test_gc_refuses_when_refs_vanished_unless_told(shm_tmp: str) -> None:
    """An older copy of the database put back (the refs of the newer one are gone): gc must not
    sweep the objects only they reached, and fsck says refs were lost."""
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, FILES)  # type: ignore[arg-type]
    repo = Repo.open(store, create=True)
    repo.close()
    old = os.path.join(shm_tmp, "old.mdb")
    shutil.copyfile(os.path.join(store, "manifests.lmdb", "data.mdb"), old)
    repo = Repo.open(store)
    ingest(repo.store, repo.m, src, "t", jobs=1)
    repo.close()
    shutil.copyfile(old, os.path.join(store, "manifests.lmdb", "data.mdb"))
    before = stored_objects(store)
    repo = Repo.open(store)
    try:
        with pytest.raises(VeloError) as ei:
            gc(repo.store, repo.m, grace=0)
        assert ei.value.reason is Reason.MANIFEST_CORRUPT
        assert "accept-lost-refs" in (ei.value.hint or "")
        assert stored_objects(store) == before
        assert [f.kind for f in fsck(repo.store, repo.m, jobs=1).findings] == ["refs-lost"]
        rep = gc(repo.store, repo.m, grace=0, accept_lost_refs=True)
        assert rep.objects_deleted == len(before)
    finally:
        repo.close()
    res = velo(store, "gc", "--grace", "0")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "record", [b"garbage\xff", b'{"refs": -3}', b'{"ref": 1}', b"[1]", b"\x00\x01" * 32]
)
def test_a_damaged_store_record_is_no_licence_to_sweep(shm_tmp: str, record: bytes) -> None:
    """An older copy of the database put back and the store record damaged (a flipped bit,
    another file's bytes): the record read as absent, as in a store made before it, so gc swept
    every object only the lost ref reached and fsck said nothing. A damaged record is now
    `refs-lost` for fsck and gc refuses to sweep (`manifest-corrupt`) until
    --accept-lost-refs, which writes the record again."""
    store = os.path.join(shm_tmp, "store")
    make_tree(os.path.join(shm_tmp, "keep"), {"k": b"kept\n"})
    make_tree(os.path.join(shm_tmp, "src"), FILES)  # type: ignore[arg-type]
    repo = Repo.open(store, create=True)
    ingest(repo.store, repo.m, os.path.join(shm_tmp, "keep"), "keep", jobs=1)
    repo.close()
    old = os.path.join(shm_tmp, "old.mdb")
    shutil.copyfile(os.path.join(store, "manifests.lmdb", "data.mdb"), old)
    repo = Repo.open(store)
    ingest(repo.store, repo.m, os.path.join(shm_tmp, "src"), "t", jobs=1)
    repo.close()
    shutil.copyfile(old, os.path.join(store, "manifests.lmdb", "data.mdb"))
    with open(os.path.join(store, "manifests.record"), "wb") as f:
        f.write(record)
    before = stored_objects(store)
    assert source_digests() <= before
    res = velo(store, "gc", "--grace", "0")
    assert res.returncode == 1 and json.loads(res.stdout)["reason"] == "manifest-corrupt", res
    assert stored_objects(store) == before
    res = velo(store, "fsck")
    assert [f["kind"] for f in json.loads(res.stdout)["findings"]] == ["refs-lost"], res.stdout
    res = velo(store, "gc", "--grace", "0", "--accept-lost-refs")
    assert res.returncode == 0, res.stderr
    assert stored_objects(store) == before - source_digests()
    assert velo(store, "fsck").returncode == 0


def test_an_empty_store_record_is_no_damage(ingested: str) -> None:
    """What a crash between the record's creation and its first write leaves: read as none."""
    with open(os.path.join(ingested, "manifests.record"), "wb"):
        pass
    res = velo(ingested, "fsck")
    assert res.returncode == 0, res.stdout + res.stderr


def test_gc_sweeps_after_every_ref_was_deleted_on_purpose(ingested: str) -> None:
    repo = Repo.open(ingested)
    try:
        repo.delete_ref("t")
        rep = gc(repo.store, repo.m, grace=0)
        assert rep.objects_deleted == len(source_digests())
        assert fsck(repo.store, repo.m, jobs=1).ok
    finally:
        repo.close()
    assert stored_objects(ingested) == set()


def test_gc_refuses_an_old_store_without_a_record_whose_refs_are_gone(ingested: str) -> None:
    """Stores made before the record existed: no refs while objects exist is suspicious too."""
    os.unlink(os.path.join(ingested, "manifests.record"))
    m = Manifests(Repo.open(ingested).store)
    try:
        with m.write() as txn:  # the refs vanish without the record (as with an older build)
            txn.drop(m._refs, delete=False)
        with pytest.raises(VeloError) as ei:
            gc(m.store, m, grace=0)
        assert ei.value.reason is Reason.MANIFEST_CORRUPT
    finally:
        m.close()
    assert source_digests() <= stored_objects(ingested)


# -- item 2 and 12: entries and objects that lie, objects rewritten in place --------------------


def _rewrite_in_place(store: str, content: bytes, new: bytes) -> str:
    """Change an object's bytes behind the store's back (as its root-free owner can)."""
    h = hash_bytes(content).hex()
    path = os.path.join(store, "objects-v2", h[:2], h)
    unprotect(path)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(new)
    os.chmod(path, 0o444)
    return h


@pytest.mark.parametrize("verb", ["cat", "checkout", "export"])
def test_a_rewritten_object_is_refused_naming_it(ingested: str, shm_tmp: str, verb: str) -> None:
    h = _rewrite_in_place(ingested, FILES["d/e/c"], b"GAMMA")  # same size, other bytes
    out = os.path.join(shm_tmp, "out")
    args = {
        "cat": ["cat", "t", "d/e/c"],
        "checkout": ["checkout", "t", out],
        "export": ["export", "t", "-o", out],
    }[verb]
    res = velo(ingested, *args)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "reason: object-corrupt" in res.stderr and h in res.stderr, res.stderr
    assert "fsck" in res.stderr
    if verb == "checkout":  # the whole tree or nothing (what was sound is not left half-done)
        assert not os.path.lexists(out)
        assert not [n for n in os.listdir(shm_tmp) if ".velo-partial-" in n]
    if verb == "export":
        assert not os.path.exists(out) and not os.path.exists(out + ".part")


def test_cat_of_a_sound_object_is_its_bytes(ingested: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "veloverlay", "cat", "t", "d/b.bin"],
        env={**os.environ, "VELO_STORE": ingested},
        capture_output=True,
    )
    assert res.returncode == 0 and res.stdout == FILES["d/b.bin"]


def _lying_ref(repo: Repo, content: bytes, claim: int) -> None:
    """A ref whose file entry claims `claim` bytes for the object of `content` (written straight
    into the database: import refuses such a tree, an older build did not)."""
    from veloverlay.store.tree import Entry, Kind

    with repo.store.stage() as st:
        d = st.add_bytes(content)
        st.publish()
    with repo.m.write() as txn:
        root = repo.m.put_node(
            txn, 0o755, 1, [Entry(b"big", Kind.FILE, 0o644, claim, 1, d, b"", 2)]
        )
        repo.m.commit(txn, "lie", root, expect_head=None, message="lie")


@pytest.mark.corrupts_store
def test_fsck_and_checkout_catch_a_size_lie(repo: Repo, shm_tmp: str) -> None:
    _lying_ref(repo, b"sixsix", 1 << 40)
    findings = fsck(repo.store, repo.m, jobs=1).findings
    assert [(f.kind, f.what) for f in findings] == [("size-mismatch", hash_bytes(b"sixsix").hex())]
    out = os.path.join(shm_tmp, "co")
    with pytest.raises(VeloError) as ei:
        repo.checkout("lie", out)
    assert ei.value.reason is Reason.OBJECT_CORRUPT
    assert not os.path.lexists(out)  # the whole tree or nothing
    import io

    with pytest.raises(VeloError) as ei:
        repo.cat("lie", "big", io.BytesIO())
    assert ei.value.reason is Reason.OBJECT_CORRUPT


# -- item 11: export -o X ----------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device node needs root")
def test_export_writes_into_a_device_or_pipe_and_never_replaces_one(
    ingested: str, shm_tmp: str
) -> None:
    """`export -o /dev/null` as root renamed the bundle over /dev/null: a regular file 0600,
    and every later redirection to /dev/null on the machine wrote into it (every non-root
    spawn failed). A character device or FIFO is written into as it is; a symbolic link (which
    the rename would replace) and any other special file are refused."""
    null = os.path.join(shm_tmp, "null")
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the same device as /dev/null
    res = velo(ingested, "export", "t", "-o", null)
    assert res.returncode == 0, res.stderr
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.lstat(null).st_rdev == os.makedev(1, 3)
    assert not os.path.lexists(null + ".part")

    fifo = os.path.join(shm_tmp, "fifo")
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", fifo], stdout=subprocess.PIPE)
    res = velo(ingested, "export", "t", "-o", fifo)
    got, _ = reader.communicate(timeout=60)
    assert res.returncode == 0, res.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    whole = os.path.join(shm_tmp, "whole.velo")
    assert velo(ingested, "export", "t", "-o", whole).returncode == 0
    with open(whole, "rb") as f:
        assert got == f.read()  # the same bundle, byte for byte

    link = os.path.join(shm_tmp, "link")
    os.symlink(whole, link)
    block = os.path.join(shm_tmp, "block")
    os.mknod(block, stat.S_IFBLK | 0o600, os.makedev(7, 250))
    for target in (link, block):
        before = os.lstat(target)
        res = velo(ingested, "export", "t", "-o", target)
        assert res.returncode == 1 and "reason: exists" in res.stderr, res.stderr
        after = os.lstat(target)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert os.readlink(link) == whole


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a FIFO of another uid")
def test_export_refuses_another_users_pipe(ingested: str, shm_tmp: str) -> None:
    """`export -o /tmp/x.velo` wrote the bundle into whatever FIFO was at that name: another
    user who planted one in a sticky directory and read it got every file of the version, a
    0600 file of a private store too (the kernel's protected_fifos does not cover an open
    without O_CREAT). Now a pipe or device of another uid is refused, nothing is written to
    it, and the name is left as it was."""
    from tests.helpers.unpriv import UNPRIV_GID, UNPRIV_UID

    fifo = os.path.join(shm_tmp, "x.velo")
    os.mkfifo(fifo, 0o622)
    os.chown(fifo, UNPRIV_UID, UNPRIV_GID)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the other user's reader, waiting
    try:
        res = velo(ingested, "export", "t", "-o", fifo)
        try:
            stolen = os.read(rfd, 1 << 16)
        except BlockingIOError:
            stolen = b""
    finally:
        os.close(rfd)
    assert stolen == b""
    assert res.returncode == 1 and "reason: target-invalid" in res.stderr, res.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not os.path.lexists(fifo + ".part")


def test_an_exported_bundle_is_its_creators_alone(ingested: str, shm_tmp: str) -> None:
    """A bundle holds the bytes of every file of the version, a 0600 file's too: it is made
    0600 (not 0644 after the umask), also when it replaces an existing output file."""
    out = os.path.join(shm_tmp, "b.velo")
    res = velo(ingested, "export", "t", "-o", out)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    os.chmod(out, 0o644)  # an older bundle anyone could read: replaced by a private one
    res = velo(ingested, "export", "t", "-o", out)
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert not os.path.lexists(out + ".part")


def test_export_never_follows_a_planted_part_symlink(ingested: str, shm_tmp: str) -> None:
    victim = os.path.join(shm_tmp, "victim")
    with open(victim, "wb") as f:
        f.write(b"precious")
    out = os.path.join(shm_tmp, "b.velo")
    os.symlink(victim, out + ".part")
    res = velo(ingested, "export", "t", "-o", out)
    assert res.returncode == 1 and "reason: exists" in res.stderr, res.stderr
    with open(victim, "rb") as f:
        assert f.read() == b"precious"
    assert os.path.islink(out + ".part") and not os.path.exists(out)
    os.unlink(out + ".part")
    res = velo(ingested, "export", "t", "-o", out)
    assert res.returncode == 0, res.stderr
    assert not os.path.lexists(out + ".part")
    dst = Repo.open(os.path.join(shm_tmp, "dst"), create=True)
    try:
        from veloverlay.store.bundle import import_bundle

        with open(out, "rb") as f:
            import_bundle(dst.store, dst.m, f)
        assert dst.resolve_root("t") == Repo.open(ingested).resolve_root("t")
    finally:
        dst.close()


# -- item 3: depth -------------------------------------------------------------------------------


def test_diff_apply_and_merge_of_a_deep_tree_need_no_recursion(repo: Repo) -> None:
    """1500 levels (deeper than Python's recursion limit; such trees exist in stores made before
    the depth bound): diff, apply and three-way merge walk them with explicit stacks."""
    from veloverlay.store.merge import three_way
    from veloverlay.store.tree import Entry, Kind, Op, OpKind

    with repo.store.stage() as st:
        a, b = st.add_bytes(b"a"), st.add_bytes(b"b")
        st.publish()
    deep = b"/".join([b"d"] * 1500)
    with repo.m.write() as txn:
        f = Entry(b"f", Kind.FILE, 0o644, 1, 1, a, b"", 2)
        base = repo.m.put_node(txn, 0o755, 1, [f])
        for _ in range(1500):
            base = repo.m.put_node(txn, 0o755, 1, [Entry(b"d", Kind.DIR, digest=base)])
        ours = repo.m.apply(txn, base, [Op(OpKind.PUT, deep + b"/g", f)])
        theirs = repo.m.apply(
            txn, base, [Op(OpKind.PUT, deep + b"/f", f.replace(digest=b, size=1))]
        )
        ops = repo.m.diff(txn, base, ours)
        assert [(o.kind, o.path) for o in ops] == [(OpKind.PUT, deep + b"/g")]
        res = three_way(repo.m, txn, base, ours, theirs)
        assert res.root is not None
        got = repo.m.lookup(txn, res.root, deep + b"/f")
        assert got is not None and got.digest == b
        assert repo.m.lookup(txn, res.root, deep + b"/g") is not None


# -- items 4 and 5: a read-only store, and the store as a session sees it ------------------------


def _commands_on_a_read_only_store(store: str, out: str, session: str | None) -> list[object]:
    from veloverlay import mount, ns

    ns.enter_userns(map_root=True)
    mount.make_rprivate("/")
    mount.bind(store, store, readonly=True)
    env = {**os.environ, "VELO_STORE": store, "NO_COLOR": "1"}
    env.pop("VELO_SESSION", None)
    if session is not None:
        env["VELO_SESSION"] = session
    results: list[object] = []
    for args in (
        ["refs"],
        ["ls", "-r", "t"],
        ["cat", "t", "a.txt"],
        ["log", "t"],
        ["diff", "t", "t"],
        ["fsck"],
        ["checkout", "t", out],
        ["gc", "--dry-run", "--grace", "0"],
        ["ingest", out, "--name", "u"],
        ["refs", "--delete", "t"],
        ["gc", "--grace", "0"],
    ):
        p = subprocess.run(
            [sys.executable, "-m", "veloverlay", "--json", *args],
            env=env,
            capture_output=True,
            text=True,
        )
        results.append((args[0], p.returncode, p.stdout, p.stderr))
    return results


@pytest.mark.needs("userns")
@pytest.mark.parametrize("inside", [False, True], ids=["read-only-fs", "inside-a-session"])
def test_reads_work_on_a_read_only_store_and_writes_say_why(
    ingested: str, shm_tmp: str, inside: bool
) -> None:
    from veloverlay import ns

    out = os.path.join(shm_tmp, "co")
    results = ns.run_in_child(
        _commands_on_a_read_only_store, ingested, out, "s123" if inside else None
    )
    for verb, rc, stdout, stderr in results[:8]:  # type: ignore[misc]
        assert rc == 0, (verb, stdout, stderr)
    assert json.loads(results[7][2])["dry_run"] is True  # type: ignore[index]
    assert results[2][2] == FILES["a.txt"].decode()  # type: ignore[index]
    with open(os.path.join(out, "d", "b.bin"), "rb") as f:
        assert f.read() == FILES["d/b.bin"]
    for verb, rc, _stdout, stderr in results[8:]:  # type: ignore[misc]
        assert rc == 1, (verb, stderr)
        assert "reason: store-read-only" in stderr, (verb, stderr)
        if inside:
            assert "inside the veloverlay session s123" in stderr, stderr
        else:
            assert "read-only" in stderr and "Traceback" not in stderr, stderr
    repo = Repo.open(ingested)  # nothing changed
    try:
        assert [r.name for r, _c in repo.refs()] == ["t"]
    finally:
        repo.close()
    assert source_digests() <= stored_objects(ingested)


# -- item 7: who can read a store ----------------------------------------------------------------


def _read_as_other_user(store: str, digest_hex: str) -> dict[str, object]:
    out: dict[str, object] = {}
    obj = os.path.join(store, "objects-v2", digest_hex[:2], digest_hex)
    try:
        with open(obj, "rb") as f:
            out["object"] = f.read()
    except OSError as exc:
        out["object"] = exc.errno
    env = {**os.environ, "VELO_STORE": store, "NO_COLOR": "1"}
    pub = os.path.join(os.path.dirname(store), "pub")
    for verb in (["cat", "t", "secret"], ["ingest", pub, "--name", "x"]):
        p = subprocess.run(
            [sys.executable, "-m", "veloverlay", "--json", *verb],
            env=env,
            capture_output=True,
            text=True,
        )
        out[verb[0]] = (p.returncode, p.stdout, p.stderr)
    return out


@pytest.mark.parametrize("made", ["by-init", "empty-dir"])
@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_a_new_store_is_private_unless_shared(shared: bool, made: str) -> None:
    """A 0600 secret ingested by its owner must not become readable by every local user through
    the store (objects are 0444 and named by content). A shared store is readable by all, and
    writable only by its owner. A store made in an empty directory the user made first (mkdir
    under umask 022: 0755, then `--store DIR`) is a new store too: it kept 0755, and every
    local user read the secret's object."""
    import errno

    from tests.helpers.unpriv import run_unprivileged, unpriv_tmpdir
    from veloverlay.store.cas import Store

    if os.geteuid() != 0:
        pytest.skip("needs a second user: runs as root, reading as the root-free tests' uid")
    with unpriv_tmpdir() as base:
        src = os.path.join(base, "src")
        make_tree(src, {"secret": b"s3cret"})
        make_tree(os.path.join(base, "pub"), {"p": b"public"})
        os.chmod(src, 0o700)
        os.chmod(os.path.join(src, "secret"), 0o600)
        store = os.path.join(base, "store")
        if made == "empty-dir":
            os.mkdir(store)
            os.chmod(store, 0o755)
        Store.init(store, shared=shared)
        repo = Repo.open(store)
        try:
            res = ingest(repo.store, repo.m, src, "t", jobs=1)
        finally:
            repo.close()
        assert os.stat(store).st_mode & 0o777 == (0o755 if shared else 0o700)
        # told: the 0700 root and the 0600 secret, now every user's in a shared store
        assert res.exposed == (2 if shared else 0)
        got = run_unprivileged(_read_as_other_user, store, hash_bytes(b"s3cret").hex())
    if shared:
        assert got["object"] == b"s3cret"
        assert got["cat"][:2] == (0, "s3cret"), got["cat"]  # type: ignore[index]
        rc, _out, err = got["ingest"]  # type: ignore[misc]
        assert rc == 1 and "reason: store-permission" in err, err
    else:
        assert got["object"] == errno.EACCES
        rc, _out, err = got["cat"]  # type: ignore[misc]
        assert rc == 1 and "reason: store-permission" in err, err


# -- item 8: root and a store others can write ---------------------------------------------------


@pytest.mark.parametrize("where", ["lock", "manifests.lmdb/lock.mdb", "tmp"])
def test_root_never_follows_a_symlink_planted_in_the_store(
    ingested: str, shm_tmp: str, where: str
) -> None:
    target = os.path.join(shm_tmp, "planted-target")
    path = os.path.join(ingested, where)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)
    for args in (["refs"], ["gc", "--grace", "0"], ["ingest", shm_tmp + "/src", "--name", "u"]):
        res = velo(ingested, *args)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert "reason: store-unsafe" in res.stderr, (args, res.stderr)
        assert not os.path.lexists(target), args
    assert source_digests() <= stored_objects(ingested)


def test_root_refuses_a_store_another_user_can_write(ingested: str, shm_tmp: str) -> None:
    from tests.helpers.unpriv import UNPRIV_UID

    if os.geteuid() != 0:
        pytest.skip("only root refuses (anyone else could not write into root's files anyway)")
    for d, change in (
        (ingested, lambda p: os.chown(p, UNPRIV_UID, -1)),
        (os.path.join(ingested, "objects-v2"), lambda p: os.chmod(p, 0o777)),
        (os.path.join(ingested, "manifests.lmdb"), lambda p: os.chmod(p, 0o775)),
    ):
        st = os.stat(d)
        change(d)
        try:
            res = velo(ingested, "refs")
            assert res.returncode == 1, res.stdout
            assert "reason: store-unsafe" in res.stderr and d in res.stderr, res.stderr
            assert "hint:" in res.stderr
        finally:
            os.chown(d, st.st_uid, st.st_gid)
            os.chmod(d, st.st_mode & 0o7777)
    assert velo(ingested, "refs").returncode == 0


# -- tests that kill mutants the suite let live ------------------------------------------------


def test_publish_syncs_before_and_after_naming_objects(
    repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durability order is syncfs -> rename -> syncfs: no object gets its name before its
    bytes are durable (a power cut would leave a named, torn object that ingest trusts because
    the name exists), and the caller commits only after the names are durable."""
    from veloverlay import _libc

    events: list[str] = []
    objects_dir = os.fspath(repo.store.objects)
    real_syncfs, real_rename = _libc.syncfs, os.rename

    def syncfs(fd: int) -> None:
        events.append("syncfs")
        real_syncfs(fd)

    def rename(src: object, dst: object, *a: object, **kw: object) -> None:
        if os.fsdecode(dst).startswith(objects_dir):  # type: ignore[arg-type]
            assert not os.path.exists(os.fsdecode(dst))  # type: ignore[arg-type]
            events.append("rename")
        real_rename(src, dst, *a, **kw)  # type: ignore[arg-type]

    real_renameat2 = _libc.renameat2

    def renameat2(olddfd: int, old: bytes, newdfd: int, new: bytes, flags: int) -> None:
        events.append("rename")  # relative to the objects directory: always an object's name
        real_renameat2(olddfd, old, newdfd, new, flags)

    monkeypatch.setattr(_libc, "syncfs", syncfs)
    monkeypatch.setattr(_libc, "renameat2", renameat2)
    monkeypatch.setattr(os, "rename", rename)
    with repo.store.stage() as st:
        digests = [st.add_bytes(b"one"), st.add_bytes(b"two"), st.add_bytes(b"three")]
        assert events == []  # staging alone names nothing
        assert not any(repo.store.has(d) for d in digests)
        st.publish()
    assert events == ["syncfs", "rename", "rename", "rename", "syncfs"]
    for d, content in zip(digests, (b"one", b"two", b"three"), strict=True):
        assert repo.store.read_object(d) == content


def test_reingest_sees_a_file_rewritten_in_place_with_its_mtime_restored(
    repo: Repo, shm_tmp: str
) -> None:
    """Same size, same inode, mtime put back (as `cp -p`, rsync or a careful tool does): only the
    ctime says the file changed, and the stat cache must not take the old digest for it."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"f": b"version-1", "g": b"unchanged"})
    old = 1_500_000_000_000_000_000  # far from the scan: not in the racy window
    for n in ("f", "g", ""):  # (a racy directory is not cached at all)
        os.utime(os.path.join(src, n), ns=(old, old))
    ingest(repo.store, repo.m, src, "t", jobs=1)
    assert ingest(repo.store, repo.m, src, "t", jobs=1).unchanged  # the cache is in use
    ino = os.stat(os.path.join(src, "f")).st_ino
    with open(os.path.join(src, "f"), "r+b") as f:
        f.write(b"version-2")
    os.utime(os.path.join(src, "f"), ns=(old, old))
    st = os.stat(os.path.join(src, "f"))
    assert (st.st_ino, st.st_size, st.st_mtime_ns) == (ino, 9, old)
    res = ingest(repo.store, repo.m, src, "t", jobs=1)
    import io

    for n in ("f", "g"):
        buf = io.BytesIO()
        repo.cat("t", n, buf)
        with open(os.path.join(src, n), "rb") as f:
            assert buf.getvalue() == f.read(), n
    assert res.new_objects == 1


# -- item 10: root's objects are immutable from the moment they are named ------------------------


def test_as_root_every_object_is_immutable_when_named(ingested: str, shm_tmp: str) -> None:
    """A hard link made to an object (before any session projected it) must not let anyone,
    root included, change the object's bytes."""
    import errno

    from veloverlay import fsflags

    if os.geteuid() != 0:
        pytest.skip("only root may set +i (a root-free store is checked by fsck instead)")
    if not inode_flags_at(ingested):
        pytest.skip("the store's filesystem has no inode flags (tmpfs before Linux 6.0)")
    names = stored_objects(ingested)
    assert names == source_digests()
    for h in names:
        assert fsflags.is_immutable(os.path.join(ingested, "objects-v2", h[:2], h)), h
    h = hash_bytes(FILES["a.txt"]).hex()
    obj = os.path.join(ingested, "objects-v2", h[:2], h)
    with pytest.raises(OSError) as ei:
        os.link(obj, os.path.join(ingested, "tmp", "alias"))
    assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError) as ei:
        open(obj, "r+b").close()
    assert ei.value.errno == errno.EPERM
    with open(obj, "rb") as f:
        assert f.read() == FILES["a.txt"]


@pytest.mark.parametrize("code", ["EPERM", "EOPNOTSUPP"])
def test_a_failed_immutable_flag_at_naming_is_recorded_shown_and_repaired(
    shm_tmp: str, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """STYLE B6: where real root cannot set +i on a new object (a dropped capability, a
    filesystem without inode flags) the failure is recorded, `status` says so, and `fsck
    --repair` sets the flag and clears the record once every object carries it."""
    import errno

    from veloverlay import fsflags
    from veloverlay.store import publish

    if not fsflags.may_set_immutable():
        pytest.skip("only real root sets +i at naming (root-free stores are not meant to)")
    if not inode_flags_at(shm_tmp):
        pytest.skip("this test's tmpfs has no inode flags (tmpfs before Linux 6.0)")
    real = fsflags.set_immutable_at

    def refuse(dir_fd: int | None, name: bytes, on: bool = True) -> None:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), name)

    def refuse_fd(fd: int, name: bytes, on: bool = True) -> None:
        refuse(None, name, on)

    monkeypatch.setattr(fsflags, "set_immutable_at", refuse)
    monkeypatch.setattr(fsflags, "set_immutable_fd", refuse_fd)  # an object named from its fd
    monkeypatch.setattr(publish, "_flags_missing", set())
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, FILES)  # type: ignore[arg-type]
    repo = Repo.open(store, create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
        recorded = publish.unprotected(repo.store)
    finally:
        repo.close()
    names = stored_objects(store)
    paths_ = [os.path.join(store, "objects-v2", h[:2], h) for h in names]
    assert not any(has_immutable(p) for p in paths_)
    if code == "EPERM":  # one line per object
        assert sorted(recorded) == sorted((h, "EPERM") for h in names)
    else:  # the filesystem has no flags: said once, then not tried again in this process
        assert recorded == [("*", errno.errorcode[errno.EOPNOTSUPP])]  # ENOTSUP on Linux
    monkeypatch.setattr(fsflags, "set_immutable_at", real)
    status = velo(store, "status")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)["unprotected"]
    assert sorted((u["object"], u["errno"]) for u in shown) == sorted(recorded)
    human = subprocess.run(
        [sys.executable, "-m", "veloverlay", "status"],
        env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
    )
    assert "warning:" in human.stdout and "chattr +i" in human.stdout, human.stdout
    check = velo(store, "fsck")
    report = json.loads(check.stdout)["immutable"]
    assert report["expected"] is True and report["missing"] == len(names), report
    repaired = velo(store, "fsck", "--repair")
    assert repaired.returncode == 0, repaired.stderr
    report = json.loads(repaired.stdout)["immutable"]
    assert report["repaired"] == len(names) and report["missing"] == 0, report
    assert all(fsflags.is_immutable(p) for p in paths_)
    assert json.loads(velo(store, "status").stdout)["unprotected"] == []


@pytest.mark.parametrize("planted", ["directory", "fifo"])
def test_a_failed_unprotected_record_is_reported_as_its_write(
    shm_tmp: str, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """When +i is refused and the UNPROTECTED record cannot be written either, the error names
    the record's write (not the object's rename, which succeeded), and every object named so far
    is whole: P0-a holds for what the failed ingest left. A FIFO in the record's place (no
    reader) fails the same way instead of blocking the ingest for ever."""
    import errno

    from veloverlay import fsflags
    from veloverlay.errors import SysError
    from veloverlay.store import publish

    if not fsflags.may_set_immutable():
        pytest.skip("only real root sets +i at naming (root-free stores are not meant to)")

    def refuse(dir_fd: int | None, name: bytes, on: bool = True) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), name)

    def refuse_fd(fd: int, name: bytes, on: bool = True) -> None:
        refuse(None, name, on)

    monkeypatch.setattr(fsflags, "set_immutable_at", refuse)
    monkeypatch.setattr(fsflags, "set_immutable_fd", refuse_fd)  # an object named from its fd
    monkeypatch.setattr(publish, "_flags_missing", set())
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, FILES)  # type: ignore[arg-type]
    repo = Repo.open(store, create=True)
    try:
        record = os.path.join(store, publish.UNPROTECTED)  # cannot be opened to write
        os.mkdir(record) if planted == "directory" else os.mkfifo(record)
        with pytest.raises(SysError) as ei:
            ingest(repo.store, repo.m, src, "t", jobs=1)
        want = errno.EINVAL if planted == "directory" else errno.ENXIO  # (not a regular file)
        assert ei.value.syscall == "write" and ei.value.errno == want, ei.value
        assert repo.refs() == []
    finally:
        repo.close()
    names = stored_objects(store)
    assert names, "the object whose record failed is named"
    for h in names:
        with open(os.path.join(store, "objects-v2", h[:2], h), "rb") as f:
            assert hash_bytes(f.read()).hex() == h


def _deep_dir(root: str, levels: int, name: str = "d") -> None:
    """root/d/d/.../d/f, `levels` directories deep (made fd-relative: the path is too long)."""
    os.mkdir(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)


@pytest.mark.parametrize(("levels", "name"), [(600, "d"), (3000, "d"), (20, "n" * 250)])
def test_ingest_refuses_a_tree_beyond_the_depth_bound(
    repo: Repo, shm_tmp: str, levels: int, name: str
) -> None:
    """Too deep, or a path longer than PATH_MAX: too-deep, nothing committed, no traceback."""
    src = os.path.join(shm_tmp, "deep")
    _deep_dir(src, levels, name)
    with pytest.raises(VeloError) as ei:
        ingest(repo.store, repo.m, src, "deep", jobs=1)
    assert ei.value.reason is Reason.TOO_DEEP
    assert repo.refs() == []


def test_force_rmtree_removes_any_depth(shm_tmp: str) -> None:
    """The product's force_rmtree (layers, sessions, the per-boot cache) must not recurse: a
    3000-level tree with 0555 and 000 directories goes entirely."""
    from veloverlay.files import force_rmtree

    root = os.path.join(shm_tmp, "deep")
    _deep_dir(root, 3000)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(3000):  # lock some levels down as a session might have left them
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        if i % 7 == 0:
            os.chmod(child, 0o555)
        os.close(fd)
        fd = child
    os.close(fd)
    force_rmtree(root)
    assert not os.path.lexists(root)


def test_the_store_path_itself_may_be_a_link_the_user_chose(ingested: str, shm_tmp: str) -> None:
    alias = os.path.join(shm_tmp, "alias")
    os.symlink(ingested, alias)
    res = velo(alias, "refs")
    assert res.returncode == 0, res.stderr
    assert [r["name"] for r in json.loads(res.stdout)] == ["t"]


def _plant_link(at: str, to: str) -> None:
    os.symlink(to, at)


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_root_never_follows_another_users_link_to_a_store(shared: bool) -> None:
    """A user who can write the directory where root keeps (or is about to init) a store
    plants `store -> /some/root-only/dir`: root followed it, `init --shared` chmodded that
    directory go+rx (before it checked anything) and filled it with a store."""
    import tempfile

    from tests.helpers.unpriv import run_unprivileged, unpriv_tmpdir
    from veloverlay.store.cas import Store

    if os.geteuid() != 0:
        pytest.skip("only root refuses another user's link")
    secret = tempfile.mkdtemp(prefix="velo-test-secret-", dir="/dev/shm")
    try:
        with unpriv_tmpdir() as base:
            link = os.path.join(base, "store")
            run_unprivileged(_plant_link, link, secret)
            with pytest.raises(VeloError) as exc:
                Store.init(link, shared=shared)
            assert exc.value.reason is Reason.STORE_UNSAFE and "uid" in str(exc.value)
            assert os.stat(secret).st_mode & 0o777 == 0o700
            assert os.listdir(secret) == []
    finally:
        shutil.rmtree(secret)


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_ingest_says_what_a_shared_store_opens_to_every_user(shared: bool, shm_tmp: str) -> None:
    """Files other users could not read at the source (0600, 0640) and a directory they could not
    enter (0700) are counted, warned about and given as `exposed` by an ingest into a shared
    store, where every local user can read them; a private store says nothing."""
    src = os.path.join(shm_tmp, "src")
    make_tree(
        src,
        {"pub": b"p", "key": b"k", "team": b"t", "priv/inside": b"i", "open/x": b"x"},
    )
    os.chmod(os.path.join(src, "key"), 0o600)
    os.chmod(os.path.join(src, "team"), 0o640)
    os.chmod(os.path.join(src, "priv"), 0o700)
    store = os.path.join(shm_tmp, "store")
    assert velo(store, "init", *(["--shared"] if shared else [])).returncode == 0
    text = subprocess.run(
        [sys.executable, "-m", "veloverlay", "ingest", src, "-n", "t"],
        env={**os.environ, "VELO_STORE": store, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
    )
    assert text.returncode == 0, text.stderr
    as_json = velo(store, "ingest", src, "-n", "u")  # --json
    assert as_json.returncode == 0, as_json.stderr
    if shared:
        assert "warning: 3 files or directories other users could not read" in text.stderr
        assert json.loads(as_json.stdout)["exposed"] == 3
    else:
        assert "warning" not in text.stderr, text.stderr
        assert json.loads(as_json.stdout)["exposed"] == 0


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("lock", "store-unsafe"),
        ("lock.gate", "store-unsafe"),
        ("manifests.record", "store-unsafe"),
        ("manifests.record.lock", "store-unsafe"),
    ],
)
def test_a_directory_in_place_of_a_store_file_is_refused_by_name(
    ingested: str, shm_tmp: str, name: str, reason: str
) -> None:
    """A directory where the store's lock, gate, record or record lock belongs: a FIFO there
    was refused as 'not a regular file', but a directory made the write's open fail with a
    bare '[Errno 21] Is a directory: 'lock'' (os-error) or, for the gate, 'create the store
    ...: Is a directory' with a hint to choose another store. files.open_regular now takes
    EISDIR for what it is: no regular file. Nothing is committed (an object named before the
    commit was refused is gc's) and the store stays whole."""
    path = os.path.join(ingested, name)
    os.unlink(path)
    os.mkdir(path)
    make_tree(os.path.join(shm_tmp, "other"), {"o": b"other\n"})
    res = velo(ingested, "ingest", os.path.join(shm_tmp, "other"), "--name", "o")
    assert res.returncode == 1, res
    got = json.loads(res.stdout)
    assert got["reason"] == reason and "not a regular file" in got["error"], got
    assert name in got["error"] and got["hint"], got
    # the database is sound: no hint to restore it (the record and its lock sent users to)
    assert "manifests.lmdb" not in got["hint"] and "restore" not in got["hint"], got
    os.rmdir(path)
    refs = velo(ingested, "refs")
    assert [r["name"] for r in json.loads(refs.stdout)] == ["t"], refs.stdout
    assert velo(ingested, "fsck").returncode == 0
