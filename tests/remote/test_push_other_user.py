"""A push by another user of a shared store (`init --shared`): a push only reads the store, so a
user who may read it may push from it. What it would write there (the sha256 map, the cached
pack indexes, the note of where the ref went) is the owner's to write: the push must succeed
without it, say the note was not written, and leave the owner's store as it was."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.helpers.trees import assert_same_tree, make_tree, snapshot
from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged, unpriv_tmpdir
from tests.remote.fake_registry import FakeRegistry
from veloverlay.errors import VeloError
from veloverlay.ingest import ingest
from veloverlay.remote import Options, pull, push
from veloverlay.remote.push import LARGE
from veloverlay.verbs.repo import Repo

OPTS = Options(retries=0, timeout=10, backoff=0.01)


def _push_as_other(store: str, remote: str) -> dict[str, Any]:
    assert os.geteuid() == UNPRIV_UID
    r = Repo.open(store)
    try:
        res = push(r.store, r.m, ["env"], remote, options=OPTS)
        return {"ok": True, "noted": [x.noted for x in res], "digest": [x.digest for x in res]}
    except VeloError as exc:
        return {"ok": False, "reason": exc.reason.value, "message": exc.message}
    except OSError as exc:  # a raw error: what the user would see as a traceback
        import traceback

        return {"ok": False, "raw": repr(exc), "tb": traceback.format_exc()}
    finally:
        r.close()


@pytest.mark.parametrize(
    ("used", "umask"),
    [(False, 0o022), (True, 0o022), (True, 0o077)],
    ids=["fresh", "owner-pushed-before", "owner-pushed-before-umask-077"],
)
def test_a_push_from_another_users_shared_store(
    fake: FakeRegistry, shm_tmp: str, used: bool, umask: int
) -> None:
    """`owner-pushed-before`: the owner pushed an earlier version, so the store's remote-v1/
    (sha256 map, notes, cached indexes) exists, the owner's, when the other user pushes; with
    umask 077 the owner made them private."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make the store and drop to another uid")
    with unpriv_tmpdir() as top:
        store = os.path.join(top, "store")
        src = os.path.join(top, "src")
        data = os.urandom(LARGE + 1000)  # a pack, and a large object (the sha256 map)
        make_tree(src, {"a": b"one\n", "d/big": data, "d/e": b"two\n"})
        owner = Repo.open(store, create=True, shared=True)
        old_mask = os.umask(umask)
        try:
            if used:
                make_tree(
                    os.path.join(top, "old"), {"a": b"zero\n", "big": os.urandom(LARGE + 1000)}
                )
                ingest(owner.store, owner.m, os.path.join(top, "old"), "env", jobs=1)
                push(owner.store, owner.m, ["env"], fake.remote("v0"), options=OPTS)
            ingest(owner.store, owner.m, src, "env", jobs=1, force=used)
        finally:
            os.umask(old_mask)
            owner.close()
        before = snapshot(store)
        out = run_unprivileged(_push_as_other, store, fake.remote("v1"))
        assert out.get("ok"), out
        assert out["noted"] == [False], out  # the owner's notes: not this user's to write
        assert snapshot(store) == before  # nothing of the owner's store changed
        # what the registry got is the tree: pulled into a store of root's, checked out
        dst = Repo.open(os.path.join(shm_tmp, "dst"), create=True)
        try:
            pull(dst.store, dst.m, fake.remote("v1"), options=OPTS)
            back = os.path.join(shm_tmp, "back")
            dst.checkout("env", back)
            assert_same_tree(src, back)
        finally:
            dst.close()
