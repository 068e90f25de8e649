"""gc with sessions and lower layers: a live session's roots are kept; once nothing needs them,
objects go together with their short names (ids-v1) and their cached lower layers; fsck checks
that every short name is a hard link of its object."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_form_params, new_store
from veloverlay import session
from veloverlay.lower.homes import layer_homes
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.gc import gc


def _count(path: str) -> int:
    return sum(len(files) for _d, _dirs, files in os.walk(path))


def _layers(store: Store) -> int:
    return sum(len(os.listdir(h / "layers")) for h in layer_homes(store) if (h / "layers").exists())


def _scenario(base: str, form: str, place: str) -> dict[str, object]:
    os.environ["VELO_FORCE_LOWER"] = form
    if place == "store":
        os.environ["VELO_RUNTIME_DIR"] = "off"
    store, _src = new_store(base)
    root = os.fspath(store.root)
    r = session.run(
        store,
        session.SessionOptions(refs=["t"], at=os.path.join(base, "at")),
        ["sh", "-c", f"echo new > {base}/at/added"],
    )
    out: dict[str, object] = {"exit": r.exit_status}
    m = Manifests(store)
    try:
        out["ids_before"] = _count(os.path.join(root, "ids-v1"))
        out["layers_before"] = _layers(store)
        out["in_store"] = os.path.isdir(os.path.join(root, "trees-v1", "layers"))
        # A session that is still running (simulated: its state names a root) pins that root.
        with m.read() as txn:
            head_root = m.resolve(txn, "t")[1].root
        fake = os.path.join(root, "sessions", "live-one")
        os.makedirs(fake)
        with open(os.path.join(fake, "state.json"), "w") as f:
            json.dump({"state": "running", "roots": [head_root]}, f)
        with m.write() as txn:
            m.delete_ref(txn, "t")
        pinned = gc(store, m, grace=0)
        out["kept_while_live"] = pinned.objects_deleted == 0
        os.unlink(os.path.join(fake, "state.json"))
        os.rmdir(fake)
        rep = gc(store, m, grace=0)
        out["deleted"] = rep.objects_deleted
        out["objects_after"] = _count(os.path.join(root, "objects-v2"))
        out["ids_after"] = _count(os.path.join(root, "ids-v1"))
        out["layers_after"] = _layers(store)
        out["fsck"] = [f.kind for f in fsck(store, m, jobs=1).findings]
    finally:
        m.close()
    return out


def _params() -> list[object]:
    """Each mode and form; data-only both in the per-boot cache and kept in the store."""
    out: list[object] = []
    for p in mode_form_params():
        mode, form = p.values
        places = ("per-boot", "store") if form == "data-only" else ("store",)
        for place in places:
            out.append(pytest.param(mode, form, place, marks=p.marks, id=f"{p.id}-{place}"))
    return out


@pytest.mark.parametrize(("mode", "form", "place"), _params())
def test_gc_removes_short_names_and_layers(mode: str, form: str, place: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _scenario, base, form, place)
    assert out["exit"] == 0
    assert out["kept_while_live"], "gc deleted objects a live session needs"
    assert out["deleted"] > 0
    assert out["objects_after"] == 0 and out["ids_after"] == 0, out
    assert out["layers_after"] == 0 < out["layers_before"], out  # type: ignore[operator]
    if form == "data-only" and (place == "store" or mode == "root"):
        # layers kept in the store name their objects; as root, harvest names new objects
        assert out["ids_before"] > 0
    assert out["in_store"] == (place == "store")
    assert out["fsck"] == []


def test_fsck_flags_a_short_name_that_is_not_its_object(shm_tmp: str) -> None:
    store, _src = new_store(shm_tmp)
    ids = os.path.join(os.fspath(store.root), "ids-v1", "ab")
    os.makedirs(ids)
    with open(os.path.join(ids, "cdef0123456789abcd"), "wb") as f:
        f.write(b"not an object")
    m = Manifests(store)
    try:
        kinds = [f.kind for f in fsck(store, m, jobs=1).findings]
    finally:
        m.close()
    assert kinds == ["id-stray"]


def _velo(store: str, *args: str, fault: str | None = None) -> tuple[int, str]:
    p = velo_text(store, *args, fault=fault)
    return p.returncode, p.stdout + p.stderr


def _files(store: Store, version: str) -> dict[str, bytes]:
    m = Manifests(store)
    try:
        with m.read() as txn:
            root = bytes.fromhex(m.resolve(txn, version)[1].root)
            return {
                p.decode(): store.read_object(e.digest)
                for p, e, _n in m.walk(txn, root)
                if e.kind.name == "FILE" and e.digest
            }
    finally:
        m.close()


@pytest.mark.parametrize("meanwhile", ["keep", "delete"])
@pytest.mark.needs("root", "overlay_root")
def test_gc_keeps_the_commit_an_unharvested_session_started_from(
    shm_tmp: str, meanwhile: str
) -> None:
    """A session left unharvested (its manager killed in the harvest), then its ref moves on and
    `gc --keep 1` cuts the log, or the ref is deleted and gc runs: the session's base commit
    must survive, or its resumed harvest cannot commit (it found the base missing and called the
    database damaged). The resumed harvest gives the session's tree (merged with the ref's
    later change, or kept as REF@<session>)."""
    store, _src = new_store(shm_tmp)
    root = os.fspath(store.root)
    at = os.path.join(shm_tmp, "at")
    before = _files(store, "t")
    script = f"echo session > {at}/f1 && echo added > {at}/added"
    rc, out = _velo(root, "run", "t", "--at", at, "--", "sh", "-c", script, fault="harvest.file:1")
    assert rc == -9, out
    [sid] = [i.id for i in session.list_sessions(store)]
    if meanwhile == "keep":
        for n in (1, 2):
            rc, out = _velo(root, "run", "t", "--at", at, "--", "sh", "-c", f"echo {n} > {at}/f2")
            assert rc == 0, out
        rc, out = _velo(root, "gc", "--keep", "1", "--grace", "0")
    else:
        rc, out = _velo(root, "refs", "--delete", "t")
        assert rc == 0, out
        rc, out = _velo(root, "gc", "--grace", "0")
    assert rc == 0, out
    rc, out = _velo(root, "harvest", "--resume", sid)
    assert rc == 0, out
    expected = dict(before, **{"f1": b"session\n", "added": b"added\n"})
    if meanwhile == "keep":
        expected["f2"] = b"2\n"
        assert _files(store, "t") == expected
    else:
        assert _files(store, f"t@{sid}") == expected
    m = Manifests(store)
    try:
        assert fsck(store, m, jobs=1).ok
    finally:
        m.close()


@pytest.mark.parametrize("meanwhile", ["rollback", "later"])
@pytest.mark.needs("root", "overlay_root")
def test_a_resume_after_gc_keep_does_not_commit_the_session_twice(
    shm_tmp: str, meanwhile: str
) -> None:
    """The manager dies after its session's commit, before the state says so: `harvest
    --resume` must find that commit and stop. It looks for it on the ref's log, back from the
    head to the session's base; when the ref was rolled back to before the commit (or another
    commit put back what the session had changed) and `gc --keep 1` then cut the log, the
    session's commit was gone, the resume took the session for one that never committed and
    merged its changes into the ref again: the deliberate rollback was undone (or, where the
    later commit had rewritten the same files, kept them as a conflict `t@<session>` with the
    session's own commit). gc now keeps the log between an unfinished session's base and its
    ref's head."""
    store, _src = new_store(shm_tmp)
    root = os.fspath(store.root)
    at = os.path.join(shm_tmp, "at")
    before = _files(store, "t")
    script = f"echo session > {at}/f1 && echo added > {at}/added"
    rc, out = _velo(root, "run", "t", "--at", at, "--", "sh", "-c", script, fault="commit.after:1")
    assert rc == -9, out
    [sid] = [i.id for i in session.list_sessions(store)]
    assert _files(store, "t") == dict(before, f1=b"session\n", added=b"added\n")  # committed
    if meanwhile == "rollback":
        rc, out = _velo(root, "rollback", "t", "1")
    else:  # another session puts f1 back and removes `added`
        f1 = before["f1"].decode()
        script = f"printf %s '{f1}' > {at}/f1 && rm {at}/added"
        rc, out = _velo(root, "run", "t", "--at", at, "--", "sh", "-c", script)
    assert rc == 0, out
    assert _files(store, "t") == before
    rc, out = _velo(root, "gc", "--keep", "1", "--grace", "0")
    assert rc == 0, out
    rc, out = _velo(root, "harvest", "--resume", sid)
    assert rc == 0, out
    assert _files(store, "t") == before  # what the user made of the ref since stays
    rc, out = _velo(root, "sessions", "--json")
    assert rc == 0 and json.loads(out)[0]["state"] == "harvested", out
    m = Manifests(store)
    try:
        with m.read() as txn:  # nor kept as a conflict with what it had committed itself
            assert m.get_ref(txn, f"t@{sid}") is None
        assert fsck(store, m, jobs=1).ok
    finally:
        m.close()


@pytest.mark.needs("root", "overlay_root")
def test_a_resume_of_a_committed_session_says_what_it_committed(shm_tmp: str) -> None:
    """The resume of a session whose earlier run had committed (killed before its state was
    saved) reported no change: 'only timestamps changed' for a session that added a file and
    changed another. It now lists what its commit changed, and says it was committed before."""
    store, _src = new_store(shm_tmp)
    root = os.fspath(store.root)
    at = os.path.join(shm_tmp, "at")
    script = f"echo session > {at}/f1 && echo added > {at}/added"
    rc, out = _velo(root, "run", "t", "--at", at, "--", "sh", "-c", script, fault="commit.after:1")
    assert rc == -9, out
    [sid] = [i.id for i in session.list_sessions(store)]
    rc, out = _velo(root, "--json", "harvest", "--resume", sid)
    assert rc == 0, out
    [res] = json.loads(out)
    assert sorted((c["status"], c["path"]) for c in res["changes"]) == [
        ("A", "added"),
        ("M", "f1"),
    ], out
    assert any("already committed" in w for w in res["warnings"]), out
    rc, out = _velo(root, "sessions", "--json")
    assert rc == 0 and json.loads(out)[0]["state"] == "harvested", out
