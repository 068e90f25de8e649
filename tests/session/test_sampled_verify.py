"""P0-a's sampled verify: where objects are not immutable (root-free), a session re-hashes a few
objects drawn from the store at its start and warns about one that is not what its name says or
that its owner made writable (DESIGN.md promised this; nothing did it). The store holds one
object, so the sample covers it whole; the object is changed behind the store's back by its
owner, as a root-free user can."""

from __future__ import annotations

import os

import pytest

from tests.helpers.unpriv import run_unprivileged, unpriv_tmpdir
from tests.session._util import mode_params, run_session
from tests.shim._util import run_shim
from veloverlay.ingest.pipeline import ingest
from veloverlay.store.cas import Store
from veloverlay.store.digest import hash_bytes
from veloverlay.store.manifest import Manifests

DATA = b"the bytes a venv's file holds\n" * 10


def _tampered_session(base: str, how: str, backend: str) -> tuple[int, list[str]]:
    src = os.path.join(base, "src")
    os.makedirs(src)
    with open(os.path.join(src, "only"), "wb") as f:
        f.write(DATA)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    obj = store.object_path(hash_bytes(DATA))
    if how != "clean":
        os.chmod(obj, 0o644)  # the owner may: root-free objects are 0444 files of theirs
        with open(obj, "r+b") as f:
            f.write(b"X")  # same size, other bytes
        if how == "changed":
            os.chmod(obj, 0o444)
    proj = os.path.join(base, "proj")
    if backend == "shim":
        res = run_shim(store, "t", ["true"], link=False, at=proj)
    else:
        res = run_session(store, ["t"], ["true"], at=proj)
    return res.exit_status, res.warnings


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("how", ["clean", "changed", "writable"])
@pytest.mark.parametrize("mode", mode_params("rootfree"))
def test_a_session_start_samples_the_store(mode: str, how: str, backend: str) -> None:
    with unpriv_tmpdir() as base:
        status, warnings = run_unprivileged(_tampered_session, base, how, backend)
    sampled = [w for w in warnings if "sampled check at session start" in w]
    assert status == 0
    name = hash_bytes(DATA).hex()[:16]
    if how == "clean":
        assert sampled == [], warnings
    elif how == "changed":
        assert len(sampled) == 1 and name in sampled[0] and "does not hash" in sampled[0]
    else:
        assert len(sampled) == 1 and name in sampled[0] and "writable" in sampled[0]
