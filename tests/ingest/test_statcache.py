"""The ingest stat cache under attack: whatever happened to the source, the cache and the store
between two ingests, a re-ingest commits the source as it is (checked out and compared with the
source itself) and every object its manifest names is in the store.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tests.helpers.trees import assert_same_tree, make_tree
from tests.ingest.test_ingest import OLD_NS, age, run
from veloverlay.ingest import scan
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
