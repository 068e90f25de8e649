"""A store's life cycle (issue 15, item 8): gc leaves no empty fan-out directories, a whole store
can be removed although its objects carry `chattr +i`, status data says what the store uses on
disk, and deleting a ref says what it frees and when.

Trees are real-shaped (a C project under git); disk use is compared with a walk of the store's
directories (what `du` counts), freed objects with the source trees' file contents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.envs.realtree import make_project
from tests.helpers.trees import force_rmtree, inode_flags_at
from veloverlay import fsflags
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.gc import gc
from veloverlay.verbs.repo import Repo, remove_store


def _dirs_under(path: str) -> int:
    return sum(len(dirs) for _p, dirs, _f in os.walk(path))


def _contents(root: str) -> set[bytes]:
    """BLAKE3 of every non-empty regular file under root (the objects its ingest stores)."""
    out: set[bytes] = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    out.add(hash_bytes(f.read()))
    return out


def _du(path: str) -> tuple[int, int, int]:
    """(files, dirs, bytes allocated) below path, each inode once, as du counts."""
    files = dirs = used = 0
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            dirs += 1
            used += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            files += 1
            used += st.st_blocks * 512
    return files, dirs, used


def test_gc_removes_the_empty_fanout_directories(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "app")
    make_project(src)
    ingest(repo.store, repo.m, src, "app", jobs=1)
    objects = os.fspath(repo.store.objects)
    assert _dirs_under(objects) > 0
    repo.delete_ref("app")
    rep = gc(repo.store, repo.m, grace=0)
    assert rep.objects_deleted == len(_contents(src))
    assert list(repo.store.iter_objects()) == []
    assert _dirs_under(objects) == 0, os.listdir(objects)
    assert rep.dirs_removed > 0
    # and the store goes on working: the same tree again, in shards made anew
    ingest(repo.store, repo.m, src, "app2", jobs=1)
    assert {bytes.fromhex(n) for n, _p in repo.store.iter_objects()} == _contents(src)


def test_gc_leaves_shards_that_hold_objects(repo: Repo, shm_tmp: str) -> None:
    a, b = os.path.join(shm_tmp, "a"), os.path.join(shm_tmp, "b")
    make_project(a)
    make_project(b)
    with open(os.path.join(b, "extra"), "wb") as f:
        f.write(b"only in b\n")
    ingest(repo.store, repo.m, a, "a", jobs=1)
    ingest(repo.store, repo.m, b, "b", jobs=1)
    repo.delete_ref("b")
    gc(repo.store, repo.m, grace=0)
    assert {bytes.fromhex(n) for n, _p in repo.store.iter_objects()} == _contents(a)


def test_disk_usage_is_what_the_store_holds(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "app")
    make_project(src)
    ingest(repo.store, repo.m, src, "app", jobs=1)
    use = repo.disk_usage()
    files, dirs, used = _du(os.fspath(repo.store.objects))
    assert use["objects"] == {
        "files": files,
        "dirs": dirs + 1,
        "bytes": used + _blocks(repo.store.objects),
    }
    assert use["objects"]["files"] == len(_contents(src))
    t_files, t_dirs, t_used = _du(os.fspath(repo.store.root))
    assert use["total"] == {
        "files": t_files,
        "dirs": t_dirs,
        "bytes": t_used,
    }


def _blocks(path: str | os.PathLike[str]) -> int:
    return os.lstat(path).st_blocks * 512


def test_deleting_a_ref_says_what_it_frees_and_when(repo: Repo, shm_tmp: str) -> None:
    a, b = os.path.join(shm_tmp, "a"), os.path.join(shm_tmp, "b")
    make_project(a)
    make_project(b)
    for i in range(3):
        with open(os.path.join(b, f"only-b-{i}"), "wb") as f:
            f.write(b"b's own %d\n" % i * 1000)
    ingest(repo.store, repo.m, a, "a", jobs=1)
    ingest(repo.store, repo.m, b, "b", jobs=1)
    own = _contents(b) - _contents(a)
    fp = repo.delete_ref("b", grace=3600)
    assert fp.objects == len(own)
    expected = sum(os.lstat(repo.store.object_path(d)).st_blocks * 512 for d in own)
    assert fp.bytes == expected
    # just stored: nothing is older than the grace yet, all of it is free an hour on
    assert fp.objects_now == 0 and fp.free_after > 0
    newest = max(os.lstat(repo.store.object_path(d)).st_ctime for d in own)
    assert fp.free_after == pytest.approx(newest + 3600)
    assert gc(repo.store, repo.m, grace=3600).objects_deleted == 0
    rep = gc(repo.store, repo.m, grace=0)
    assert rep.objects_deleted == len(own)
    assert {bytes.fromhex(n) for n, _p in repo.store.iter_objects()} == _contents(a)


def test_a_tagged_version_is_not_freed_by_deleting_its_ref(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "app")
    make_project(src)
    ingest(repo.store, repo.m, src, "app", jobs=1)
    repo.tag("keep-me", "app")
    fp = repo.delete_ref("app", grace=0)
    assert (fp.objects, fp.bytes) == (0, 0)


@pytest.mark.needs("root", "chattr")
def test_remove_store_clears_immutable_objects(shm_tmp: str) -> None:
    if not inode_flags_at(shm_tmp):
        pytest.skip("this test's tmpfs has no inode flags (tmpfs before Linux 6.0)")
    root = os.path.join(shm_tmp, "store")
    repo = Repo.open(root, create=True)
    src = os.path.join(shm_tmp, "app")
    make_project(src)
    ingest(repo.store, repo.m, src, "app", jobs=1)
    for _n, p in repo.store.iter_objects():  # what a root session does to every object it uses
        fsflags.set_immutable(p, True)
    use = repo.disk_usage()
    repo.close()
    rm = subprocess.run(["rm", "-rf", root], capture_output=True, text=True)
    assert rm.returncode != 0 and os.path.isdir(root)  # the trap the user met
    removed = remove_store(root)
    assert not os.path.lexists(root)
    assert removed["files"] <= use["total"]["files"] and removed["files"] >= use["objects"]["files"]


def test_remove_store_refuses_what_is_not_a_store_or_has_live_sessions(shm_tmp: str) -> None:
    plain = os.path.join(shm_tmp, "plain")
    os.makedirs(os.path.join(plain, "objects-v1"))
    with open(os.path.join(plain, "objects-v1", "notes.txt"), "w") as f:
        f.write("mine\n")
    with pytest.raises(VeloError) as ei:
        remove_store(plain)
    assert ei.value.reason is Reason.STORE_MISSING
    assert os.path.isdir(plain)

    root = os.path.join(shm_tmp, "store")
    repo = Repo.open(root, create=True)
    src = os.path.join(shm_tmp, "app")
    make_project(src)
    ingest(repo.store, repo.m, src, "app", jobs=1)
    head = repo.log("app")[0].root
    repo.close()
    sdir = os.path.join(root, "sessions", "s1")
    os.makedirs(sdir)
    with open(os.path.join(sdir, "state.json"), "w") as f:  # a session that was never harvested
        json.dump({"id": "s1", "state": "running", "roots": [head]}, f)
    with pytest.raises(VeloError) as ei:
        remove_store(root)
    assert ei.value.reason is Reason.SESSION_ACTIVE
    assert os.path.isdir(os.path.join(root, "manifests.lmdb"))
    remove_store(root, force=True)
    assert not os.path.lexists(root)


def _store_with_project(shm_tmp: str) -> str:
    root = os.path.join(shm_tmp, "store")
    repo = Repo.open(root, create=True)
    src = os.path.join(shm_tmp, "app")
    if not os.path.isdir(src):
        make_project(src)
    ingest(repo.store, repo.m, src, "app", jobs=1)
    repo.close()
    return root


def _remove_store_cli(root: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VELO_STORE=root)
    env.pop("VELO_INTERNAL__TEST_FAULT", None)
    if fault:
        env["VELO_INTERNAL__TEST_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "veloverlay", "remove-store", "--yes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_remove_store_killed_at_every_step_is_finished_by_a_rerun(shm_tmp: str) -> None:
    """SIGKILL after each part of the store removed: the rerun recognises what is left and
    removes it (a kill after CACHEDIR.TAG, the database and the objects had gone left a
    directory that remove-store refused as "no veloverlay store", and `init` would have used)."""
    root = _store_with_project(shm_tmp)
    parts = len(os.listdir(root)) - 1  # all but the lock file, removed with the directory
    for n in range(1, parts + 1):
        if not os.path.isdir(root):
            root = _store_with_project(shm_tmp)
        killed = _remove_store_cli(root, fault=f"remove.entry:{n}")
        assert killed.returncode == -signal.SIGKILL, (n, killed.stderr)
        left = sorted(os.listdir(root))
        again = _remove_store_cli(root)
        assert again.returncode == 0, f"kill {n}, left {left}: {again.stderr}"
        assert not os.path.lexists(root), f"kill {n}, left {left}"


def test_remove_store_finishes_what_a_removal_in_any_order_left(shm_tmp: str) -> None:
    """The remains of a removal killed after its marks of identity went first (an older
    version removed in directory order): the lock file and store parts only."""
    root = _store_with_project(shm_tmp)
    for name in ("CACHEDIR.TAG", "manifests.lmdb", "objects-v2"):
        force_rmtree(os.path.join(root, name))
    assert "lock" in os.listdir(root) and "sessions" in os.listdir(root)
    remove_store(root)
    assert not os.path.lexists(root)


def test_remove_store_takes_no_directory_with_other_files_for_remains(shm_tmp: str) -> None:
    plain = os.path.join(shm_tmp, "plain")
    os.makedirs(os.path.join(plain, "tmp"))
    for name in ("lock", "notes.txt"):
        with open(os.path.join(plain, name), "w") as f:
            f.write("mine\n")
    with pytest.raises(VeloError) as ei:
        remove_store(plain)
    assert ei.value.reason is Reason.STORE_MISSING
    assert sorted(os.listdir(plain)) == ["lock", "notes.txt", "tmp"]
    # names other programs use too are no store's remains, nor is a lock file with content
    os.unlink(os.path.join(plain, "notes.txt"))
    os.makedirs(os.path.join(plain, "sessions"))
    with pytest.raises(VeloError) as ei:
        remove_store(plain)
    assert ei.value.reason is Reason.STORE_MISSING
    os.rmdir(os.path.join(plain, "tmp"))
    os.rmdir(os.path.join(plain, "sessions"))
    with pytest.raises(VeloError) as ei:
        remove_store(plain)  # a lone lock file of someone else's: "mine\n"
    assert sorted(os.listdir(plain)) == ["lock"]
