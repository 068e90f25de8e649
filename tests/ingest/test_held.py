"""Small objects a worker writes unnamed (O_TMPFILE) and names once their bytes are synced
(stage.py `_hold`): batches, the bound on descriptors held, a failure half-way, and the ways
back to staging by name (no O_TMPFILE, no AT_EMPTY_PATH for this process, fs-verity).

Each ingest is compared with its source tree, and every stored object with its name (P0-a).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from tests.helpers.trees import assert_same_tree
from veloverlay import _libc, faults
from veloverlay.errors import VeloError
from veloverlay.ingest.pipeline import ingest
from veloverlay.store import publish, stage
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

FILES = 40


def _tree(root: str) -> None:
    """40 small files in 0555 and setgid directories, 0444 files, two with the same bytes."""
    for i in range(FILES):
        d = os.path.join(root, f"d{i % 4}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"f{i}")
        with open(p, "wb") as f:
            f.write(b"same" if i in (3, 17) else os.urandom(64 + i))
        os.chmod(p, 0o444)
    os.chmod(os.path.join(root, "d1"), 0o2755)
    os.chmod(os.path.join(root, "d2"), 0o555)


def _objects_named_right(store: str) -> int:
    """P0-a over the whole store; returns the object count."""
    n = 0
    for dirpath, _dirs, files in os.walk(os.path.join(store, "objects-v2")):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert hash_bytes(f.read()).hex() == name
            n += 1
    return n


def _stage_files(store: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(os.path.join(store, "tmp")):
        out += [os.path.join(dirpath, f) for f in files if not f.endswith(".lock")]
    return out


@pytest.fixture
def world(shm_tmp: str) -> Iterator[tuple[str, str, Repo]]:
    src, store = os.path.join(shm_tmp, "src"), os.path.join(shm_tmp, "store")
    _tree(src)
    repo = Repo.open(store, create=True)
    try:
        yield src, store, repo
    finally:
        repo.close()
        for dirpath, dirs, _files in os.walk(src):
            for d in dirs:
                os.chmod(os.path.join(dirpath, d), 0o755)


def _check(src: str, store: str, repo: Repo, shm_tmp: str, ref: str) -> None:
    out = os.path.join(shm_tmp, f"out-{ref}")
    repo.checkout(ref, out)
    assert_same_tree(src, out)
    assert _objects_named_right(store) == FILES - 1  # two files share their bytes
    assert _stage_files(store) == []


@pytest.mark.parametrize("jobs", [1, 2])
def test_batches_are_named_as_they_fill_and_descriptors_stay_bounded(
    world: tuple[str, str, Repo], shm_tmp: str, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    src, store, repo = world
    monkeypatch.setattr(stage, "_HOLD", 6)
    batches: list[int] = []
    real = publish.name_held

    def counted(store_: object, held: dict[bytes, int], shards: publish.Shards) -> list[bytes]:
        batches.append(len(held))
        return real(store_, held, shards)  # type: ignore[arg-type]

    monkeypatch.setattr(stage, "_hold_budget", lambda _s: 6)  # below the 256 floor, for a test
    monkeypatch.setattr(publish, "name_held", counted)
    res = ingest(repo.store, repo.m, src, "t", jobs=jobs)
    assert res.new_objects == FILES - 1
    _check(src, store, repo, shm_tmp, "t")
    if jobs == 1:  # in this process: the batches are seen here
        assert max(batches) <= 6 and sum(batches) == FILES - 1
        assert len(batches) >= (FILES - 1) // 6


def test_a_failure_half_way_names_only_whole_objects_and_leaks_no_descriptor(
    world: tuple[str, str, Repo], shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third object named raises (a full disk, a bug): the ingest fails, commits nothing;
    what was named is whole; no held descriptor stays open; the next ingest completes."""
    src, store, repo = world
    monkeypatch.setattr(stage, "_hold_budget", lambda _s: 6)
    seen = [0]
    real = faults.point

    def boom(name: str) -> None:
        if name == "publish.renamed":
            seen[0] += 1
            if seen[0] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(name)

    monkeypatch.setattr(faults, "point", boom)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises((OSError, VeloError)):
        ingest(repo.store, repo.m, src, "t", jobs=1)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert [r.name for r, _c in repo.refs()] == []
    assert 2 <= _objects_named_right(store) < FILES - 1
    monkeypatch.setattr(faults, "point", real)
    ingest(repo.store, repo.m, src, "t", jobs=1)
    _check(src, store, repo, shm_tmp, "t")


