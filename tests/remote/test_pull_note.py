"""A pulled ref and the note of where it came from (`remote-v1/versions-v1.json`) go together.
The note was written after the ref's commit: a full disk, or a kill, between the two left a ref
that had moved without its note, and every later pull of it refused (other-source) until
--force. The note now comes first, for the lineage the ref has or gets, so one whose commit
never came vouches for no ref — not for one the user makes later under that name either."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from tests.helpers.cli import TOP
from tests.helpers.fulldisk import fill, private_tmpfs
from tests.helpers.trees import make_tree
from tests.remote.fake_registry import FakeRegistry, file_entry, one_dir
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.remote import Options, pull
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

OPTS = Options(retries=0, timeout=10, backoff=0.01)


def _serve(fake: FakeRegistry, data: bytes, tag: str) -> None:
    root, nodes = one_dir([file_entry(b"f", data)])
    fake.serve_version(nodes, {hash_bytes(data): data}, root, tag=tag, config={"ref": "env"})


def _cat(repo: Repo, ref: str, shm_tmp: str, name: str) -> bytes:
    out = os.path.join(shm_tmp, name)
    repo.checkout(ref, out)
    with open(os.path.join(out, "f"), "rb") as f:
        return f.read()


def _killed_at(fault: str, code: str, repo: Repo, arg: str) -> subprocess.CompletedProcess[bytes]:
    """Run `code` (a Repo `r` of this store is open, `arg` is sys.argv[2]) in a process that
    the crash point `fault` kills the first time it is reached."""
    script = (
        f"import sys\nfrom veloverlay.verbs.repo import Repo\nr = Repo.open(sys.argv[1])\n{code}\n"
    )
    env = {**os.environ, "PYTHONPATH": TOP, "VELO_INTERNAL__TEST_FAULT": f"{fault}:1"}
    return subprocess.run(
        [sys.executable, "-c", script, str(repo.store.root), arg],
        env=env,
        capture_output=True,
        timeout=120,
    )


def _killed_before_commit(repo: Repo, remote: str) -> subprocess.CompletedProcess[bytes]:
    code = (
        "from veloverlay.remote import Options, pull\n"
        "pull(r.store, r.m, sys.argv[2], options=Options(retries=0, timeout=10))"
    )
    return _killed_at("remote.pull.noted", code, repo, remote)


def test_a_pull_killed_between_note_and_commit(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    _serve(fake, b"one\n", "v1")
    _serve(fake, b"two\n", "v2")
    # a new ref: killed before its commit, nothing moved; the note vouches for no ref of the
    # name made later (here the user's own, ingested)
    proc = _killed_before_commit(repo, fake.remote("v1"))
    assert proc.returncode == -9, proc.stderr.decode()
    with repo.m.read() as txn:
        assert repo.m.get_ref(txn, "env") is None
    src = os.path.join(shm_tmp, "mine")
    make_tree(src, {"f": b"mine\n"})
    ingest(repo.store, repo.m, src, "env", jobs=1)
    with pytest.raises(VeloError) as ei:
        pull(repo.store, repo.m, fake.remote("v1"), options=OPTS)
    assert ei.value.reason is Reason.OTHER_SOURCE, ei.value
    assert src in ei.value.message, ei.value  # where it came from: not the registry
    assert _cat(repo, "env", shm_tmp, "a") == b"mine\n"
    repo.delete_ref("env")
    # a pulled ref: killed before the next version's commit, it keeps the version it had, and
    # the next pull of the same registry needs no --force
    pull(repo.store, repo.m, fake.remote("v1"), options=OPTS)
    proc = _killed_before_commit(repo, fake.remote("v2"))
    assert proc.returncode == -9, proc.stderr.decode()
    assert _cat(repo, "env", shm_tmp, "b") == b"one\n"
    pull(repo.store, repo.m, fake.remote("v2"), options=OPTS)
    assert _cat(repo, "env", shm_tmp, "c") == b"two\n"


def _forced_pull_on_a_disk_filled_before_commit(base: str, remote: str) -> dict[str, object]:
    from veloverlay import faults

    mnt = private_tmpfs(base, "3m")
    repo = Repo.open(os.path.join(mnt, "store"), create=True)
    # pages LMDB freed (a ref pulled and deleted): a commit can fit where no file can
    pull(repo.store, repo.m, remote, name="warm", options=OPTS)
    repo.delete_ref("warm")
    src = os.path.join(base, "mine")
    make_tree(src, {"f": b"mine\n"})
    ingest(repo.store, repo.m, src, "env", jobs=1)
    out: dict[str, object] = {}
    filler = os.path.join(mnt, "filler")
    real = faults.point

    def full_here(name: str) -> None:  # the disk fills up just before the ref would move
        if name == "remote.pull.fetched":
            out["filler"] = fill(filler)
        real(name)

    faults.point = full_here
    try:
        pull(repo.store, repo.m, remote, options=OPTS, force=True)
        out["first"] = "ok"
    except VeloError as exc:
        out["first"] = exc.reason.value
    finally:
        faults.point = real
    os.unlink(filler)
    out["f"] = _cat(repo, "env", base, "out")
    try:  # the same registry again, without --force
        pull(repo.store, repo.m, remote, options=OPTS)
        out["again"] = "ok"
    except VeloError as exc:
        out["again"] = exc.reason.value
    repo.close()
    return out


def test_a_forced_pull_on_a_disk_that_fills_before_its_commit(
    fake: FakeRegistry, shm_tmp: str
) -> None:
    """Either the pull fails with store-full and the user's ref is as it was (the next pull
    without --force is refused again), or it moved the ref and noted where from (the next pull
    of that registry needs no --force). The old order moved the ref, then failed to note it:
    store-full said nothing was committed, yet the ref held the registry's version and only
    another --force could update it."""
    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    _serve(fake, b"one\n", "v1")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_forced_pull_on_a_disk_filled_before_commit, shm_tmp, fake.remote("v1"))
    assert out["filler"] == errno.ENOSPC, out
    if out["first"] == "store-full":
        assert out["f"] == b"mine\n" and out["again"] == "other-source", out
    else:
        assert out["first"] == "ok" and out["f"] == b"one\n" and out["again"] == "ok", out


def _killed_deleting(repo: Repo, ref: str) -> subprocess.CompletedProcess[bytes]:
    return _killed_at("refs.delete.forgotten", "r.delete_ref(sys.argv[2])", repo, ref)


def test_a_ref_delete_killed_between_its_notes_and_its_ref(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    """The notes go first: killed in between, the ref is there without them (a pull of it needs
    --force: nothing moves unasked), never notes without their ref; the delete again finishes."""
    from veloverlay.remote.state import Versions

    _serve(fake, b"one\n", "v1")
    _serve(fake, b"two\n", "v2")
    pull(repo.store, repo.m, fake.remote("v1"), options=OPTS)
    assert Versions(repo.store).get(f"http://{fake.host}", "env") is not None
    proc = _killed_deleting(repo, "env")
    assert proc.returncode == -9, proc.stderr.decode()
    assert Versions(repo.store).get(f"http://{fake.host}", "env") is None
    assert _cat(repo, "env", shm_tmp, "a") == b"one\n"  # the ref is whole
    with pytest.raises(VeloError) as ei:
        pull(repo.store, repo.m, fake.remote("v2"), options=OPTS)
    assert ei.value.reason is Reason.OTHER_SOURCE, ei.value
    repo.delete_ref("env")
    with repo.m.read() as txn:
        assert repo.m.get_ref(txn, "env") is None


def test_a_pull_that_notes_the_ref_while_it_is_deleted(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    """A pull started between the delete's forgetting and its delete: its note waits for the
    delete (the notes' lock is held until the ref is gone), then it makes the ref anew, and
    the ref it made is vouched for by its note, whichever came first."""
    import threading

    from veloverlay import faults
    from veloverlay.remote.state import Versions

    _serve(fake, b"one\n", "v1")
    _serve(fake, b"two\n", "v2")
    pull(repo.store, repo.m, fake.remote("v1"), options=OPTS)
    real = faults.point
    seen: list[str] = []
    errors: list[BaseException] = []

    def pulling() -> None:
        try:
            pull(repo.store, repo.m, fake.remote("v2"), options=OPTS, force=True)
        except BaseException as exc:  # (re-raised below)
            errors.append(exc)

    puller = threading.Thread(target=pulling)

    def meanwhile(name: str) -> None:
        if name == "refs.delete.forgotten":
            seen.append(name)
            puller.start()
        real(name)

    faults.point = meanwhile
    try:
        repo.delete_ref("env")
    finally:
        faults.point = real
        if seen:
            puller.join(60)
    assert seen, "the delete has no point between its notes and its ref"
    assert not puller.is_alive() and not errors, errors
    with repo.m.read() as txn:
        ref = repo.m.get_ref(txn, "env")
    assert ref is not None and _cat(repo, "env", shm_tmp, "b") == b"two\n"
    assert Versions(repo.store).source(f"http://{fake.host}", ref) == "team/env"


def test_a_pull_whose_ref_is_deleted_before_its_last_note(fake: FakeRegistry, repo: Repo) -> None:
    """A pull commits the ref, then notes its head; a `refs --delete` in between (run here from
    the pull's call of `Versions.set` for the head, before it writes) left a note of a ref that
    was gone: the delete's forgetting was over. The note now checks, under the notes' lock that
    the delete holds until the ref is gone, that the ref is still the one it noted."""
    from veloverlay.remote.state import Versions

    _serve(fake, b"one\n", "v1")
    real = Versions.set
    deleted: list[str] = []

    def set_after_a_delete(self: Versions, *args: object, **kw: object) -> None:
        if len(args) >= 6 and args[5] is not None and not deleted:  # the head's note
            deleted.append(str(args[1]))
            repo.delete_ref(str(args[1]))
        real(self, *args, **kw)  # type: ignore[arg-type]

    Versions.set = set_after_a_delete  # type: ignore[method-assign]
    try:
        pull(repo.store, repo.m, fake.remote("v1"), options=OPTS)
    finally:
        Versions.set = real  # type: ignore[method-assign]
    assert deleted == ["env"]
    with repo.m.read() as txn:
        assert repo.m.get_ref(txn, "env") is None
    assert Versions(repo.store).load().get(f"http://{fake.host}", {}).get("env") is None


def test_nothing_exclusive_runs_in_the_middle_of_a_ref_delete(
    fake: FakeRegistry, repo: Repo
) -> None:
    """`refs --delete` took no store lock, unlike every other ref writer: gc, `fsck --repair`
    and `remove-store` (the store lock, exclusive) ran in the middle of it. gc with
    --accept-lost-refs writes the ref count it read to the store record (a delete in between
    leaves it above the truth), and remove-store removed the store under the delete. Now the
    delete holds the store lock shared: at its point between the notes and the ref, gc waits
    (here: its timeout ends, `locked`) and remove-store is refused (`locked`)."""
    from veloverlay import faults
    from veloverlay.remote.state import Versions
    from veloverlay.verbs.gc import gc
    from veloverlay.verbs.repo import remove_store

    _serve(fake, b"one\n", "v1")
    pull(repo.store, repo.m, fake.remote("v1"), options=OPTS)
    real = faults.point
    got: dict[str, Reason | None] = {}

    def meanwhile(name: str) -> None:
        if name == "refs.delete.forgotten":
            for what, run in (
                ("gc", lambda: gc(repo.store, repo.m, grace=0, accept_lost_refs=True, timeout=0.3)),
                ("remove-store", lambda: remove_store(repo.store.root, force=True)),
            ):
                try:
                    run()
                    got[what] = None
                except VeloError as exc:
                    got[what] = exc.reason
        real(name)

    faults.point = meanwhile
    try:
        repo.delete_ref("env")
    finally:
        faults.point = real
    assert got == {"gc": Reason.LOCKED, "remove-store": Reason.LOCKED}, got
    with repo.m.read() as txn:
        assert repo.m.get_ref(txn, "env") is None
    assert Versions(repo.store).load().get(f"http://{fake.host}", {}).get("env") is None
    assert os.path.exists(repo.store.db_path / "data.mdb")
