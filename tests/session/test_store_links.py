"""A symlink into the store's objects is read back as a FILE of that object only when it is a
copy of a Tier-1 entry of the projected tree (`cp -a` of a Tier-1 file keeps the link): one a
program made by hand to an object it learnt the name of (here: a file of another ref) stays a
symlink, so a session cannot turn another tree's object into a file of its own ref."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_params, new_store, ref_entries, run_session
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


def _setid_tier1_copied(base: str, backend: str) -> dict[str, Any]:
    """A setuid Tier-1 file of the ref (kept at ingest), `cp -a`-ed in the session: the copy
    is the store link again, harvested back into a FILE of that object."""
    store, _src = new_store(base, modes={"model.gguf": 0o4755}, keep_setid=True)
    proj = os.path.join(base, "proj")
    plain = os.path.join(base, "plain")  # a plain directory given the same cp -a, as this user
    os.makedirs(plain)
    with open(os.path.join(plain, "model.gguf"), "wb") as f:
        f.write(b"x")
    os.chmod(os.path.join(plain, "model.gguf"), 0o4755)
    cmd = f"cd {proj} && cp -a model.gguf copy.gguf && cd {plain} && cp -a model.gguf copy.gguf"
    res = run_session(store, ["t"], ["sh", "-c", cmd], at=proj, backend=backend)
    got = ref_entries(store, "t", ("model.gguf", "copy.gguf"))
    return {
        "kinds": {n: (e.kind, e.tier) for n, e in got.items() if e is not None},
        "modes": {n: e.mode for n, e in got.items() if e is not None},
        "plain_copy_setid": bool(os.stat(os.path.join(plain, "copy.gguf")).st_mode & 0o6000),
        "warnings": res.warnings,
    }


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_copied_setuid_tier1_link_is_no_new_setuid_file(mode: str, backend: str) -> None:
    """The copy got the mode the view records for its object, setuid bit and all, at a path
    where the ref had nothing: a setuid file the session made, which a copy of a Tier-2 file
    never became. Its bits are removed (and counted) as for any file a session makes; the
    original keeps its own."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _setid_tier1_copied, base, backend)
    assert r["kinds"] == {"model.gguf": (Kind.FILE, 1), "copy.gguf": (Kind.FILE, 1)}, r
    assert r["plain_copy_setid"]  # a plain directory keeps it: it is the policy, not the copy
    assert r["modes"] == {"model.gguf": 0o4755, "copy.gguf": 0o755}, r
    assert any("setuid/setgid bits removed from 1 file(s)" in w for w in r["warnings"]), r
