"""The per-boot layer cache (veloverlay/lower/homes.py): data-only metadata layers on tmpfs.

Where the layers go and how they name objects, the store fallback (VELO_RUNTIME_DIR=off, an
unsafe directory, a cache that fills up mid-build), eviction by gc, the removal of layers of
stores that are gone, and a rebuild when the cache vanished (as after a reboot).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest

from tests.helpers.trees import force_rmtree
from tests.helpers.unpriv import (
    UNPRIV_GID,
    UNPRIV_UID,
    run_in_userns,
    run_unprivileged,
    unpriv_tmpdir,
)
from tests.session._util import (
    FORM_MARKS,
    MODE_MARKS,
    as_mode,
    fsck_ok,
    head_root,
    new_store,
    run_session,
)
from veloverlay import mount
from veloverlay.ingest import ingest
from veloverlay.lower import homes, layers, stacks
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.verbs import gc

# root and root-free, each where this host can mount data-only lowers for that identity
BOTH = [
    pytest.param(m, marks=pytest.mark.needs(*MODE_MARKS[m], *FORM_MARKS[(m, "data-only")]), id=m)
    for m in ("root", "rootfree")
]


def _lowers(store: Store, *, protect: bool = False) -> stacks.Lowers:
    root = head_root(store, "t")
    m = Manifests(store)
    try:
        return stacks.ensure_lowers(store, m, root, form="data-only", protect=protect)
    finally:
        m.close()


def _data_only(fn, *args):  # type: ignore[no-untyped-def]
    os.environ["VELO_FORCE_LOWER"] = "data-only"
    return fn(*args)


def _where(base: str) -> dict[str, object]:
    store, _src = new_store(base)
    low = _lowers(store)
    meta = os.path.join(low.layers[-1], "f1")
    redirect = os.getxattr(meta, "user.overlay.redirect")
    root = head_root(store, "t")
    m = Manifests(store)
    try:
        with m.read() as txn:
            e = m.lookup(txn, root, b"f1")
            assert e is not None
            digest = e.digest.hex()
    finally:
        m.close()
    proj, out = os.path.join(base, "proj"), os.path.join(base, "out")
    res = run_session(store, ["t"], ["sh", "-c", f"cat {proj}/f1 {proj}/d/b > {out}"], at=proj)
    with open(out, "rb") as f:
        seen = f.read()
    return {
        "home": low.home,
        "expected_home": os.path.join(os.environ["VELO_RUNTIME_DIR"], f"veloverlay-{os.geteuid()}"),
        "data_layers": list(low.data_layers),
        "objects": os.fspath(store.objects),
        "redirect": redirect.decode(),
        "digest": digest,
        "ids": sorted(os.listdir(store.root / "ids-v1"))
        if (store.root / "ids-v1").exists()
        else [],
        "seen": seen,
        "status": res.exit_status,
        "fsck": fsck_ok(store),
    }


@pytest.mark.parametrize("mode", BOTH)
def test_data_only_layers_live_in_the_per_boot_cache(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _data_only, _where, base)
    assert str(r["home"]).startswith(str(r["expected_home"]) + "/")
    # the data-only layer is the object store itself, redirects name full object paths
    assert r["data_layers"] == [r["objects"]]
    d = str(r["digest"])
    assert r["redirect"] == f"/{d[:2]}/{d}"  # the one-level fan-out of objects-v2
    assert r["ids"] == []  # no short names were needed
    assert r["seen"] == b"one\nbee\n" and r["status"] == 0
    assert r["fsck"] == []


def _off(base: str) -> dict[str, object]:
    os.environ["VELO_RUNTIME_DIR"] = "off"
    store, _src = new_store(base)
    low = _lowers(store)
    meta = os.path.join(low.layers[-1], "f1")
    proj, out = os.path.join(base, "proj"), os.path.join(base, "out")
    run_session(store, ["t"], ["sh", "-c", f"cat {proj}/f1 > {out}"], at=proj)
    return {
        "home": low.home,
        "warning": low.warning,
        "trees": os.fspath(store.trees),
        "data_layers": list(low.data_layers),
        "ids": os.fspath(store.root / "ids-v1"),
        "redirect_len": len(os.getxattr(meta, "user.overlay.redirect")),
        "seen": open(out, "rb").read(),
        "fsck": fsck_ok(store),
    }


@pytest.mark.needs("root", "overlay_root", "data_only_root")
def test_runtime_dir_off_keeps_layers_in_the_store() -> None:
    with unpriv_tmpdir() as base:
        r = as_mode("root", _off, base)
    assert r["home"] == r["trees"]
    assert r["warning"] == ""  # asked for: nothing to tell
    assert r["data_layers"] == [r["ids"]]
    assert r["redirect_len"] == 22  # "/ab/" + 18 hex digits: fits in an ext4 inode
    assert r["seen"] == b"one\n"
    assert r["fsck"] == []


def _unsafe(base: str, how: str) -> dict[str, object]:
    runtime = os.path.join(base, "runtime")
    os.mkdir(runtime, 0o755)
    os.environ["VELO_RUNTIME_DIR"] = runtime
    mine = os.path.join(runtime, f"veloverlay-{os.geteuid()}")
    if how == "open":
        os.mkdir(mine, 0o755)
        os.chmod(mine, 0o755)
    elif how == "symlink":
        os.mkdir(os.path.join(base, "elsewhere"), 0o700)
        os.symlink(os.path.join(base, "elsewhere"), mine)
    elif how == "file":
        open(mine, "w").close()
    elif how == "foreign":  # another user made it first
        os.mkdir(mine, 0o700)
        os.chown(mine, 1501, 1501)
    store, _src = new_store(base)
    home = homes.boot_dir(store.root)
    why = homes.why_not()
    low = _lowers(store)
    return {
        "home": home,
        "why": why,
        "lowers_home": low.home,
        "warning": low.warning,
        "trees": os.fspath(store.trees),
        "elsewhere": os.listdir(os.path.join(base, "elsewhere")) if how == "symlink" else [],
    }


@pytest.mark.parametrize("how", ["open", "symlink", "file", "foreign"])
def test_unsafe_runtime_dir_is_not_used(how: str) -> None:
    """Not used, and the session says so (it was only in `doctor`): a user whose cache place
    another user made first would otherwise build every layer in the store unawares."""
    with unpriv_tmpdir() as base:
        r = as_mode("root", _unsafe, base, how)
    assert r["home"] is None
    expected = {
        "open": "open to other users",
        "symlink": "not a directory",
        "file": "not a dir",
        "foreign": "belongs to uid 1501",
    }
    assert expected[how] in str(r["why"])
    assert r["lowers_home"] == r["trees"]  # built in the store instead
    warning = str(r["warning"])
    assert expected[how] in warning and "layers are built in the store" in warning
    assert "VELO_RUNTIME_DIR" in warning
    assert r["elsewhere"] == []  # nothing was written through the planted symlink


def _asked_for_theirs(base: str, runtime: str) -> str:
    os.environ["VELO_RUNTIME_DIR"] = runtime
    store, _src = new_store(os.path.join(base, "mine"))
    return _lowers(store).warning


def test_a_runtime_dir_asked_for_that_is_another_users_is_said() -> None:
    """VELO_RUNTIME_DIR naming root's directory, as the unprivileged uid: veloverlay-UID cannot
    be made there, the layers go to the store, and the session's warning says so."""
    with unpriv_tmpdir() as base:
        runtime = os.path.join(base, "roots")
        os.mkdir(runtime, 0o755)
        os.mkdir(os.path.join(base, "mine"), 0o755)
        os.chown(os.path.join(base, "mine"), UNPRIV_UID, UNPRIV_GID)
        warning = run_unprivileged(_asked_for_theirs, base, runtime)
    assert f"cannot create {runtime}/veloverlay-{UNPRIV_UID}" in warning, warning
    assert "layers are built in the store" in warning and "VELO_RUNTIME_DIR" in warning


