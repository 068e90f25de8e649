"""Materialisation for the shim backend, and the library's place in the store."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.trees import unprotect
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import new_store
from tests.shim._util import run_shim
from veloverlay.errors import Reason, VeloError
from veloverlay.lower.objects import PROXY_MTIME_NS
from veloverlay.session.shim import library as shim
from veloverlay.session.shim.materialize import (
    Baseline,
    materialize,
    prepare_target,
    proxies_dir,
    prune_proxies,
    verify_proxies,
)
from veloverlay.store.cas import Store
from veloverlay.store.digest import hash_bytes
from veloverlay.store.manifest import Manifests


def _materialize(store: Store, target: str, *, link: bool):  # type: ignore[no-untyped-def]
    m = Manifests(store)
    try:
        with m.read() as txn:
            _ref, c = m.resolve(txn, "t")
            top = prepare_target(target, store)
            try:
                return materialize(
                    store, m, txn, bytes.fromhex(c.root), target, link=link, fd=top.fd
                )
            finally:
                os.close(top.fd)
    finally:
        m.close()


def _object_inodes(store: Store) -> set[int]:
    return {os.lstat(p).st_ino for _n, p in store.iter_objects()}


def test_copy_mode_exposes_no_object_inode(tmp_path: Path) -> None:
    store, src = new_store(os.fspath(tmp_path))
    target = os.fspath(tmp_path / "proj")
    mat = _materialize(store, target, link=False)
    assert mat.form in ("copy", "reflink")
    objs = _object_inodes(store)
    for dirpath, _dirs, files in os.walk(target):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                assert st.st_ino not in objs
                assert st.st_nlink == 1
    # same modes and mtimes as the source; Tier-1 as a symlink into the store
    for rel in ("f6", "exec.sh", "d/b"):
        a, b = os.lstat(os.path.join(src, rel)), os.lstat(os.path.join(target, rel))
        assert (a.st_mode, a.st_mtime_ns) == (b.st_mode, b.st_mtime_ns)
    assert os.readlink(os.path.join(target, "model.gguf")).startswith(os.fspath(store.objects))
    assert os.readlink(os.path.join(target, "link")) == "f1"
    assert os.path.isdir(os.path.join(target, "emptydir"))
    # the baseline knows every Tier-2 file by inode
    path = tmp_path / "baseline"
    mat.baseline.save(path)
    assert Baseline.load(path).by_ino == mat.baseline.by_ino


def test_link_mode_links_proxies_never_objects(tmp_path: Path) -> None:
    store, _src = new_store(os.fspath(tmp_path))
    target = os.fspath(tmp_path / "proj")
    mat = _materialize(store, target, link=True)
    assert mat.form == "link"
    objs = _object_inodes(store)
    st = os.lstat(os.path.join(target, "f6"))
    assert st.st_ino not in objs and st.st_nlink == 2
    assert (st.st_dev, st.st_ino) in mat.proxies
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == PROXY_MTIME_NS
    assert verify_proxies(store) == []


def test_a_modified_proxy_is_quarantined_and_reported(tmp_path: Path) -> None:
    store, _src = new_store(os.fspath(tmp_path))
    _materialize(store, os.fspath(tmp_path / "p1"), link=True)
    victim = os.path.join(tmp_path, "p1", "f1")
    with open(victim, "ab") as f:  # a writer the shim never saw
        f.write(b"evil")
    assert [f.kind for f in verify_proxies(store)] == ["proxy-corrupt"]
    mat = _materialize(store, os.fspath(tmp_path / "p2"), link=True)
    assert any("modified outside any shim" in w for w in mat.warnings)
    assert Path(tmp_path, "p2", "f1").read_bytes() == b"one\n"  # a fresh proxy
    assert prune_proxies(store, repair=True) >= 1


def test_a_proxy_is_never_made_from_a_damaged_object(tmp_path: Path) -> None:
    """A --link proxy (kept in the store, shared by every later materialisation of those bytes)
    was copied from its object unchecked: an object damaged in place (the same size) became a
    proxy that outlived the object. The copy is hashed first now: object-corrupt, no proxy."""
    store, src = new_store(os.fspath(tmp_path))
    right = Path(src, "f1").read_bytes()
    obj = store.object_path(hash_bytes(right))
    unprotect(os.fspath(obj))
    obj.chmod(0o644)
    with open(obj, "r+b") as f:
        f.write(b"BAD")
    with pytest.raises(VeloError) as exc:
        _materialize(store, os.fspath(tmp_path / "p1"), link=True)
    assert exc.value.reason is Reason.OBJECT_CORRUPT
    left = [p for p in proxies_dir(store).rglob("*") if p.name.startswith(obj.name)]
    assert left == []


def test_target_must_be_new_or_empty(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_bytes(b"")
    for bad in (full, full / "x", store.root / "inside", tmp_path / "no" / "parent"):
        with pytest.raises(VeloError) as exc:
            prepare_target(os.fspath(bad), store)
        assert exc.value.reason is Reason.TARGET_INVALID
    for created in (True, False):  # new, then empty: fine
        top = prepare_target(os.fspath(tmp_path / "new"), store)
        os.close(top.fd)
        assert top.created is created
        assert top.real == os.path.realpath(tmp_path / "new")


def test_session_refuses_a_non_empty_target() -> None:
    with unpriv_tmpdir() as base:
        store, src = new_store(base)
        with pytest.raises(VeloError) as exc:  # the ingested source itself still exists
            run_shim(store, "t", ["true"], link=False)
        assert exc.value.reason is Reason.TARGET_INVALID
        assert sorted(os.listdir(store.sessions)) == []


def test_library_is_installed_world_readable_by_hash(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store")
    so = shim.install(store)
    assert so.parent == store.root / "shim-v1"
    assert stat.S_IMODE(so.stat().st_mode) == 0o644
    assert stat.S_IMODE(so.parent.stat().st_mode) == 0o755
    assert len(so.stem) == 64 and so.read_bytes() == shim.library_path().read_bytes()
    assert shim.install(store) == so  # idempotent


def test_proxies_dir_is_in_the_store(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "store")
    assert proxies_dir(store).is_relative_to(store.root)


def test_a_materialisation_killed_midway_is_named_by_the_rerun_and_resume_removes_it(
    shm_tmp: str, shim_build: Path
) -> None:
    """`run --backend shim --at DIR` killed while it materialises (SIGKILL, the OOM killer)
    leaves a partial tree at DIR. The rerun must refuse it (it is not empty), and it said so
    with a hint about the ingested source (`ingest --adopt`), nothing about the dead session
    that made it: the hint now names that session and `harvest --resume ID`, which removes the
    tree; then the run works and nothing else is left beside DIR."""
    import json
    import subprocess

    src, parent = os.path.join(shm_tmp, "src"), os.path.join(shm_tmp, "parent")
    os.makedirs(parent)
    for i in range(20):
        os.makedirs(os.path.join(src, f"d{i % 4}"), exist_ok=True)
        with open(os.path.join(src, f"d{i % 4}", f"f{i}"), "w") as f:
            f.write(f"file {i}\n")
    store = os.path.join(shm_tmp, "store")

    def velo(*args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
        return velo_text(store, "--json", *args, fault=fault, timeout=120)

    at = os.path.join(parent, "at")
    run = ("run", "t", "--backend", "shim", "--at", at, "--", "true")
    assert velo("ingest", src, "--name", "t").returncode == 0
    killed = velo(*run, fault="materialize.file:5")
    assert killed.returncode == -9, killed.stderr
    assert 0 < sum(len(f) for _d, _s, f in os.walk(at)) < 20  # a partial tree
    [sid] = [s["id"] for s in json.loads(velo("sessions").stdout)]
    again = velo(*run)
    err = json.loads(again.stdout)
    assert again.returncode == 1 and err["reason"] == "target-invalid", again
    assert f"veloverlay harvest --resume {sid}" in err["hint"], err  # old: 'ingest --adopt'
    assert os.listdir(parent) == ["at"]
    resumed = velo("harvest", "--resume", sid)
    assert resumed.returncode == 0, resumed.stderr
    assert os.listdir(parent) == []  # the tree it made is removed, and nothing else was made
    ok = velo(*run)
    assert ok.returncode == 0, ok.stderr
    assert os.listdir(parent) == []
