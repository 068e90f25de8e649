"""The store's space reserve (store/reserve.py): what lets `refs --delete` and gc commit on a full
disk. A store without one (made before it existed) keeps working and gets one from its next
writer; gc never deletes it; fsck does not call it damage; something planted under its name is
neither followed nor waited on. (The full disk itself: tests/reliability/test_store_full.py.)"""

from __future__ import annotations

import errno
import json
import os

import pytest

from tests.envs.realtree import make_project
from tests.helpers.cli import velo_text
from tests.helpers.fulldisk import fill, private_tmpfs
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.store import reserve
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.gc import gc
from veloverlay.verbs.repo import Repo


def _allocated(repo: Repo) -> int:
    return os.lstat(repo.store.root / reserve.NAME).st_blocks * 512


def test_a_store_without_a_reserve_works_and_its_next_writer_makes_one(
    repo: Repo, shm_tmp: str
) -> None:
    assert _allocated(repo) == reserve.SIZE  # a new store has one
    os.unlink(repo.store.root / reserve.NAME)  # as a store made before it existed
    src = os.path.join(shm_tmp, "app")
    make_project(src)
    ingest(repo.store, repo.m, src, "app", jobs=1)
    assert _allocated(repo) == reserve.SIZE
    report = gc(repo.store, repo.m, grace=0)
    assert report.objects_kept > 0 and _allocated(repo) == reserve.SIZE
    assert fsck(repo.store, repo.m, jobs=1).ok
    repo.delete_ref("app")
    gc(repo.store, repo.m, grace=0)
    assert not list(repo.store.iter_objects()) and _allocated(repo) == reserve.SIZE


def test_only_a_full_disk_gives_the_reserve_up(repo: Repo) -> None:
    calls: list[int] = []

    def full_once() -> str:
        calls.append(_allocated(repo))
        if len(calls) == 1:
            raise VeloError("full", reason=Reason.STORE_FULL)
        return "done"

    assert reserve.freeing(repo.store, full_once) == "done"
    assert calls == [reserve.SIZE, 0]  # the retry ran with the reserve given up
    assert _allocated(repo) == reserve.SIZE  # and it is whole again (there is room here)

    def not_found() -> None:
        raise VeloError("no such ref", reason=Reason.NOT_FOUND)

    with pytest.raises(VeloError) as info:
        reserve.freeing(repo.store, not_found)
    assert info.value.reason is Reason.NOT_FOUND and _allocated(repo) == reserve.SIZE


def test_a_fifo_under_the_reserves_name_is_not_waited_on(repo: Repo) -> None:
    os.unlink(repo.store.root / reserve.NAME)
    os.mkfifo(repo.store.root / reserve.NAME, 0o600)
    assert reserve.ensure(repo.store) is False
    assert reserve.release(repo.store) is False
    with repo.store.lock():  # a writer goes on
        pass
    os.unlink(repo.store.root / reserve.NAME)


def _doctor(store: str) -> dict[str, object]:
    res = velo_text(store, "--json", "doctor", timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res
    return json.loads(res.stdout)["store"]["reserve"]  # type: ignore[no-any-return]


def test_doctor_reports_the_reserve(repo: Repo) -> None:
    """`doctor` did not look at the reserve: a store that had none (made before it existed, or
    given up) was not reported. Now: present (the bytes allocated), or missing with a hint."""
    got = _doctor(str(repo.store.root))
    assert got["state"] == "present" and got["bytes"] == _allocated(repo), got
    assert got["hint"] is None
    os.unlink(repo.store.root / reserve.NAME)  # as a store made before it existed
    got = _doctor(str(repo.store.root))
    assert got["state"] == "missing" and got["bytes"] == 0, got
    assert "writer" in str(got["hint"]), got
    assert not os.path.exists(repo.store.root / reserve.NAME)  # doctor changes nothing
    assert os.listdir(repo.store.tmp) == []


def _reserve_on_a_full_disk(base: str) -> dict[str, object]:
    mnt = private_tmpfs(base, "3m")
    store = os.path.join(mnt, "store")
    Repo.open(store, create=True).close()
    os.unlink(os.path.join(store, reserve.NAME))  # an old store, on a disk that then filled
    out: dict[str, object] = {"filler": fill(os.path.join(mnt, "filler"))}
    out["reserve"] = _doctor(store)
    return out


def test_doctor_says_a_full_disk_keeps_the_reserve_from_being_made(shm_tmp: str) -> None:
    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_reserve_on_a_full_disk, shm_tmp)
    assert out["filler"] == errno.ENOSPC, out
    got = out["reserve"]
    assert isinstance(got, dict) and got["state"] == "missing", out
    assert "full" in str(got["reason"]) and got["hint"], out


def test_a_filesystem_that_cannot_allocate_ahead(
    repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """posix_fallocate's EOPNOTSUPP (a filesystem that cannot allocate space ahead, where even
    glibc's emulation gives up) was raised from `ensure`, so from every writer's store lock.
    Simulated here: the answer the syscall gives there. The store works without a reserve,
    and `status` says it cannot be made."""

    def cannot(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    os.unlink(repo.store.root / reserve.NAME)
    monkeypatch.setattr(os, "posix_fallocate", cannot)
    assert reserve.ensure(repo.store) is False
    with repo.store.lock():  # a writer's lock: made the reserve, or raised
        pass
    got = reserve.status(repo.store)
    assert got["state"] == "unsupported" and "fallocate" in str(got["reason"]), got
    assert got["hint"] and _allocated(repo) == 0