def _fills_up(base: str) -> dict[str, object]:
    tiny = os.path.join(base, "tiny")
    os.mkdir(tiny)
    # 40 inodes: the store's base tree needs more, so the build in the cache hits ENOSPC
    mount.mount_tmpfs(tiny, "nr_inodes=40,mode=1777")
    try:
        os.environ["VELO_RUNTIME_DIR"] = tiny
        os.environ["VELO_FORCE_LOWER"] = "data-only"
        store, src = new_store(base)
        for i in range(60):
            with open(os.path.join(src, "d", f"n{i}"), "w") as f:
                f.write(f"file {i}\n")
        from veloverlay.ingest.pipeline import ingest

        m = Manifests(store)
        try:
            ingest(store, m, src, "t", jobs=1)
        finally:
            m.close()
        low = _lowers(store)
        left = os.listdir(os.path.join(tiny, f"veloverlay-{os.geteuid()}"))
        leftovers = []
        for home in left:
            tmp = os.path.join(tiny, f"veloverlay-{os.geteuid()}", home, "tmp")
            leftovers += os.listdir(tmp) if os.path.isdir(tmp) else []
        return {
            "home": low.home,
            "trees": os.fspath(store.trees),
            "warning": low.warning,
            "leftovers": leftovers,
            "layer_files": len(os.listdir(os.path.join(low.layers[-1], "d"))),
        }
    finally:
        mount.umount(tiny)


