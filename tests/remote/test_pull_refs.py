"""Which local ref a pull may write to. The registry names the ref (the version's config, or the
tag): it must never move one of the user's own refs — one ingested from their project, or pulled
from another registry or repository — or `run HOST/REPO:TAG` would project the registry's tree
at the user's directory and commit the session onto their ref. Such a pull is refused
(other-source) before anything is stored; a newer version of a ref that came from the same
registry and repository, `--name`, and `--force` still work."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cli import velo
from tests.helpers.trees import assert_same_tree, make_tree
from tests.remote.fake_registry import FakeRegistry, file_entry, one_dir
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.remote import Options, pull
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

OPTS = Options(retries=0, timeout=10, backoff=0.01)
EVIL = b"#!/bin/sh\necho owned\n"


def _serve(fake: FakeRegistry, data: bytes, *, tag: str = "v1", ref: str | None = "proj") -> None:
    root, nodes = one_dir([file_entry(b"run.sh", data, mode=0o755)])
    fake.serve_version(nodes, {hash_bytes(data): data}, root, tag=tag, config={"ref": ref})


def _project(repo: Repo, shm_tmp: str) -> str:
    src = os.path.join(shm_tmp, "proj")
    make_tree(src, {"main.py": b"print('mine')\n", "lib/util.py": b"x = 1\n"})
    ingest(repo.store, repo.m, src, "proj", jobs=1)
    return src


def _head(repo: Repo, ref: str) -> str:
    with repo.m.read() as txn:
        r = repo.m.get_ref(txn, ref)
        assert r is not None
        return r.head


def _refused(repo: Repo, remote: str, **kw: object) -> VeloError:
    with pytest.raises(VeloError) as ei:
        pull(repo.store, repo.m, remote, options=OPTS, **kw)  # type: ignore[arg-type]
    assert ei.value.reason is Reason.OTHER_SOURCE, ei.value
    assert ei.value.hint and "--name" in ei.value.hint and "--force" in ei.value.hint
    return ei.value


def _checked_out(repo: Repo, ref: str, shm_tmp: str, name: str) -> str:
    out = os.path.join(shm_tmp, name)
    repo.checkout(ref, out)
    return out


@pytest.mark.parametrize("by_tag", [False, True], ids=["config-ref", "tag"])
def test_a_pull_never_moves_an_ingested_ref(
    fake: FakeRegistry, repo: Repo, shm_tmp: str, by_tag: bool
) -> None:
    src = _project(repo, shm_tmp)
    before = _head(repo, "proj")
    if by_tag:  # no ref in the config: the tag names the ref
        _serve(fake, EVIL, tag="proj", ref=None)
        remote = fake.remote("proj")
    else:
        _serve(fake, EVIL)
        remote = fake.remote()
    err = _refused(repo, remote)
    assert "proj" in err.message and src in err.message
    assert _head(repo, "proj") == before
    assert_same_tree(_checked_out(repo, "proj", shm_tmp, "out"), src)
    assert len(repo.log("proj")) == 1


def test_run_of_a_remote_never_moves_an_ingested_ref(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    """`run HOST/REPO:TAG` pulls first: refused there, before a session projects the registry's
    tree at the user's directory (and commits what the command does there onto their ref)."""
    src = _project(repo, shm_tmp)
    _serve(fake, EVIL)
    cwd = os.path.join(shm_tmp, "elsewhere")  # (the old code ran the command here)
    os.mkdir(cwd)
    out = velo(
        repo.store.root, "run", fake.remote(), "--", "sh", "-c", "echo owned > main.py", cwd=cwd
    )
    err = out.stderr.decode()
    assert out.returncode != 0, err
    assert err.startswith("error:") and "\nhint:" in err and "Traceback" not in err, err
    as_json = velo(repo.store.root, "--json", "run", fake.remote(), "--", "true")
    assert json.loads(as_json.stdout)["reason"] == "other-source", as_json
    assert len(repo.log("proj")) == 1
    assert_same_tree(_checked_out(repo, "proj", shm_tmp, "out"), src)


