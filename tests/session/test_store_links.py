"""A symlink into the store's objects is read back as a FILE of that object only when it is a
copy of a Tier-1 entry of the projected tree (`cp -a` of a Tier-1 file keeps the link): one a
program made by hand to an object it learnt the name of (here: a file of another ref) stays a
symlink, so a session cannot turn another tree's object into a file of its own ref."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_params, new_store, run_session
from veloverlay.ingest import ingest
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind


def _scenario(base: str) -> dict[str, Any]:
    store, _src = new_store(base)
    other = os.path.join(base, "other")
    os.makedirs(other)
    with open(os.path.join(other, "secret"), "w") as f:
        f.write("another tree's file\n")
    m = Manifests(store)
    try:
        ingest(store, m, other, "other", jobs=1)
        with m.read() as txn:
            _r, c = m.resolve(txn, "other")
            secret = m.lookup(txn, bytes.fromhex(c.root), b"secret")
        assert secret is not None
        obj = os.fspath(store.object_path(secret.digest))
    finally:
        m.close()
    proj = os.path.join(base, "proj")
    cmd = f"cd {proj} && ln -s {obj} stolen && cp -a model.gguf copy.gguf"
    run_session(store, ["t"], ["sh", "-c", cmd], at=proj)
    m = Manifests(store)
    try:
        with m.read() as txn:
            _r, c = m.resolve(txn, "t")
            root = bytes.fromhex(c.root)
            stolen = m.lookup(txn, root, b"stolen")
            copy = m.lookup(txn, root, b"copy.gguf")
            model = m.lookup(txn, root, b"model.gguf")
    finally:
        m.close()
    assert stolen is not None and copy is not None and model is not None
    return {
        "stolen": (stolen.kind, stolen.payload == os.fsencode(obj)),
        "copy": (copy.kind, copy.digest == model.digest, model.tier),
    }


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_hand_made_link_to_another_trees_object_stays_a_link(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _scenario, base)
    assert r["stolen"] == (Kind.SYMLINK, True), r
    assert r["copy"] == (Kind.FILE, True, 1), r  # a copied Tier-1 link is its file again
