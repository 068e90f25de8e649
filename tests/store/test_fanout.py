"""The object fan-out (issue 15, item 9): one level of 256 directories (`objects-v2/ab/<hex>`)
instead of two (`objects-v1/ab/cd/<hex>`, about one directory per object on small stores), and
stores made before keep working: read and written in their layout until gc migrates them, a
migration killed half-way leaves a store that reads everything and the next gc finishes it.

Trees are real-shaped (C projects under git); what is checked out is compared with the source.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.envs.realtree import make_project
from tests.helpers.trees import assert_same_tree, inode_flags_at
from veloverlay import fsflags
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.gc import gc
from veloverlay.verbs.repo import Repo

ROOT = Path(__file__).resolve().parents[2]


def _dirs(path: str | os.PathLike[str]) -> int:
    return sum(len(d) for _p, d, _f in os.walk(path))


def _projects(base: str, n: int) -> list[str]:
    out = []
    for i in range(n):
        src = os.path.join(base, f"p{i}")
        make_project(src)
        os.mkdir(os.path.join(src, "own"))
        for j in range(50):  # sources of its own, as every project has
            with open(os.path.join(src, "own", f"m{j}.c"), "w") as f:
                f.write(f"int project_{i}_{j}(void) {{ return {j}; }}\n")
        out.append(src)
    return out


def _legacy_store(root: str) -> Repo:
    """A store laid out as before issue 15 (its objects-v1 directory exists)."""
    os.makedirs(os.path.join(root, "objects-v1"))
    repo = Repo.open(root, create=True)
    assert repo.store.objects.name == "objects-v1" and repo.store.fanout == 2
    return repo


def test_a_new_store_has_one_level_of_at_most_256_directories(repo: Repo, shm_tmp: str) -> None:
    srcs = _projects(os.path.join(shm_tmp, "src"), 8)
    for i, src in enumerate(srcs):
        ingest(repo.store, repo.m, src, f"p{i}", jobs=1)
    objects = repo.store.objects
    assert objects.name == "objects-v2" and not (repo.store.root / "objects-v1").exists()
    names = [n for n, _p in repo.store.iter_objects()]
    assert len(names) > 256  # more objects than fan-out directories
    assert _dirs(objects) <= 256
    for name, path in repo.store.iter_objects():
        assert path == objects / name[:2] / name
    dest = os.path.join(shm_tmp, "out")
    repo.checkout("p3", dest)
    assert_same_tree(srcs[3], dest)


def test_a_store_from_before_keeps_working_then_gc_migrates_it(shm_tmp: str) -> None:
    repo = _legacy_store(os.path.join(shm_tmp, "store"))
    srcs = _projects(os.path.join(shm_tmp, "src"), 4)
    for i, src in enumerate(srcs[:3]):
        ingest(repo.store, repo.m, src, f"p{i}", jobs=1)
    legacy = repo.store.root / "objects-v1"
    before = _dirs(legacy)
    for name, path in repo.store.iter_objects():  # two levels, as before
        assert path == legacy / name[:2] / name[2:4] / name
    rep = gc(repo.store, repo.m, grace=3600)
    assert rep.objects_migrated == len(list(repo.store.iter_objects())) > 0
    assert not legacy.exists() and repo.store.objects.name == "objects-v2"
    assert _dirs(repo.store.objects) < before
    ingest(repo.store, repo.m, srcs[3], "p3", jobs=1)  # written in the new layout
    for i, src in enumerate(srcs):
        dest = os.path.join(shm_tmp, f"out{i}")
        repo.checkout(f"p{i}", dest)
        assert_same_tree(src, dest)
    assert fsck(repo.store, repo.m, jobs=1).ok
    repo.close()
    again = Repo.open(os.path.join(shm_tmp, "store"))  # a new process sees the new layout
    assert again.store.objects.name == "objects-v2" and again.store.legacy is None
    again.close()


@pytest.mark.needs("root", "chattr")
def test_migration_moves_immutable_objects(shm_tmp: str) -> None:
    if not inode_flags_at(shm_tmp):
        pytest.skip("this test's tmpfs has no inode flags (tmpfs before Linux 6.0)")
    repo = _legacy_store(os.path.join(shm_tmp, "store"))
    (src,) = _projects(os.path.join(shm_tmp, "src"), 1)
    ingest(repo.store, repo.m, src, "p", jobs=1)
    for _n, p in repo.store.iter_objects():  # as root sessions leave them
        fsflags.set_immutable(p, True)
    rep = gc(repo.store, repo.m, grace=3600)
    assert rep.objects_migrated > 0 and not (repo.store.root / "objects-v1").exists()
    assert all(fsflags.is_immutable(p) for _n, p in repo.store.iter_objects())
    dest = os.path.join(shm_tmp, "out")
    repo.checkout("p", dest)
    assert_same_tree(src, dest)
    assert fsck(repo.store, repo.m, jobs=1).ok
    repo.close()


def test_a_killed_migration_leaves_a_readable_store_and_the_next_gc_finishes(
    shm_tmp: str,
) -> None:
    root = os.path.join(shm_tmp, "store")
    repo = _legacy_store(root)
    srcs = _projects(os.path.join(shm_tmp, "src"), 2)
    for i, src in enumerate(srcs):
        ingest(repo.store, repo.m, src, f"p{i}", jobs=1)
    total = len(list(repo.store.iter_objects()))
    repo.close()
    code = (
        "from veloverlay.verbs.repo import Repo; from veloverlay.verbs.gc import gc; "
        f"r = Repo.open({root!r}); gc(r.store, r.m)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "VELO_INTERNAL__TEST_FAULT": "gc.migrate:7"},
        capture_output=True,
        text=True,
    )
    assert p.returncode == -9, p.stderr  # killed after the 7th object
    half = Repo.open(root)
    assert half.store.legacy is not None and half.store.objects.name == "objects-v2"
    where = {
        p.parent.parent.name if p.parent.parent.name.startswith("objects") else "v1"
        for _n, p in half.store.iter_objects()
    }
    assert where == {"objects-v2", "v1"}  # both in use
    assert len(list(half.store.iter_objects())) == total
    for i, src in enumerate(srcs):
        dest = os.path.join(shm_tmp, f"half{i}")
        half.checkout(f"p{i}", dest)
        assert_same_tree(src, dest)
    assert fsck(half.store, half.m, jobs=1).ok
    rep = gc(half.store, half.m)
    assert rep.objects_migrated == total - 7
    assert half.store.legacy is None and Store(root).legacy is None
    assert fsck(half.store, half.m, jobs=1).ok
    half.close()
