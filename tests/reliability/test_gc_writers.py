"""gc against the verbs that point the manifests at versions that already exist (`rollback`,
`tag`): gc decides what to delete in one read of the manifests and commits the deletions later,
so a writer that names an old version in between must wait for gc (the store lock, shared for
writers, exclusive for gc), or gc deletes the tree it has just been given.

Found by running `rollback t 1` while `gc --keep 1` was between its mark and its commit: the
rollback committed, then gc deleted the rolled-back-to tree's nodes and objects, and ref `t`
named a root that no longer existed. The writer is started at exactly that point (gc's
`_forget`), and the test waits until it has either finished or blocks on the store lock
(`/proc/locks` shows it waiting): no sleep decides the outcome."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers.races import settle, start_and_settle
from tests.helpers.trees import make_tree
from veloverlay.ingest import ingest
from veloverlay.verbs import gc as gc_mod
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.repo import Repo

V1 = {"a.txt": b"version one\n", "d/only-in-one": b"one"}
V2 = {"a.txt": b"version two\n"}


@pytest.mark.parametrize("writer", ["rollback", "tag"])
def test_a_writer_naming_an_old_version_waits_for_gc(
    shm_tmp: str, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, V1)  # type: ignore[arg-type]
    repo = Repo.open(store, create=True)
    try:
        first = ingest(repo.store, repo.m, src, "t", jobs=1).commit
        os.unlink(os.path.join(src, "d", "only-in-one"))
        make_tree(src, V2)  # type: ignore[arg-type]
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()
    args = {"rollback": ["rollback", "t", "1"], "tag": ["tag", "v1", first]}[writer]

    procs: list[subprocess.Popen[str]] = []
    real: Callable[..., Any] = gc_mod._forget

    def between_mark_and_commit(*a: Any) -> None:
        procs.append(start_and_settle(store, args))
        real(*a)

    monkeypatch.setattr(gc_mod, "_forget", between_mark_and_commit)
    repo = Repo.open(store)
    try:
        rep = gc_mod.gc(repo.store, repo.m, keep=1, grace=0)
    finally:
        repo.close()
    assert procs and rep.commits_deleted == 1
    _out, err = procs[0].communicate(timeout=120)
    assert "Traceback" not in err, err

    # Whatever the writer achieved, the store is whole: every ref and tag names a tree whose
    # every node and object is there, byte for byte.
    repo = Repo.open(store)
    try:
        report = fsck(repo.store, repo.m, jobs=1)
        assert report.ok, report.findings
        out = os.path.join(shm_tmp, "out")
        repo.checkout("t", out)
        with open(os.path.join(out, "a.txt"), "rb") as f:
            got = f.read()
        if procs[0].returncode == 0 and writer == "rollback":
            assert got == V1["a.txt"]
        else:  # refused after gc: the old version was gone by then, and it says so
            assert procs[0].returncode == 1 and "reason: not-found" in err, err
            assert got == V2["a.txt"]
    finally:
        repo.close()


def test_gc_reads_the_ref_count_and_the_store_record_together(
    shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc compares the manifest database's ref count with the store record (a database that
    lost its refs must not be swept). It read the two apart: a ref made in between (a shim
    session commits its session ref outside the store lock) made the record say more refs than
    gc had counted, and gc refused with manifest-corrupt (seen in CI). The writer is started
    between the count and the record's read, and the test waits until it has committed or
    waits for the record's lock."""
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, V1)  # type: ignore[arg-type]
    repo = Repo.open(store, create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()
    code = (
        "import sys; from veloverlay.store.cas import Store; "
        "from veloverlay.store.manifest import EMPTY_ROOT, Manifests; "
        f"m = Manifests(Store({store!r}))\n"
        "with m.write() as txn:\n"
        "    m.commit(txn, 'other', EMPTY_ROOT, expect_head=None, message='made meanwhile')"
    )
    procs: list[subprocess.Popen[str]] = []
    real: Callable[..., Any] = gc_mod.lost_refs

    def between_count_and_record(*a: Any) -> Any:
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        record = os.path.join(store, "manifests.record")
        procs.append(settle(proc, record, record + ".lock"))  # (its writers lock the second)
        return real(*a)

    monkeypatch.setattr(gc_mod, "lost_refs", between_count_and_record)
    repo = Repo.open(store)
    try:
        gc_mod.gc(repo.store, repo.m, grace=0)
    finally:
        repo.close()
    assert procs
    _out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 0, err
    repo = Repo.open(store)
    try:
        assert sorted(r.name for r, _c in repo.refs()) == ["other", "t"]
    finally:
        repo.close()