def test_a_filesystem_without_unnamed_files_stages_by_name(
    world: tuple[str, str, Repo], shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, store, repo = world
    tried = [0]

    def refuse(_dir_fd: int, **_kw: object) -> int:
        tried[0] += 1
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(stage, "open_unnamed", refuse)
    ingest(repo.store, repo.m, src, "t", jobs=1)
    assert tried[0] == 1  # found out once, then staged by name
    _check(src, store, repo, shm_tmp, "t")


def test_a_kernel_refusing_at_empty_path_names_through_proc(
    world: tuple[str, str, Repo], shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Linux 6.10 linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH: the unprivileged
    way is linkat of /proc/self/fd/N, following it."""
    src, store, repo = world
    calls: list[int] = []
    real = _libc._linkat

    def old_kernel(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> int:
        calls.append(flags)
        if flags & _libc.AT_EMPTY_PATH:
            _libc.ctypes.set_errno(errno.ENOENT)
            return -1
        return int(real(olddir, old, newdir, new, flags))

    monkeypatch.setattr(_libc, "_linkat", old_kernel)
    monkeypatch.setattr(_libc, "_link_by_proc", False)
    ingest(repo.store, repo.m, src, "t", jobs=1)
    assert calls[0] == _libc.AT_EMPTY_PATH  # tried once
    assert set(calls[1:]) == {_libc.AT_SYMLINK_FOLLOW}
    _check(src, store, repo, shm_tmp, "t")


def test_an_object_already_stored_is_not_written_again(
    world: tuple[str, str, Repo], shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, store, repo = world
    ingest(repo.store, repo.m, src, "a", jobs=1)
    opened = [0]
    real = stage.open_unnamed

    def count(dir_fd: int, **kw: bool) -> int:
        opened[0] += 1
        return real(dir_fd, **kw)

    monkeypatch.setattr(stage, "open_unnamed", count)
    with open(os.path.join(src, "d0", "new"), "wb") as f:
        f.write(b"one new object")
    os.chmod(os.path.join(src, "d0"), 0o755)
    res = ingest(repo.store, repo.m, src, "b", jobs=1)
    assert (opened[0], res.new_objects) == (1, 1)


def test_a_batch_is_named_only_after_a_syncfs_that_followed_its_bytes(
    world: tuple[str, str, Repo], shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full batch is synced and named by a thread while the next is written: the durability
    order holds for each object all the same (its bytes written, then a syncfs begun after
    that, then its name), and every object is named once."""
    import threading

    src, store, repo = world
    monkeypatch.setattr(stage, "_hold_budget", lambda _s: 6)  # batches of 3: one in flight
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    real_write, real_sync, real_link = stage._write_all, _libc.syncfs, _libc.link_fd

    def write(fd: int, data: bytes, path: bytes) -> None:
        real_write(fd, data, path)
        with lock:
            events.append(("written", os.fstat(fd).st_ino))

    def sync(fd: int) -> None:
        with lock:
            events.append(("sync", 0))
        real_sync(fd)

    def link(fd: int, dirfd: int, name: bytes) -> None:
        ino = os.fstat(fd).st_ino
        with lock:
            events.append(("named", ino))
        real_link(fd, dirfd, name)

    monkeypatch.setattr(stage, "_write_all", write)
    monkeypatch.setattr(_libc, "syncfs", sync)
    monkeypatch.setattr(_libc, "link_fd", link)
    ingest(repo.store, repo.m, src, "t", jobs=1)
    _check(src, store, repo, shm_tmp, "t")
    written = {ino: i for i, (what, ino) in enumerate(events) if what == "written"}
    syncs = [i for i, (what, _ino) in enumerate(events) if what == "sync"]
    named = [(i, ino) for i, (what, ino) in enumerate(events) if what == "named"]
    assert len(named) == len(written) == FILES - 1
    for i, ino in named:
        assert any(written[ino] < s < i for s in syncs), f"object {ino} named before a syncfs"