def test_a_ref_pulled_from_one_registry_is_not_moved_by_another(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    _serve(fake, b"good\n")
    pull(repo.store, repo.m, fake.remote(), options=OPTS)
    good = _checked_out(repo, "proj", shm_tmp, "good")
    other = FakeRegistry()
    try:
        _serve(other, EVIL)
        err = _refused(repo, other.remote())
        assert fake.host in err.message
    finally:
        other.close()
    assert len(repo.log("proj")) == 1
    assert_same_tree(_checked_out(repo, "proj", shm_tmp, "after"), good)


def test_the_same_registry_and_repository_may_add_a_version(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    _serve(fake, b"v1\n")
    pull(repo.store, repo.m, fake.remote(), options=OPTS)
    _serve(fake, b"v2\n", tag="v2")
    res = pull(repo.store, repo.m, fake.remote("v2"), options=OPTS)
    assert res.commit is not None and res.ref == "proj"
    assert len(repo.log("proj")) == 2
    want = os.path.join(shm_tmp, "want")
    make_tree(want, {"run.sh": b"v2\n"})
    os.chmod(os.path.join(want, "run.sh"), 0o755)
    out = _checked_out(repo, "proj", shm_tmp, "out")
    assert_same_tree(out, want, mtimes=False, dir_mtimes=False)


def test_name_and_force_still_work(fake: FakeRegistry, repo: Repo, shm_tmp: str) -> None:
    src = _project(repo, shm_tmp)
    _serve(fake, EVIL)
    res = pull(repo.store, repo.m, fake.remote(), name="theirs", options=OPTS)
    assert res.ref == "theirs"
    assert_same_tree(_checked_out(repo, "proj", shm_tmp, "mine"), src)
    _refused(repo, fake.remote(), name="proj")  # an explicit existing name: --force, as import
    forced = pull(repo.store, repo.m, fake.remote(), name="proj", force=True, options=OPTS)
    assert forced.commit is not None and len(repo.log("proj")) == 2
    assert_same_tree(
        _checked_out(repo, "proj", shm_tmp, "forced"),
        _checked_out(repo, "theirs", shm_tmp, "theirs"),
    )
    _serve(fake, b"v2\n", tag="v2")  # from now on that ref follows this registry
    assert pull(repo.store, repo.m, fake.remote("v2"), options=OPTS).commit is not None


def test_a_deleted_and_reingested_ref_is_not_the_pulled_one(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    """The store's note of where a ref was pulled from goes with the ref: a ref of that name
    ingested later is the user's own."""
    _serve(fake, b"v1\n")
    pull(repo.store, repo.m, fake.remote(), options=OPTS)
    repo.delete_ref("proj")
    src = _project(repo, shm_tmp)
    _serve(fake, EVIL, tag="v2")
    _refused(repo, fake.remote("v2"))
    assert_same_tree(_checked_out(repo, "proj", shm_tmp, "out"), src)


def test_a_local_ref_with_the_same_tree_is_not_taken_for_the_pulled_one(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    """A pull whose tree equals the existing ref's returned "up to date" before it checked
    that the ref may be moved by this registry: a ref the user made here (not pulled) that
    happens to hold the same tree was reported as pulled from the registry, while the next
    version of the tag was then refused (other-source) — one source, two answers (found by
    reading pull.py). The ref's source is checked first now; `--force` adopts it."""
    _serve(fake, b"same\n")
    theirs = pull(repo.store, repo.m, fake.remote(), name="theirs", options=OPTS)
    with repo.m.write() as txn:  # the user's own ref, made here, with that very tree
        repo.m.commit(txn, "proj", bytes.fromhex(theirs.root), expect_head=None, message="mine")
    before = _head(repo, "proj")
    _refused(repo, fake.remote())
    assert _head(repo, "proj") == before and len(repo.log("proj")) == 1
    _serve(fake, b"v2\n", tag="v2")
    _refused(repo, fake.remote("v2"))  # the same answer for the next version
    forced = pull(repo.store, repo.m, fake.remote(), force=True, options=OPTS)
    assert forced.commit is None and _head(repo, "proj") == before  # the tree is there already
    res = pull(repo.store, repo.m, fake.remote("v2"), options=OPTS)  # adopted: it follows now
    assert res.commit is not None and len(repo.log("proj")) == 2
