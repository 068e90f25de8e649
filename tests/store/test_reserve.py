"""The store's space reserve (store/reserve.py): what lets `refs --delete` and gc commit on a full
disk. A store without one (made before it existed) keeps working and gets one from its next
writer; gc never deletes it; fsck does not call it damage; something planted under its name is
neither followed nor waited on. (The full disk itself: tests/reliability/test_store_full.py.)"""

from __future__ import annotations

import os

import pytest

from tests.envs.realtree import make_project
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
