"""Push and pull through a real registry (tests/remote/conftest.py): round trip, increments,
verification, resume, auth, TLS and standard compliance (skopeo reads what we push)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.trees import assert_same_tree, make_tree
from tests.remote.conftest import PASSWORD, USER, Registry
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.remote import Options, pull, push
from veloverlay.remote.auth import Credentials
from veloverlay.repo import Repo
from veloverlay.verify import fsck

_counter = [0]


def _repo_name(tag: str) -> str:
    _counter[0] += 1
    return f"test/{tag}-{os.getpid()}-{_counter[0]}"


@pytest.fixture
def other(shm_tmp: str) -> Iterator[Repo]:
    """A second, empty store (the 'other machine'); fsck must pass at the end."""
    r = Repo.open(os.path.join(shm_tmp, "other"), create=True)
    yield r
    report = fsck(r.store, r.m, jobs=1)
    assert report.ok, report.findings
    r.close()


def _opts(reg: Registry, **kw: Any) -> Options:
    return Options(ca_cert=str(reg.ca), **kw)


def _source(shm_tmp: str, n: int = 300) -> str:
    src = os.path.join(shm_tmp, "src")
    spec: dict[str, object] = {
        f"pkg/m{i // 50}/f{i}.py": (f"# file {i}\n" * (i % 37 + 1)).encode() for i in range(n)
    }
    spec["big/blob.bin"] = os.urandom(3 << 20)  # travels alone
    spec["big/mid.bin"] = os.urandom(900_000)  # packed
    spec["empty.txt"] = b""
    spec["dir/empty"] = None
    spec["bin/python"] = ("link", "/usr/bin/python3")
    spec["odd name \u00e9"] = b"x"
    make_tree(src, spec)
    os.chmod(os.path.join(src, "pkg/m0/f0.py"), 0o755)
    return src


def test_round_trip(logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str) -> None:
    src = _source(shm_tmp)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    target = logged_in.remote(_repo_name("rt"), "v1")
    [pushed] = push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    assert pushed.large_new == 1 and pushed.packs_new >= 2  # nodes + objects
    got = pull(other.store, other.m, target, name="env2", options=_opts(logged_in))
    assert got.root == pushed.root and got.digest == pushed.digest
    out = os.path.join(shm_tmp, "out")
    other.checkout("env2", out)
    assert_same_tree(src, out)
    # pulling again fetches nothing and adds no commit
    mark = logged_in.log_mark()
    again = pull(other.store, other.m, target, name="env2", options=_opts(logged_in))
    assert again.commit is None
    assert logged_in.blob_bytes_sent(mark, target.split("/", 1)[1].split(":")[0]) < 20_000


def test_incremental_push_uploads_the_delta(
    logged_in: Registry, repo: Repo, other: Repo, shm_tmp: str
) -> None:
    src = _source(shm_tmp, n=2000)
    ingest(repo.store, repo.m, src, "env", jobs=1)
    target = logged_in.remote(_repo_name("inc"), "v")
    push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    first = pull(other.store, other.m, target, name="env", options=_opts(logged_in))
    full_pull = first.bytes_fetched
    # change 10 files (fresh random content, 20 KB each) and re-ingest
    changed = 0
    for i in range(10):
        p = os.path.join(src, f"pkg/m{i}/f{i * 50 + 1}.py")
        with open(p, "wb") as f:
            f.write(os.urandom(20_000))
        changed += 20_000
    ingest(repo.store, repo.m, src, "env", jobs=1)
    before = logged_in.stored_blob_bytes()
    [second] = push(repo.store, repo.m, ["env"], target, options=_opts(logged_in))
    stored = logged_in.stored_blob_bytes() - before
    assert second.packs_reused >= 2 and second.large_reused == 1
    # the ten files' bytes plus metadata (a small node pack, indexes, config), not the tree
    assert changed <= stored < changed + 60_000, (stored, changed)
    # and a pull of the new version fetches about the same
    repo_path = target.split("/", 1)[1].split(":")[0]
    mark = logged_in.log_mark()
    pull(other.store, other.m, target, name="env", options=_opts(logged_in))
    fetched = logged_in.blob_bytes_sent(mark, repo_path)
    assert changed <= fetched < changed + 400_000 < full_pull, (fetched, full_pull)
    out = os.path.join(shm_tmp, "out")
    other.checkout("env", out)
    assert_same_tree(src, out)
