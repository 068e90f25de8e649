"""A verb that waits for the store lock must find, once it has it, the store it waited for.

`remove-store` released the lock before removing the lock file and the store directory, and a
verb that had waited for it went on in a store that was gone: `tag` said it had named the
version (in a database that no longer existed), `checkout` failed with `object-missing` and its
hint to run `fsck --repair`, `gc` with `os-error`, `ingest` with `store-unsafe`. Found by
starting each verb as `remove-store` began. Each now says `store-missing`.

A lock file removed and made again while a verb waited (by hand, or by any program) left the
waiter holding a lock on a file nobody else locks any more: it ran beside a gc that had locked
the new file. The waiter now locks again until what it holds is the store's lock file.

Each verb is started at exactly the chosen point and the test waits until it has finished or
waits for the lock (tests/helpers/races.py): no sleep decides."""

from __future__ import annotations

import os

import pytest

from tests.helpers.races import settle, start_and_settle, verb_at_first_call
from tests.helpers.trees import make_tree
from veloverlay import _libc
from veloverlay.ingest import ingest
from veloverlay.verbs import repo as repo_mod
from veloverlay.verbs.repo import Repo


def _store(shm_tmp: str) -> tuple[str, str]:
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a.txt": b"one\n", "d/b.txt": b"two\n"})
    repo = Repo.open(store, create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()
    return store, src


@pytest.mark.parametrize("verb", ["tag", "checkout", "gc", "ingest"])
def test_a_verb_waiting_for_remove_store_finds_the_store_gone(
    shm_tmp: str, verb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, src = _store(shm_tmp)
    out = os.path.join(shm_tmp, "out")
    args = {
        "tag": ["tag", "v1", "t"],
        "checkout": ["checkout", "t", out],
        "gc": ["gc"],
        "ingest": ["ingest", src, "--name", "u"],
    }[verb]
    procs = verb_at_first_call(monkeypatch, repo_mod, "_remove_tree", store, args)
    repo_mod.remove_store(store)
    assert procs
    _o, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 1, err
    assert "reason: store-missing" in err, err
    assert not os.path.lexists(store)
    assert not os.path.lexists(out)


def test_a_lock_file_replaced_while_a_verb_waits_is_locked_again(shm_tmp: str) -> None:
    store, _src = _store(shm_tmp)
    lock = os.path.join(store, "lock")
    old = os.open(lock, os.O_RDWR)
    _libc.ofd_lock(old, write=True, wait=False)  # as gc holds it
    new = -1
    try:
        proc = start_and_settle(store, ["tag", "v1", "t"])
        assert proc.poll() is None, proc.communicate()
        # The lock file is removed and made again, and a second gc locks the new one.
        os.unlink(lock)
        new = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        _libc.ofd_lock(new, write=True, wait=False)
        os.close(old)  # the first gc ends
        old = -1
        settle(proc, lock)  # finished, or waits for the new lock file
        assert proc.poll() is None, "the verb ran while gc held the store's lock file"
    finally:
        for fd in (old, new):
            if fd >= 0:
                os.close(fd)
    _o, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    repo = Repo.open(store)
    try:
        assert [t.name for t, _c in repo.tags()] == ["v1"]
    finally:
        repo.close()
