"""The shim's tree sync reads a file's access ACL (`posixacl.mode_at`, an xattr read) to narrow
its group bits. It read it on every tick for every file with group bits, even where the stat cache
said the file was unchanged; now the narrowed mode is kept with the cache, and an ACL change
(which moves ctime) is still seen. The tree is a plain directory ingested as the ref, with the
baseline materialisation would have written for it (the stat of each file, its digest)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest

from tests.helpers.trees import make_tree, settle_ctimes
from tests.ingest.test_acl import secret_acl
from veloverlay import posixacl
from veloverlay.ingest.pipeline import ingest
from veloverlay.session.shim import treesync
from veloverlay.session.shim.materialize import Baseline
from veloverlay.session.shim.treesync import SUBTREE, TreeSync
from veloverlay.store.tree import Kind, OpKind
from veloverlay.tiers import Rules
from veloverlay.verbs.repo import Repo

FILES = {"a": b"aa\n", "d/b": b"bb\n", "d/c": b"cc\n", "team": b"tt\n"}


@pytest.fixture
def tree(repo: Repo, shm_tmp: str) -> Iterator[tuple[TreeSync, bytes, str]]:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, FILES)
    for rel in FILES:
        os.chmod(os.path.join(src, rel), 0o640)
    # group::r-- and mask::r--: the owning group may read (0640 stored)
    os.setxattr(os.path.join(src, "team"), posixacl.ACCESS, secret_acl(6, 4, 0))
    settle_ctimes(src)
    ingest(repo.store, repo.m, src, "t", jobs=1)
    root = repo.resolve_root("t")
    baseline = Baseline()
    with repo.m.read() as txn:
        for rel in FILES:
            st = os.lstat(os.path.join(src, rel))
            e = repo.m.lookup(txn, root, os.fsencode(rel))
            assert e is not None and e.kind is Kind.FILE and e.digest is not None
            baseline.by_ino[st.st_ino] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, e.digest)
    sync = TreeSync(repo.store, repo.m, os.fsencode(src), baseline, Rules.default(), link=False)
    yield sync, root, src


def _sync(repo: Repo, sync: TreeSync, root: bytes) -> list[tuple[OpKind, bytes, int]]:
    with repo.m.read() as txn, repo.store.stage() as stage:
        res = sync.sync(txn, root, {b"": SUBTREE}, stage)
    return [(op.kind, op.path, op.entry.mode if op.entry else op.mode) for op in res.ops]


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    reads: list[bytes] = []
    real = posixacl.mode_at

    def counted(dfd: int, name: bytes, perm: int) -> int:
        reads.append(name)
        return real(dfd, name, perm)

    monkeypatch.setattr(treesync.posixacl, "mode_at", counted)
    return reads


def test_an_unchanged_file_is_not_asked_for_its_acl_every_tick(
    repo: Repo, tree: tuple[TreeSync, bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sync, root, _src = tree
    reads = _counting(monkeypatch)
    assert _sync(repo, sync, root) == []  # the tree is what was ingested
    first = len(reads)
    assert first == len(FILES)  # read once: the stat cache alone does not know the ACLs
    for _tick in range(3):
        assert _sync(repo, sync, root) == []
    assert len(reads) == first, f"ACLs read again for unchanged files: {reads[first:]}"


def test_a_changed_acl_is_still_seen(
    repo: Repo, tree: tuple[TreeSync, bytes, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sync, root, src = tree
    team = os.path.join(src, "team")
    assert _sync(repo, sync, root) == []
    before = os.lstat(team)
    # group::--- with the mask kept: lstat's bits stay 0640, only ctime moves
    os.setxattr(team, posixacl.ACCESS, secret_acl(6, 0, 0))
    after = os.lstat(team)
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode) == 0o640
    assert after.st_ctime_ns != before.st_ctime_ns
    reads = _counting(monkeypatch)
    ops = _sync(repo, sync, root)
    assert reads == [b"team"]
    assert ops == [(OpKind.META, b"team", 0o600)]  # what the ACL now gives the owning group
