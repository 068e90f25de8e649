"""The ingest stat cache under attack: whatever happened to the source, the cache and the store
between two ingests, a re-ingest commits the source as it is (checked out and compared with the
source itself) and every object its manifest names is in the store.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.helpers.trees import assert_same_tree, make_tree
from tests.ingest.test_ingest import OLD_NS, age, run
from veloverlay.ingest import scan, source, statcache
from veloverlay.store.digest import hash_bytes
from veloverlay.tiers import Rules
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.gc import gc
from veloverlay.verbs.repo import Repo


def _once(what: str, rel: bytes, act: Callable[[], None]) -> Callable[[str, bytes], None]:
    """A race_point that runs `act` the first time the walk reaches (what, rel)."""
    done: list[bool] = []

    def point(w: str, r: bytes) -> None:
        if (w, r) == (what, rel) and not done:
            done.append(True)
            act()

    return point


def _same_as_source(repo: Repo, src: str, dest: str) -> None:
    report = fsck(repo.store, repo.m, jobs=1)
    assert report.ok, report.findings[:3]
    repo.checkout("r", dest)
    assert_same_tree(src, dest)


def test_an_ingest_that_ran_meanwhile_leaves_no_stale_cache_entry(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ingests of one ref at once (the store lock is shared by writers). B runs while A
    walks and caches `new/`; `new/` is out of the tree when A walks it, so A's root has no
    `new/f`, yet A's cache write (which pruned only the keys A had loaded) kept B's entry for
    it. After `gc --keep 1` dropped B's version, `new/` came back, and the next ingest trusted
    that entry: it committed `new/f` by a digest whose object gc had deleted (fsck:
    object-missing; checkout failed)."""
    src = os.path.join(shm_tmp, "src")
    aside = os.path.join(shm_tmp, "aside")
    make_tree(src, {"a": b"a"})
    age(src)
    run(repo, src, "r")
    make_tree(src, {"new/f": b"only in the ingest that ran meanwhile"})
    age(src)

    def b_runs_then_new_leaves() -> None:
        run(repo, src, "r")
        os.rename(os.path.join(src, "new"), aside)

    monkeypatch.setattr(scan, "race_point", _once("task", b"", b_runs_then_new_leaves))
    run(repo, src, "r")  # A
    monkeypatch.undo()
    assert {e.path for e in repo.ls("r", recursive=True)} == {b"a"}  # A: the tree it saw
    os.rename(aside, os.path.join(src, "new"))  # new/f itself untouched: its stat is B's
    os.utime(src, ns=(OLD_NS, OLD_NS))
    gc(repo.store, repo.m, keep=1, grace=0)
    again = run(repo, src, "r")
    assert again.hashed == 1  # new/f was read again, not taken from B's entry
    _same_as_source(repo, src, os.path.join(shm_tmp, "out"))


@pytest.fixture
def ramfs(shm_tmp: str) -> Iterator[str]:
    """A ramfs (no multigrain timestamps: ctime as coarse as the clock's tick), mounted for the
    test."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    mnt = os.path.join(shm_tmp, "ramfs")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "ramfs", "none", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_a_file_rewritten_in_the_tick_it_was_read_on_a_coarse_filesystem(
    repo: Repo, ramfs: str, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem whose ctime is as coarse as the clock's tick (ramfs here; FUSE, NFS,
    9p, vfat), a writer puts A in a file and its old mtime back (touch -r, cp -p), the ingest
    reads A, and the writer puts B (same size) and the mtime back again, all within one tick:
    the stat is what the ingest saw. The file's mtime is old, so the mtime-only racy rule
    cached A, and every later ingest committed A while the file holds B."""
    src = os.path.join(ramfs, "src")
    os.mkdir(src)
    path = os.path.join(src, "f")
    with open(path, "wb") as f:
        f.write(b"B...")
    age(src)
    wfd = os.open(path, os.O_WRONLY)
    reads: list[int] = []
    real = source._read_all

    def read_then_write(fd: int, size: int) -> bytes:
        data = real(fd, size)
        reads.append(size)
        if len(reads) == 1:  # the first read: the writer puts A there (read again: changed)
            os.pwrite(wfd, b"A...", 0)
            os.utime(wfd, ns=(OLD_NS, OLD_NS))
        elif len(reads) == 2:  # A was read: the writer puts B back, in the same tick
            os.pwrite(wfd, b"B...", 0)
            os.utime(wfd, ns=(OLD_NS, OLD_NS))
        return data

    monkeypatch.setattr(source, "_read_all", read_then_write)
    try:
        run(repo, src, "r")
    finally:
        os.close(wfd)
    monkeypatch.undo()
    run(repo, src, "r")
    _same_as_source(repo, src, os.path.join(shm_tmp, "out"))


def test_a_cache_written_by_another_version_is_not_trusted(repo: Repo, shm_tmp: str) -> None:
    """The stat cache had no format number of its own: a cache written by another version of
    veloverlay (whose values mean something else, or name nodes of another encoding) was loaded
    and trusted as this version's. Here the first, unnumbered format's keys hold a value that
    says `a` has `b`'s content (what a value of another meaning decodes to): the re-ingest
    committed that, not the source."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a": b"aaaa", "b": b"bbbb"})
    age(src)
    run(repo, src, "r")
    m = repo.m
    with m.read() as txn:
        ref = m.require_ref(txn, "r")
        root = bytes.fromhex(m.get_commit(txn, ref.head).root)
        b_digest = m.lookup(txn, root, b"b")
        assert b_digest is not None
        values = [
            bytes(v)
            for k, v in txn.cursor(db=m.statcache)
            if bytes(k).startswith(b"r\0") and bytes(k) != b"r\0"
        ]
    dc = statcache.decode(values[0])  # the top directory (the only one)
    assert dc is not None and set(dc.files) == {b"a", b"b"}
    ino, size, mtime, ctime, _digest, listed, stored = dc.files[b"a"]
    dc.files[b"a"] = (ino, size, mtime, ctime, b_digest.digest, listed, stored)
    # the keys the unnumbered format used: a hash of rules, setid policy and source path
    rules = Rules.from_json(ref.tiers).to_json()
    what = json.dumps([rules, False, os.path.realpath(src)]).encode()
    legacy = hash_bytes(what).hex()[:16].encode()
    with m.write() as txn:
        statcache.drop(m, txn, "r")
        txn.put(b"r\0" + legacy + b"\0", statcache.encode(dc), db=m.statcache)
        txn.put(b"r\0", os.urandom(16), db=m.statcache)
    with open(os.path.join(src, "c"), "wb") as f:  # the directory changed; `a` did not
        f.write(b"c")
    run(repo, src, "r")
    _same_as_source(repo, src, os.path.join(shm_tmp, "out"))