@pytest.mark.needs("root", "userns", "data_only_root")
def test_full_cache_falls_back_to_the_store() -> None:
    with unpriv_tmpdir() as base:
        r = run_in_userns(_fills_up, base, privileged=True)
    assert r["home"] == r["trees"]
    assert "is full (ENOSPC)" in str(r["warning"]), r["warning"]
    assert r["leftovers"] == []  # the half-built layer was removed
    assert r["layer_files"] == 62  # b, c and 60 new files


def _filled_beforehand(base: str) -> dict[str, object]:
    """The cache's tmpfs filled to the last byte before the first session (any local user can
    fill /dev/shm): its directories and sparse metadata files still fit, the `store` note and
    the stack file do not."""
    tiny = os.path.join(base, "tiny")
    os.mkdir(tiny)
    mount.mount_tmpfs(tiny, "size=64k,mode=1777")
    try:
        fd = os.open(os.path.join(tiny, "fill"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        os.environ["VELO_RUNTIME_DIR"] = tiny
        os.environ["VELO_FORCE_LOWER"] = "data-only"
        store, _src = new_store(base)
        low = _lowers(store)
        cache = os.path.join(tiny, f"veloverlay-{os.geteuid()}")
        left = []
        for dirpath, _dirs, names in os.walk(cache):
            if os.path.basename(dirpath) != "locks":
                left += names
        proj, out = os.path.join(base, "proj"), os.path.join(base, "out")
        res = run_session(store, ["t"], ["sh", "-c", f"cat {proj}/f1 > {out}"], at=proj)
        with open(out, "rb") as f:
            seen = f.read()
        return {
            "home": low.home,
            "trees": os.fspath(store.trees),
            "warning": low.warning,
            "left": left,
            "status": res.exit_status,
            "seen": seen,
        }
    finally:
        mount.umount(tiny)


@pytest.mark.needs("root", "userns", "data_only_root")
def test_cache_filled_by_someone_else_falls_back_to_the_store() -> None:
    with unpriv_tmpdir() as base:
        r = run_in_userns(_filled_beforehand, base, privileged=True)
    assert r["home"] == r["trees"]  # built in the store, not refused as "store full"
    assert "is full (ENOSPC)" in str(r["warning"]), r["warning"]
    assert r["left"] == []  # no layer (nor a note) left taking the cache's memory
    assert r["status"] == 0
    assert r["seen"] == b"one\n"


def _gc_and_orphans(base: str) -> dict[str, object]:
    from veloverlay.verbs import gc

    store, _src = new_store(base)
    low = _lowers(store)
    home = os.path.dirname(os.path.dirname(low.layers[0]))
    # a second store, projected once and then deleted without gc
    other_base = os.path.join(base, "other")
    os.mkdir(other_base)
    other, _ = new_store(other_base)
    other_home = os.path.dirname(os.path.dirname(_lowers(other).layers[0]))
    force_rmtree(other_base)  # (root's objects carry +i)
    # the next build of the first store (a delta for its new root) reaps the deleted store's
    proj = os.path.join(base, "proj")
    run_session(store, ["t"], ["sh", "-c", f"printf new > {proj}/f1"], at=proj)
    kept = os.path.exists(other_home)
    run_session(store, ["t"], ["true"], at=proj)
    reaped = not os.path.exists(other_home)
    before = sorted(os.listdir(os.path.join(home, "layers")))
    m = Manifests(store)
    try:
        with m.write() as txn:
            m.delete_ref(txn, "t")
        rep = gc.gc(store, m)
    finally:
        m.close()
    after = sorted(os.listdir(os.path.join(home, "layers")))
    return {
        "kept": kept,
        "reaped": reaped,
        "before": before,
        "after": after,
        "evicted": rep.layers_evicted,
    }


@pytest.mark.parametrize("mode", BOTH)
def test_gc_evicts_per_boot_layers_and_deleted_stores_are_reaped(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _data_only, _gc_and_orphans, base)
    assert r["kept"] and r["reaped"]  # kept until a build, then reaped
    assert len(r["before"]) >= 1  # type: ignore[arg-type]
    assert r["after"] == [] and r["evicted"] == len(r["before"])  # type: ignore[arg-type]


def _after_reboot(base: str) -> dict[str, object]:
    store, _src = new_store(base)
    proj, out = os.path.join(base, "proj"), os.path.join(base, "out")
    run_session(store, ["t"], ["true"], at=proj)
    home = homes.layer_homes(store)[0]
    first = sorted(os.listdir(home / "stacks"))
    shutil.rmtree(home)  # what a reboot does to a tmpfs
    second = run_session(store, ["t"], ["sh", "-c", f"cat {proj}/f3 > {out}"], at=proj)
    stacks = sorted(os.listdir(home / "stacks"))
    return {
        "first": first,
        "stacks": stacks,
        "built": json.loads((home / "stacks" / stacks[0]).read_text())["built"],
        "status": second.exit_status,
        "seen": open(out, "rb").read(),
        "fsck": fsck_ok(store),
    }


@pytest.mark.parametrize("mode", BOTH)
def test_sessions_rebuild_after_the_cache_vanished(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _data_only, _after_reboot, base)
    assert r["first"] == r["stacks"] and len(r["stacks"]) == 1  # type: ignore[arg-type]
    assert r["built"] == "full" and r["status"] == 0
    assert r["seen"] == b"three three three\n"
    assert r["fsck"] == []


def _parallel(base: str, fault: bool) -> dict[str, object]:
    layers.PARALLEL_MIN_ENTRIES = 1  # the base tree is small: fill it with workers anyway
    os.environ["VELO_JOBS"] = "3"
    store, src = new_store(base)
    proj, out = os.path.join(base, "proj"), os.path.join(base, "out")
    error = ""
    if fault:  # a worker dies at its second entry: the build fails whole, nothing half-made stays
        os.environ["VELO_INTERNAL__TEST_FAULT"] = "lower.build:2"
        from importlib import reload

        from veloverlay import faults

        reload(faults)
        try:
            _lowers(store)
        except Exception as exc:  # noqa: BLE001
            error = str(exc)
        del os.environ["VELO_INTERNAL__TEST_FAULT"]
        reload(faults)
    home = homes.layer_homes(store)[0]
    leftovers = os.listdir(home / "tmp") if (home / "tmp").exists() else []
    stacks = os.listdir(home / "stacks") if (home / "stacks").exists() else []
    low = _lowers(store)
    script = f"cd {proj} && find . -print0 | sort -z | xargs -0 ls -ld --time-style=+%s > {out}"
    run_session(store, ["t"], ["sh", "-c", script], at=proj)
    seen = open(out).read()
    plain = os.path.join(base, "plain")
    from tests.session._util import checkout_ref

    checkout_ref(store, "t", plain)
    expected = subprocess.run(
        ["sh", "-c", "find . -print0 | sort -z | xargs -0 ls -ld --time-style=+%s"],
        cwd=plain,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        "error": error,
        "leftovers": leftovers,
        "stacks_after_fault": stacks,
        "built": low.built,
        "seen": _strip_links(seen),
        "expected": _strip_links(expected),
        "fsck": fsck_ok(store),
    }


def _strip_links(listing: str) -> list[str]:
    """`ls -ld` lines as mode, size, mtime and name: without link counts and owners (a
    projection shows its files as the session's user) and without directory sizes (each
    filesystem counts them its own way); the Tier-1 file (a store symlink in a projection) is
    left out."""
    out = []
    for line in listing.splitlines():
        cols = line.split()
        if cols[-1].endswith("model.gguf") or "model.gguf ->" in line:
            continue
        size = "-" if cols[0].startswith("d") else cols[4]
        out.append(" ".join([cols[0], size, *cols[5:]]))
    return out


@pytest.mark.parametrize("mode", BOTH)
@pytest.mark.parametrize("fault", [False, True], ids=["filled", "worker-killed"])
def test_parallel_fill(mode: str, fault: bool) -> None:
    """A per-boot layer filled by several worker processes projects exactly the manifest (modes,
    sizes, mtimes, names); a worker killed mid-build fails the build with nothing left behind,
    and the next build succeeds."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _data_only, _parallel, base, fault)
    if fault:
        assert "died" in str(r["error"]), r["error"]
        assert r["leftovers"] == [] and r["stacks_after_fault"] == []
    assert r["built"] == "full"
    assert r["seen"] == r["expected"]
    assert r["fsck"] == []


def _too_big(base: str) -> dict[str, object]:
    homes._MEMORY_SHARE = 1e-12  # any layer is "too big" for this machine's memory
    store, _src = new_store(base)
    low = _lowers(store)
    proj, out = os.path.join(base, "proj"), os.path.join(base, "out")
    res = run_session(store, ["t"], ["sh", "-c", f"cat {proj}/f1 > {out}"], at=proj)
    home = homes.layer_homes(store)[0]
    return {
        "home": low.home,
        "trees": os.fspath(store.trees),
        "warning": low.warning,
        "tmp": os.listdir(home / "tmp") if (home / "tmp").exists() else [],
        "seen": open(out, "rb").read(),
        "status": res.exit_status,
    }


@pytest.mark.parametrize("mode", BOTH)
def test_layer_too_big_for_memory_goes_to_the_store(mode: str) -> None:
    """A layer that would take more than a quarter of MemAvailable is built in the store, said."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _data_only, _too_big, base)
    assert r["home"] == r["trees"]
    assert "MiB available" in str(r["warning"]) and "built in the store" in str(r["warning"])
    assert r["tmp"] == []  # the directories planned in the cache were removed
    assert r["seen"] == b"one\n" and r["status"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="root's objects are +i from publish")
def test_a_cold_build_reopens_no_object_already_immutable(
    shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root's objects carry +i from the moment they are named: the build learns that from the
    statx it makes for the size check and never opens them to set it again; the metadata files
    it writes still carry the entries' modes exactly (setid, sticky and read-only ones too),
    sizes and redirects."""
    from veloverlay import fsflags
    from veloverlay.lower import objects as lower_objects
    from veloverlay.store.tree import Kind

    src = os.path.join(shm_tmp, "src")
    modes = {"ro": 0o444, "x": 0o755, "suid": 0o4755, "sgid": 0o2711, "sticky": 0o1644, "p": 0o600}
    os.mkdir(src)
    for name, mode in modes.items():
        p = os.path.join(src, name)
        with open(p, "wb") as f:
            f.write(name.encode() * 100)
        os.chmod(p, mode)
    os.utime(src, ns=(1, 1))
    store = Store.init(os.path.join(shm_tmp, "store"))
    m = Manifests(store)
    try:
        from veloverlay.ingest import ingest

        ingest(store, m, src, "t", jobs=1, keep_setid=True)
        with m.read() as txn:
            root = bytes.fromhex(m.resolve(txn, "t")[1].root)
            files = [e for e in m.get_node(txn, root).entries if e.kind is Kind.FILE]
        if not all(fsflags.is_immutable(store.object_path(e.digest)) for e in files):
            pytest.skip("this filesystem holds no +i")
        calls: list[str] = []
        monkeypatch.setattr(
            lower_objects.fsflags, "set_immutable", lambda p, on=True: calls.append(str(p))
        )
        monkeypatch.setenv("VELO_RUNTIME_DIR", os.path.join(shm_tmp, "runtime"))
        os.mkdir(os.path.join(shm_tmp, "runtime"), 0o700)
        low = stacks.ensure_lowers(store, m, root, form="data-only", protect=True)
    finally:
        m.close()
    assert low.built == "full" and low.immutable
    assert calls == []
    layer = low.layers[-1]
    for e in files:
        st = os.lstat(os.path.join(layer, os.fsdecode(e.name)))
        assert (st.st_mode & 0o7777, st.st_size) == (modes[os.fsdecode(e.name)], e.size)
        meta = os.getxattr(os.path.join(layer, os.fsdecode(e.name)), "user.overlay.redirect")
        assert meta == store.object_relpath_b(e.digest)


def _gc_in_the_start_window(base: str) -> dict[str, object]:
    """Between choosing its layers and pinning their roots in its state file, a starting session
    holds the store lock: gc (exclusive) cannot prune those layers in between. It did, and the
    mount then failed with 'lowerdir is not a directory' (tests/reliability/test_concurrency)."""
    from veloverlay.errors import VeloError
    from veloverlay.session.overlay import backend

    store, _src = new_store(base)
    real = backend._new_state
    seen: dict[str, object] = {}

    def gc_tries(store_, plan, m, opts):  # type: ignore[no-untyped-def]
        try:
            with store_.lock(exclusive=True, wait=False):  # what gc takes
                seen["gc_could_prune"] = True
        except VeloError as exc:
            seen["gc_could_prune"], seen["reason"] = False, exc.reason.value
        return real(store_, plan, m, opts)

    backend._new_state = gc_tries
    try:
        res = run_session(store, ["t"], ["true"], at=os.path.join(base, "proj"))
    finally:
        backend._new_state = real
    return {**seen, "status": res.exit_status}


@pytest.mark.parametrize(
    "mode", [pytest.param(m, marks=pytest.mark.needs(*MODE_MARKS[m]), id=m) for m in MODE_MARKS]
)
def test_gc_cannot_prune_the_layers_of_a_starting_session(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _gc_in_the_start_window, base)
    assert r == {"gc_could_prune": False, "reason": "locked", "status": 0}, r


def _gc_in_another_environment(base: str) -> dict[str, object]:
    """Sessions ran with one per-boot base (an interactive login's XDG_RUNTIME_DIR); gc runs
    with another (cron: none of those variables), after the ref moved on."""
    os.environ["VELO_FORCE_LOWER"] = "data-only"
    login, cron = os.path.join(base, "login"), os.path.join(base, "cron")
    for d in (login, cron):
        os.mkdir(d, 0o700)
    os.environ["VELO_RUNTIME_DIR"] = login
    store, src = new_store(base)
    run_session(store, ["t"], ["true"], at=os.path.join(base, "proj"))
    pattern = os.path.join(login, "*", "*", "*", "layers", "*")
    before = glob.glob(pattern)
    with open(os.path.join(src, "f1"), "wb") as f:
        f.write(b"a new version\n")
    os.environ["VELO_RUNTIME_DIR"] = cron
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
        rep = gc.gc(store, m)
    finally:
        m.close()
    return {"before": before, "left": glob.glob(pattern), "evicted": rep.layers_evicted}


@pytest.mark.parametrize("mode", BOTH)
def test_gc_evicts_old_layers_from_every_per_boot_base(mode: str) -> None:
    """gc pruned only the per-boot cache its own environment chose: the layers of versions no
    ref uses any more stayed (memory, until a reboot) in the cache the sessions had used."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _gc_in_another_environment, base)
    assert r["before"], r
    assert r["left"] == [], r
    assert r["evicted"] == len(r["before"]), r  # type: ignore[arg-type]
