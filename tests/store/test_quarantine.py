"""A corrupt object is set aside by `fsck --repair` and restored by the next ingest (the stat
cache would otherwise vouch for the unchanged source file and skip it); checked against the
source tree itself. The repo fixture's fsck after each test must pass: healed means clean."""

from __future__ import annotations

import os

import pytest

from tests.helpers.trees import assert_same_tree, make_tree, settle_ctimes, unprotect
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.store import quarantine
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.repo import Repo


def _source(base: str) -> str:
    src = os.path.join(base, "src")
    make_tree(
        src,
        {
            "bin/tool": b"#!/bin/sh\necho tool\n",
            "lib/data.txt": b"the right bytes\n" * 100,
            "lib/same.txt": b"the right bytes\n" * 100,  # the same object twice
            "README": b"readme\n",
            "link": ("link", "lib/data.txt"),
        },
    )
    os.chmod(os.path.join(src, "lib/data.txt"), 0o444)
    os.chmod(os.path.join(src, "bin/tool"), 0o555)
    # an hour old, as a real tree is: the stat cache trusts only files older than its racy
    # window, so the next ingest reads none of them again
    old = os.stat(src).st_mtime_ns - 3600 * 10**9
    for dirpath, dirs, files in os.walk(src, topdown=False):
        for n in files + dirs:
            os.utime(os.path.join(dirpath, n), ns=(old, old), follow_symlinks=False)
    os.chmod(os.path.join(src, "bin"), 0o555)
    os.utime(os.path.join(src, "bin"), ns=(old, old))
    os.utime(src, ns=(old, old))
    settle_ctimes(src)
    return src


def _object_of(repo: Repo, path: str) -> str:
    (entry,) = repo.ls("t", path)
    return os.fspath(repo.store.object_path(bytes.fromhex(entry.digest)))


def _ingested(repo: Repo, base: str) -> str:
    src = _source(base)
    ingest(repo.store, repo.m, src, "t", jobs=1)
    return src


def _unprotect(path: str) -> None:
    unprotect(path)  # root's objects carry +i


def _tamper(path: str) -> None:
    _unprotect(path)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"THE WRONG")
    os.chmod(path, 0o444)


def _names_of_inode(top: str, ino: int, dev: int) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(top):
        for n in dirs + files:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_ino, st.st_dev) == (ino, dev):
                out.append(os.path.join(dirpath, n))
    return out


def test_a_corrupt_object_is_set_aside_and_the_next_ingest_restores_it(
    repo: Repo, shm_tmp: str
) -> None:
    src = _ingested(repo, shm_tmp)
    obj = _object_of(repo, "lib/data.txt")
    _tamper(obj)

    # found, and without --repair nothing moves; a checkout refuses the bad bytes
    rep = fsck(repo.store, repo.m, jobs=1)
    assert [f.kind for f in rep.findings] == ["object-corrupt"]
    assert rep.quarantined == 0 and os.path.exists(obj)
    with pytest.raises(VeloError) as ei:
        repo.checkout("t", os.path.join(shm_tmp, "co0"))
    assert ei.value.reason is Reason.OBJECT_CORRUPT

    # --repair sets it aside: its name is free, its bytes are kept, no other name serves them
    st = os.lstat(obj)
    rep = fsck(repo.store, repo.m, jobs=1, repair=True)
    assert rep.quarantined == 1 and rep.wanted == 1
    assert "set aside as quarantine-v1/" in rep.findings[0].detail
    assert not os.path.lexists(obj)
    (kept,) = os.listdir(quarantine.quarantine_dir(repo.store))
    aside = os.path.join(quarantine.quarantine_dir(repo.store), kept)
    with open(aside, "rb") as f:
        assert f.read(9) == b"THE WRONG"
    assert _names_of_inode(os.fspath(repo.store.root), st.st_ino, st.st_dev) == [aside]

    # now it is missing, and said so for both files that name it
    rep = fsck(repo.store, repo.m, jobs=1)
    assert sorted(f.kind for f in rep.findings) == ["object-missing", "object-missing"]
    with pytest.raises(VeloError) as ei:
        repo.checkout("t", os.path.join(shm_tmp, "co1"))
    assert ei.value.reason is Reason.OBJECT_MISSING

    # the source is unchanged (the stat cache vouches for every file): ingest restores it anyway
    res = ingest(repo.store, repo.m, src, "t", jobs=1)
    assert res.unchanged  # the same tree: no new version
    assert quarantine.wanted(repo.store) == set()
    assert fsck(repo.store, repo.m, jobs=1).ok
    dest = os.path.join(shm_tmp, "co2")
    repo.checkout("t", dest)
    assert_same_tree(src, dest)


def test_a_store_in_use_keeps_its_corrupt_object_and_says_why(repo: Repo, shm_tmp: str) -> None:
    src = _ingested(repo, shm_tmp)
    obj = _object_of(repo, "README")
    _tamper(obj)
    # a writer holds the store lock (flock: a second open file conflicts, in one process too)
    with repo.store.lock():
        rep = fsck(repo.store, repo.m, jobs=1, repair=True)
    assert rep.quarantined == 0
    assert "not set aside" in rep.findings[0].detail and "locked" in rep.findings[0].detail
    assert os.path.exists(obj)
    # once free, --repair sets it aside and ingest restores it (the fixture's fsck checks)
    assert fsck(repo.store, repo.m, jobs=1, repair=True).quarantined == 1
    ingest(repo.store, repo.m, src, "t", jobs=1)


