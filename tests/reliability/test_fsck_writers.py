"""fsck against the verbs that run beside it: it lists the objects first, re-hashes them, and
reads the manifests last. An `ingest` that publishes new objects and commits their nodes in
between, or a `gc` that sweeps an object fsck has listed but not opened yet, are ordinary
neighbours, not damage: fsck must not report a whole store as broken (`object-missing` for the
ingest's new objects, `object-unreadable` for the swept one), and `fsck --repair` must not mark
the ingest's objects as wanted.

Found by running an ingest of new content while fsck was re-hashing: fsck exited 1 with
object-missing for every new file. Each neighbour runs at exactly that point (fsck's step
between its object scan and its manifest scan, or before its first object check)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers.trees import make_tree
from veloverlay.ingest import ingest
from veloverlay.session.shim import materialize
from veloverlay.store import quarantine
from veloverlay.verbs import fsck as fsck_mod
from veloverlay.verbs.gc import gc
from veloverlay.verbs.repo import Repo


@pytest.mark.parametrize("repair", [False, True])
def test_an_ingest_during_fsck_is_no_damage(
    repo: Repo, shm_tmp: str, repair: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a.txt": b"first\n"})
    ingest(repo.store, repo.m, src, "t", jobs=1)
    new = os.path.join(shm_tmp, "new")
    make_tree(new, {f"f{i}.txt": f"new content {i}\n".encode() for i in range(5)})
    ran: list[bool] = []
    real: Callable[..., Any] = materialize.verify_proxies

    def objects_scanned_then_ingest(*a: Any) -> Any:
        if not ran:
            ran.append(True)
            ingest(repo.store, repo.m, new, "n", jobs=1)
        return real(*a)

    monkeypatch.setattr(materialize, "verify_proxies", objects_scanned_then_ingest)
    report = fsck_mod.fsck(repo.store, repo.m, jobs=1, repair=repair)
    assert ran
    assert report.ok, report.findings
    assert not quarantine.wanted(repo.store)
    out = os.path.join(shm_tmp, "out")
    repo.checkout("n", out)
    for i in range(5):
        with open(os.path.join(out, f"f{i}.txt"), "rb") as f:
            assert f.read() == f"new content {i}\n".encode()


def test_an_object_gc_sweeps_during_fsck_is_no_damage(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a.txt": b"version one\n", "d/only-in-one": b"one\n"})
    ingest(repo.store, repo.m, src, "t", jobs=1)
    shutil.rmtree(os.path.join(src, "d"))
    make_tree(src, {"a.txt": b"version two\n"})
    ingest(repo.store, repo.m, src, "t", jobs=1)
    swept: list[int] = []
    real: Callable[..., Any] = fsck_mod._check_object

    def first_check_after_gc(*a: Any) -> Any:
        if not swept:
            swept.append(gc(repo.store, repo.m, keep=1, grace=0).objects_deleted)
        return real(*a)

    monkeypatch.setattr(fsck_mod, "_check_object", first_check_after_gc)
    report = fsck_mod.fsck(repo.store, repo.m, jobs=1)
    assert swept == [2]  # version one's a.txt and d/only-in-one
    assert report.ok, report.findings
    assert report.objects == 3  # listed before the sweep: one of them was found gone


def test_a_short_name_made_during_fsck_is_no_stray(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session that starts beside fsck names the objects of a version ingested after fsck
    listed the store (ids-v1): fsck said id-stray for each, though every one is a hard link of
    its object."""
    from veloverlay.lower.objects import Objects

    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a.txt": b"first\n"})
    ingest(repo.store, repo.m, src, "t", jobs=1)
    new = os.path.join(shm_tmp, "new")
    make_tree(new, {f"f{i}.txt": f"named while fsck ran {i}\n".encode() for i in range(5)})
    named: list[str] = []
    real: Callable[..., Any] = fsck_mod._check_object

    def first_check_after_a_session_start(*a: Any) -> Any:
        if not named:
            ingest(repo.store, repo.m, new, "n", jobs=1)
            with repo.m.read() as txn:
                ids = Objects(repo.store, repo.m, txn, protect=False, form="data-only")
                for e in repo.ls("n"):
                    assert e.digest is not None
                    named.append(ids.short_id(bytes.fromhex(e.digest)))
        return real(*a)

    monkeypatch.setattr(fsck_mod, "_check_object", first_check_after_a_session_start)
    report = fsck_mod.fsck(repo.store, repo.m, jobs=1)
    assert len(named) == 5
    for short in named:  # each is a real second name of its object, as a session makes it
        path = os.path.join(os.fspath(repo.store.root), "ids-v1", short[:2], short[2:])
        assert os.stat(path).st_nlink == 2
    assert report.ok, report.findings
