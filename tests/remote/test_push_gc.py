"""gc against `push`: a push resolves a version in one read of the manifests and reads its
objects afterwards, while it uploads; a `gc --keep 1` that drops that version meanwhile must
wait for the push (the store lock, shared), or the push ends half way with `object-missing` on
a store that is whole. gc is started at the push's first object read, and the test waits until
it has either finished or blocks on the store lock (tests/helpers/races.py): no sleep decides."""

from __future__ import annotations

import os
import shutil
from typing import Any

from tests.helpers.races import GC_KEEP_1, verb_at_first_call
from tests.helpers.trees import assert_same_tree, make_tree
from tests.remote.conftest import Registry
from veloverlay.ingest import ingest
from veloverlay.remote import Options, pull, push
from veloverlay.store.cas import Store
from veloverlay.verbs.repo import Repo


def test_gc_waits_for_a_push_of_the_version_it_drops(
    logged_in: Registry, shm_tmp: str, monkeypatch: Any
) -> None:
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a.txt": b"version one\n", "d/only-in-one": os.urandom(3000)})
    want = os.path.join(shm_tmp, "v1")
    shutil.copytree(src, want, symlinks=True)
    repo = Repo.open(store, create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
        shutil.rmtree(os.path.join(src, "d"))
        make_tree(src, {"a.txt": b"version two\n"})
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()

    real = Store.open_object
    procs = verb_at_first_call(monkeypatch, Store, "open_object", store, GC_KEEP_1)
    target = logged_in.remote(f"test/gc-push-{os.getpid()}", "v1")
    opts = Options(ca_cert=str(logged_in.ca))
    repo = Repo.open(store)
    try:
        push(repo.store, repo.m, ["t@{1}"], target, options=opts)
    finally:
        repo.close()
    monkeypatch.setattr(Store, "open_object", real)
    assert procs
    _o, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 0, err  # gc ran, after the push

    # What the push uploaded is version 1, whole.
    other = Repo.open(os.path.join(shm_tmp, "other"), create=True)
    try:
        pull(other.store, other.m, target, name="v1", options=opts)
        out = os.path.join(shm_tmp, "out")
        other.checkout("v1", out)
    finally:
        other.close()
    assert_same_tree(out, want)