@pytest.mark.needs("root")
def test_no_short_name_or_cached_layer_serves_a_set_aside_object(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data-only layer reaches objects through short names in ids-v1 (hard links: the same
    inode): once the object is set aside, no name in the store reaches its bytes and no cached
    layer is left to; the layer built after the ingest restored it reads the right bytes."""
    from veloverlay.lower import stacks

    monkeypatch.setenv("VELO_RUNTIME_DIR", "off")  # layers and short names in the store
    src = _ingested(repo, shm_tmp)
    root = repo.resolve_root("t")

    def build() -> stacks.Lowers:
        return stacks.ensure_lowers(
            repo.store, repo.m, root, form="data-only", protect=True, xattr="trusted"
        )

    build()
    cache = [repo.store.trees / "layers", repo.store.trees / "stacks"]
    assert all(os.listdir(d) for d in cache)
    obj = _object_of(repo, "lib/data.txt")
    st = os.lstat(obj)
    names = _names_of_inode(os.fspath(repo.store.root), st.st_ino, st.st_dev)
    assert any("/ids-v1/" in n for n in names), names  # the layer's short name
    _tamper(obj)
    assert fsck(repo.store, repo.m, jobs=1, repair=True).quarantined == 1
    aside = _names_of_inode(os.fspath(repo.store.root), st.st_ino, st.st_dev)
    assert len(aside) == 1 and "/quarantine-v1/" in aside[0], aside
    assert [os.listdir(d) for d in cache] == [[], []]  # every cached layer evicted
    ingest(repo.store, repo.m, src, "t", jobs=1)
    build()
    st2 = os.lstat(obj)
    names = _names_of_inode(os.fspath(repo.store.root), st2.st_ino, st2.st_dev)
    (short,) = [n for n in names if "/ids-v1/" in n]
    with open(short, "rb") as f, open(os.path.join(src, "lib/data.txt"), "rb") as g:
        assert f.read() == g.read()


def test_an_object_deleted_by_hand_is_wanted_after_repair_and_restored(
    repo: Repo, shm_tmp: str
) -> None:
    src = _ingested(repo, shm_tmp)
    obj = _object_of(repo, "bin/tool")
    _unprotect(obj)
    os.unlink(obj)
    assert [f.kind for f in fsck(repo.store, repo.m, jobs=1).findings] == ["object-missing"]
    ingest(repo.store, repo.m, src, "t", jobs=1)  # not wanted yet: the stat cache vouches
    assert not os.path.exists(obj)
    rep = fsck(repo.store, repo.m, jobs=1, repair=True)
    assert rep.wanted == 1 and rep.quarantined == 0
    ingest(repo.store, repo.m, src, "t", jobs=1)
    assert os.path.exists(obj) and quarantine.wanted(repo.store) == set()
    dest = os.path.join(shm_tmp, "co")
    repo.checkout("t", dest)
    assert_same_tree(src, dest)


def test_an_object_no_file_holds_any_more_costs_only_its_directory_the_stat_cache(
    repo: Repo, shm_tmp: str
) -> None:
    """A wanted object makes the next ingests read again the files the stat cache last saw
    holding it; once no file does (the file changed), the whole tree is vouched for again."""
    src = _ingested(repo, shm_tmp)
    obj = _object_of(repo, "bin/tool")
    _unprotect(obj)
    os.unlink(obj)
    assert fsck(repo.store, repo.m, jobs=1, repair=True).wanted == 1
    tool = os.path.join(src, "bin/tool")
    with open(tool, "rb") as f:
        original = f.read()
    st = os.stat(tool)
    old = st.st_mtime_ns - 10**10  # older than the racy window: the stat cache keeps it
    os.chmod(tool, 0o755)  # (0555 as the tree has it: root-free, the test could not edit it)
    with open(tool, "ab") as f:
        f.write(b"# changed: no file holds the wanted bytes now\n")
    os.chmod(tool, 0o555)
    os.utime(tool, ns=(old, old))
    settle_ctimes(src)
    first = ingest(repo.store, repo.m, src, "t", jobs=1)
    assert first.hashed == 1  # bin/ listed again: its one file read (and changed)
    assert quarantine.wanted(repo.store) != set()  # the old version still names it
    again = ingest(repo.store, repo.m, src, "t", jobs=1)
    assert again.unchanged and again.hashed == 0, again  # the stat cache vouches again
    os.chmod(tool, 0o755)
    with open(tool, "wb") as f:  # the old bytes back: read again, the object restored
        f.write(original)
    os.chmod(tool, 0o555)
    os.utime(tool, ns=(old - 10**9, old - 10**9))
    ingest(repo.store, repo.m, src, "t", jobs=1)
    assert quarantine.wanted(repo.store) == set()


def test_gc_forgets_what_no_ref_needs_and_markers_of_objects_that_are_back(
    repo: Repo, shm_tmp: str
) -> None:
    from veloverlay.verbs.gc import gc

    src = _ingested(repo, shm_tmp)
    readme, tool = _object_of(repo, "README"), _object_of(repo, "bin/tool")
    _tamper(readme)  # set aside: a damaged copy
    _unprotect(tool)
    os.unlink(tool)  # missing: a marker
    rep = fsck(repo.store, repo.m, jobs=1, repair=True)
    assert rep.quarantined == 1 and rep.wanted == 2
    ingest(repo.store, repo.m, src, "t", jobs=1)  # both back
    qdir = quarantine.quarantine_dir(repo.store)
    assert gc(repo.store, repo.m, grace=0).quarantine_removed == 1  # the marker
    (left,) = os.listdir(qdir)  # the damaged copy of README, kept for inspection
    assert left.startswith(os.path.basename(readme) + "-") and not left.endswith("-missing")
    repo.delete_ref("t", grace=0)  # README no longer needed by any ref
    assert gc(repo.store, repo.m, grace=0).quarantine_removed == 1
    assert os.listdir(qdir) == []
