"""A ref deleted (and made again from another tree) while a session of it runs: the session's
changes are kept as REF@<session>, with a warning that says so, never merged into the new,
unrelated tree (the merge found no ancestry and three-way merged the session's tree onto a tree
it never started from: found by the merge audit), and never dropped without a word."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cli import live_session
from tests.session._util import new_store
from veloverlay.ingest.pipeline import ingest
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.gc import gc
from veloverlay.verbs.repo import Repo


def _session_while_the_ref_changes(
    base: str, remake: bool, *, gc_keep: bool = False, moves: int = 0
) -> tuple[dict[str, object], Repo, str]:
    """`moves`: without `remake`, the ref gets that many new versions of its own source (its
    own lineage) while the session runs; with `gc_keep`, `gc --keep 1` then runs."""
    store, src = new_store(base)
    proj = os.path.join(base, "proj")
    with live_session(
        store.root, "--json", "run", "t", "--at", proj, command=f"cd {proj} && printf mine > new",
        base=base,
    ) as p:  # fmt: skip
        repo = _meanwhile(store, src, base, remake, gc_keep=gc_keep, moves=moves)
    assert p.returncode == 0, p.err
    return json.loads(p.out), repo, os.fspath(src)


def _meanwhile(
    store: Store, src: str, base: str, remake: bool, *, gc_keep: bool, moves: int
) -> Repo:
    """What befalls ref `t` while its session waits (see _session_while_the_ref_changes)."""
    repo = Repo(store, Manifests(store))
    for n in range(moves):
        with open(os.path.join(src, f"moved{n}"), "wb") as f:
            f.write(b"the ref's own next version\n")
        ingest(store, repo.m, src, "t", jobs=1)
    if moves and gc_keep:
        gc(store, repo.m, keep=1, grace=0)
    if not moves:
        repo.delete_ref("t")
    if remake:  # another tree under the same name
        other = os.path.join(base, "other")
        os.makedirs(other)
        with open(os.path.join(other, "theirs"), "wb") as f:
            f.write(b"another tree\n")
        ingest(store, repo.m, other, "t", jobs=1)
        if gc_keep:  # a second version of the new tree, and its first one dropped by gc
            with open(os.path.join(other, "theirs"), "ab") as f:
                f.write(b"and more\n")
            ingest(store, repo.m, other, "t", jobs=1)
            gc(store, repo.m, keep=1, grace=0)
    return repo


@pytest.mark.needs("root", "overlay_root")
@pytest.mark.parametrize("remake", [True, False], ids=["made-anew", "deleted"])
def test_the_sessions_changes_are_kept_as_its_own_ref(shm_tmp: str, remake: bool) -> None:
    res, repo, src = _session_while_the_ref_changes(shm_tmp, remake)
    try:
        sref = f"t@{res['session_id']}"
        assert res["conflict_ref"] == sref
        # it projects where its tree came from: not the new tree's source, nor nowhere
        with repo.m.read() as txn:
            assert repo.m.require_ref(txn, sref).path == src
        assert any(
            sref in w and ("made anew" if remake else "deleted") in w for w in res["warnings"]
        )
        kept = os.path.join(shm_tmp, "kept")
        repo.checkout(sref, kept)
        with open(os.path.join(kept, "new"), "rb") as f:
            assert f.read() == b"mine"
        if remake:  # the new tree is as it was made: nothing of the session in it
            now = os.path.join(shm_tmp, "now")
            repo.checkout("t", now)
            assert sorted(os.listdir(now)) == ["theirs"]
    finally:
        repo.close()


@pytest.mark.needs("root", "overlay_root")
def test_a_ref_made_anew_is_told_apart_after_gc_keep(shm_tmp: str) -> None:
    """The ref made anew got a second version and `gc --keep 1` dropped its first: the walk
    back from its head ended at a missing commit instead of a first one, which was taken for a
    log cut from the same ref, and the session's changes were merged into the stranger tree.
    gc now keeps that log while the session is unfinished."""
    res, repo, _src = _session_while_the_ref_changes(shm_tmp, True, gc_keep=True)
    try:
        assert res["conflict_ref"] == f"t@{res['session_id']}"
        assert any("made anew" in w for w in res["warnings"])  # type: ignore[attr-defined]
        now = os.path.join(shm_tmp, "now")
        repo.checkout("t", now)
        assert sorted(os.listdir(now)) == ["theirs"]
    finally:
        repo.close()


def _log_is_cut(repo: Repo, name: str) -> bool:
    """The walk back from the ref's head meets a missing commit before a first one."""
    with repo.m.read() as txn:
        cid: str | None = repo.m.require_ref(txn, name).head
        while cid is not None and repo.m.has_commit(txn, cid):
            cid = repo.m.get_commit(txn, cid).parent
        return cid is not None


@pytest.mark.needs("root", "overlay_root")
def test_a_ref_made_anew_whose_log_an_older_gc_cut_is_told_apart(
    shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with a gc that did not keep the new ref's log for the session (a gc of an
    earlier version, or a log that reached the store cut): the walk back from the new head
    met a missing commit, took it for a cut of the same ref's log, and merged the session's
    changes into the stranger tree. The ref's lineage (given when a ref is made, recorded by
    the session at its start) tells them apart whatever the log lacks."""
    import veloverlay.verbs.gc as gc_module

    monkeypatch.setattr(gc_module, "_since_bases", lambda *args, **kwargs: [])
    res, repo, _src = _session_while_the_ref_changes(shm_tmp, True, gc_keep=True)
    try:
        assert _log_is_cut(repo, "t")
        assert res["conflict_ref"] == f"t@{res['session_id']}"  # old: merged into t
        now = os.path.join(shm_tmp, "now")
        repo.checkout("t", now)
        assert sorted(os.listdir(now)) == ["theirs"]
    finally:
        repo.close()


@pytest.mark.needs("root", "overlay_root")
def test_the_same_ref_with_its_log_cut_meanwhile_is_merged_into(
    shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ref itself moved twice while the session ran and `gc --keep 1` cut the commit
    between its head and the session's base: the same ref (same lineage), so the session's
    change is merged with the ref's own new versions, not set aside."""
    import veloverlay.verbs.gc as gc_module

    monkeypatch.setattr(gc_module, "_since_bases", lambda *args, **kwargs: [])
    res, repo, src = _session_while_the_ref_changes(shm_tmp, False, gc_keep=True, moves=2)
    try:
        assert _log_is_cut(repo, "t")
        assert res["conflict_ref"] is None and res["commit"] is not None
        now = os.path.join(shm_tmp, "now")
        repo.checkout("t", now)
        with open(os.path.join(now, "new"), "rb") as f:
            assert f.read() == b"mine"
        assert sorted(os.listdir(now)) == sorted([*os.listdir(src), "new"])
    finally:
        repo.close()
