"""A ref is never clobbered by another tree (issue 15, item 2).

`ingest DIR --name REF` into a ref that came from another directory is refused unless told: the
user's case was two directories with the same basename (an app and a README-only directory).
A ref's path is part of its version: a path change is a commit even when the tree is unchanged,
and rollback restores it. Trees are compared with the source directories themselves.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.envs.realtree import make_project
from tests.helpers.trees import assert_same_tree
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.verbs.repo import Repo


def _ref(repo: Repo, name: str) -> tuple[str, str | None, str]:
    """(head, path, root) of ref `name`."""
    for r, c in repo.refs():
        if r.name == name:
            return r.head, r.path, c.root
    raise AssertionError(f"no ref {name}")


def _out(repo: Repo, spec: str, dest: str) -> str:
    repo.checkout(spec, dest)
    return dest


@pytest.fixture
def two_apps(shm_tmp: str) -> tuple[str, str]:
    """Two directories called `app`: a C project under git, and one with only a README."""
    a = os.path.join(shm_tmp, "work", "app")
    b = os.path.join(shm_tmp, "docs", "app")
    make_project(a)
    os.makedirs(b)
    with open(os.path.join(b, "README"), "w") as f:
        f.write("notes about the app\n")
    return a, b


def test_another_directory_is_refused_and_nothing_changes(
    repo: Repo, two_apps: tuple[str, str], shm_tmp: str
) -> None:
    a, b = two_apps
    ingest(repo.store, repo.m, a, "app", jobs=1)
    before = _ref(repo, "app")
    with pytest.raises(VeloError) as ei:
        ingest(repo.store, repo.m, b, "app", jobs=1)
    assert ei.value.reason is Reason.OTHER_SOURCE
    assert a in ei.value.message and "--moved" in (ei.value.hint or "")
    assert _ref(repo, "app") == before
    assert_same_tree(a, _out(repo, "app", os.path.join(shm_tmp, "o1")))


def test_force_makes_the_other_tree_the_next_version_and_rollback_restores_path(
    repo: Repo, two_apps: tuple[str, str], shm_tmp: str
) -> None:
    a, b = two_apps
    ingest(repo.store, repo.m, a, "app", jobs=1)
    res = ingest(repo.store, repo.m, b, "app", jobs=1, force=True)
    assert res.moved_from == a
    head, path, _root = _ref(repo, "app")
    assert path == b
    assert_same_tree(b, _out(repo, "app", os.path.join(shm_tmp, "o1")))  # not a merge of both
    repo.rollback("app", 1)
    _h, path, _r = _ref(repo, "app")
    assert path == a
    assert_same_tree(a, _out(repo, "app", os.path.join(shm_tmp, "o2")))
    assert [c.path for c in repo.log("app")] == [a, b, a]


def test_the_same_tree_moved_records_its_new_path_as_a_commit(
    repo: Repo, two_apps: tuple[str, str], shm_tmp: str
) -> None:
    a, _b = two_apps
    ingest(repo.store, repo.m, a, "app", jobs=1)
    head, _p, root = _ref(repo, "app")
    moved = os.path.join(shm_tmp, "elsewhere", "app")
    os.makedirs(os.path.dirname(moved))
    subprocess.run(["mv", a, moved], check=True)
    with pytest.raises(VeloError) as ei:
        ingest(repo.store, repo.m, moved, "app", jobs=1)
    assert ei.value.reason is Reason.OTHER_SOURCE
    res = ingest(repo.store, repo.m, moved, "app", jobs=1, moved=True)
    assert res.unchanged and res.moved_from == a  # the tree is the same ...
    head2, path2, root2 = _ref(repo, "app")
    assert (path2, root2) == (moved, root) and head2 != head  # ... its path is a new version
    assert repo.log("app")[0].parent == head
    again = ingest(repo.store, repo.m, moved, "app", jobs=1)  # from there on: no news
    assert again.unchanged and again.moved_from is None and _ref(repo, "app")[0] == head2
    repo.rollback("app", 1)
    assert _ref(repo, "app")[1] == a
    assert_same_tree(moved, _out(repo, "app", os.path.join(shm_tmp, "o1")))


def test_adopt_from_the_moved_path_records_it(
    repo: Repo, two_apps: tuple[str, str], shm_tmp: str
) -> None:
    """The user's second surprise: 'ingest --adopt' from the right path said the ref now
    projects there while 'refs' still showed the old path."""
    a, _b = two_apps
    ingest(repo.store, repo.m, a, "app", jobs=1)
    right = os.path.join(shm_tmp, "right", "app")
    os.makedirs(os.path.dirname(right))
    subprocess.run(["cp", "-a", a, right], check=True)
    res = ingest(repo.store, repo.m, right, "app", jobs=1, moved=True, adopt=True)
    assert res.adopted_to == right + ".velo-adopted"
    assert _ref(repo, "app")[1] == right
    assert_same_tree(a, _out(repo, "app", os.path.join(shm_tmp, "o1")))


def test_a_ref_without_a_path_takes_its_first_ingest_from_anywhere(
    repo: Repo, two_apps: tuple[str, str]
) -> None:
    """A ref made by import (no path recorded) takes its first ingest from anywhere."""
    a, _b = two_apps
    with repo.m.write() as txn:
        from veloverlay.store.manifest import EMPTY_ROOT

        repo.m.commit(txn, "imported", EMPTY_ROOT, expect_head=None, message="import")
    res = ingest(repo.store, repo.m, a, "imported", jobs=1)
    assert _ref(repo, "imported")[1] == a and res.moved_from is None
