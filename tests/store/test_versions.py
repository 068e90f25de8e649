"""Naming versions (issue 15, item 4): commit ids and unique prefixes of them are accepted
wherever a version is taken, tags name versions that gc keeps, and a version's projection path
is part of it (rollback restores it).

The tree is real-shaped: a C project under git (0444 objects, a 0555 and a setgid directory),
compared with copies of the source taken when each version was ingested.
"""

from __future__ import annotations

import io
import os
import subprocess

import pytest

from tests.envs.realtree import git, make_project
from tests.helpers.trees import assert_same_tree
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.store.bundle import export_bundle, import_bundle
from veloverlay.verbs.gc import gc
from veloverlay.verbs.repo import Repo


def _copy(src: str, dst: str) -> None:
    subprocess.run(["cp", "-a", src, dst], check=True)


@pytest.fixture
def two_versions(repo: Repo, shm_tmp: str) -> tuple[Repo, str, list[str], list[str]]:
    """Ref `app` ingested twice from a git project; returns (repo, src, [copy1, copy2], [id1,
    id2]) where copyN is the source as version N was ingested."""
    src = os.path.join(shm_tmp, "app")
    make_project(src)
    copies = []
    for n in (1, 2):
        if n == 2:
            with open(os.path.join(src, "README"), "ab") as f:
                f.write(b"third\n")
            git(src, "commit", "-qam", "third")
        ingest(repo.store, repo.m, src, "app", jobs=1)
        copies.append(os.path.join(shm_tmp, f"copy{n}"))
        _copy(src, copies[-1])
    ids = [c.id for c in reversed(repo.log("app"))]
    assert len(ids) == 2
    return repo, src, copies, ids


def test_a_commit_id_prefix_names_a_version_everywhere(
    two_versions: tuple[Repo, str, list[str], list[str]], shm_tmp: str
) -> None:
    repo, _src, copies, ids = two_versions
    old = ids[0][:8]
    four = ids[0][:4] if ids[0][:4] != ids[1][:4] else ids[0][:8]
    for i, spec in enumerate((old, ids[0], four, f"{ids[1][:10]}@{{1}}")):
        dest = os.path.join(shm_tmp, f"out-{i}")
        repo.checkout(spec, dest)
        assert_same_tree(copies[0], dest)
    assert repo.resolve_root(old) == repo.resolve_root("app@{1}")
    out = io.BytesIO()
    repo.cat(old, "README", out)
    with open(os.path.join(copies[0], "README"), "rb") as f:
        assert out.getvalue() == f.read()
    names = {e.path for e in repo.ls(old, "", recursive=True)}
    assert b"src/version.h" in names and b".git/HEAD" in names
    assert [(o.kind, o.path) for o in repo.diff(old, ids[1][:6])] == [
        (o.kind, o.path) for o in repo.diff("app@{1}", "app")
    ]
    # export by id, import as another ref: the same tree
    buf = io.BytesIO()
    export_bundle(repo.store, repo.m, old, buf)
    buf.seek(0)
    import_bundle(repo.store, repo.m, buf, name="copy")
    dest = os.path.join(shm_tmp, "imported")
    repo.checkout("copy", dest)
    assert_same_tree(copies[0], dest)
    # rollback to an id: the head's tree is that version's
    c = repo.rollback("app", old)
    assert c.root == repo.log("app")[2].root and len(repo.log("app")) == 3


def test_rollback_takes_an_all_digit_commit_id_prefix(
    two_versions: tuple[Repo, str, list[str], list[str]],
) -> None:
    """Commit ids are hex, so about one 8-digit prefix in 40 is all decimal digits; rollback's
    N (versions back) once swallowed such a prefix and failed: the log is not that long."""
    repo, _src, _copies, ids = two_versions
    first = repo.log("app")[1]
    with repo.m.write() as txn:  # versions of the first tree until one's id begins with digits
        for i in range(2000):
            c = repo.m.put_commit(
                txn, ref="app", root=bytes.fromhex(first.root), parent=ids[1], message=str(i)
            )
            if c.id[:6].isdigit():
                break
    assert c.id[:6].isdigit()
    with pytest.raises(VeloError) as ei:
        repo.rollback("app", 0)
    assert ei.value.reason is Reason.USAGE
    assert repo.rollback("app", c.id[:6]).root == first.root  # the digits name that version
    assert repo.rollback("app", "1").root == repo.log("app")[2].root  # a short N is still N
    with pytest.raises(VeloError) as ei:
        repo.rollback("app", "99")  # digits beyond the log naming no commit: N, and why not
    assert ei.value.reason is Reason.NOT_FOUND and "shorter" in ei.value.message


def test_bad_and_ambiguous_commit_ids(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "app")
    make_project(src)
    ingest(repo.store, repo.m, src, "app", jobs=1)
    head = repo.log("app")[0]
    # commits until two ids share their first 4 hex digits (expected after ~320)
    seen: dict[str, str] = {head.id[:4]: head.id}
    clash = None
    with repo.m.write() as txn:
        for i in range(20000):
            c = repo.m.put_commit(
                txn, ref="app", root=bytes.fromhex(head.root), parent=head.id, message=str(i)
            )
            if c.id[:4] in seen:
                clash = (c.id[:4], seen[c.id[:4]], c.id)
                break
            seen[c.id[:4]] = c.id
    assert clash is not None
    with pytest.raises(VeloError) as ei:
        repo.resolve_root(clash[0])
    assert ei.value.reason is Reason.BAD_REF and "ambiguous" in ei.value.message
    for full in clash[1:]:  # a longer prefix of each is unique
        n = next(k for k in range(5, 65) if full[:k] != (set(clash[1:]) - {full}).pop()[:k])
        assert repo.resolve_root(full[:n]) == bytes.fromhex(head.root)
    free = next(f"{i:04x}" for i in range(1 << 16) if f"{i:04x}" not in seen)
    with pytest.raises(VeloError) as ei:
        repo.resolve_root(free)
    assert ei.value.reason is Reason.NOT_FOUND
    with pytest.raises(VeloError) as ei:
        repo.resolve_root("abc")  # shorter than a prefix may be: a name, and there is none
    assert ei.value.reason is Reason.NOT_FOUND


def test_tags_name_versions_that_gc_keeps(
    two_versions: tuple[Repo, str, list[str], list[str]], shm_tmp: str
) -> None:
    repo, _src, copies, ids = two_versions
    repo.tag("release-1", ids[0][:7])
    assert [(t.name, c.id) for t, c in repo.tags()] == [("release-1", ids[0])]
    with pytest.raises(VeloError) as ei:
        repo.tag("release-1", "app")
    assert ei.value.reason is Reason.EXISTS
    with pytest.raises(VeloError) as ei:
        repo.tag("app", "app@{1}")  # a ref's name: the tag could never be read
    assert ei.value.reason is Reason.EXISTS
    with pytest.raises(VeloError) as ei:
        repo.tag("beef", "app")  # looks like a commit id
    assert ei.value.reason is Reason.BAD_NAME

    rep = gc(repo.store, repo.m, keep=1, grace=0)
    assert rep.commits_deleted == 0  # app@{1} is tagged
    dest = os.path.join(shm_tmp, "tagged")
    repo.checkout("release-1", dest)
    assert_same_tree(copies[0], dest)
    assert repo.resolve_root("release-1@{0}") == repo.resolve_root(ids[0])

    # the ref goes; the tagged version stays readable and its objects stay
    repo.delete_ref("app")
    gc(repo.store, repo.m, keep=1, grace=0)
    dest2 = os.path.join(shm_tmp, "tagged-after-delete")
    repo.checkout("release-1", dest2)
    assert_same_tree(copies[0], dest2)
    with pytest.raises(VeloError) as ei:
        repo.resolve_root(ids[1])  # untagged and unreferenced: gone
    assert ei.value.reason is Reason.NOT_FOUND

    # without the tag, gc --keep 1 lets the old version go
    repo.delete_tag("release-1")
    gc(repo.store, repo.m, keep=1, grace=0)
    with pytest.raises(VeloError) as ei:
        repo.resolve_root(ids[0][:8])
    assert ei.value.reason is Reason.NOT_FOUND
    with pytest.raises(VeloError) as ei:
        repo.delete_tag("release-1")
    assert ei.value.reason is Reason.NOT_FOUND


def test_a_ref_cannot_take_a_tags_name(
    two_versions: tuple[Repo, str, list[str], list[str]],
) -> None:
    repo, src, _copies, _ids = two_versions
    repo.tag("v1", "app")
    with pytest.raises(VeloError) as ei:
        ingest(repo.store, repo.m, src, "v1", jobs=1)
    assert ei.value.reason is Reason.EXISTS


def test_rollback_restores_the_versions_path(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "app")
    make_project(src)
    ingest(repo.store, repo.m, src, "app", jobs=1)
    first = repo.log("app")[0]
    assert first.path == src
    with repo.m.write() as txn:  # a later version projected elsewhere (what ingest records)
        repo.m.commit(
            txn,
            "app",
            bytes.fromhex(first.root),
            expect_head=first.id,
            message="moved",
            path=os.path.join(shm_tmp, "elsewhere"),
        )
    assert repo.refs()[0][0].path == os.path.join(shm_tmp, "elsewhere")
    repo.rollback("app", 1)
    assert repo.refs()[0][0].path == src
