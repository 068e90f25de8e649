"""What a session may do to stores (issue 14): veloverlay commands inside a session read the
store and say plainly why they cannot write it; a session cannot plant files in another store's
cached layers; one store's debris in the per-boot cache never breaks another store's session."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers.trees import snapshot
from tests.helpers.unpriv import UNPRIV_UID, unpriv_tmpdir
from tests.session._util import (
    FORM_MARKS,
    MODE_MARKS,
    as_mode,
    fsck_ok,
    head_root,
    mode_form_params,
    mode_params,
    new_store,
    run_session,
    use_form,
)

INSIDE = r"""
import json, subprocess, sys
py, out, src = sys.argv[1], sys.argv[2], sys.argv[3]
res = {}
for verb in (["refs"], ["ls", "t"], ["cat", "t", "f1"], ["ingest", src, "--name", "u"]):
    p = subprocess.run([py, "-m", "veloverlay", "--json", *verb], capture_output=True, text=True)
    res[verb[0]] = [p.returncode, p.stdout, p.stderr]
with open(out, "w") as f:
    json.dump(res, f)
"""


def _inside(base: str) -> tuple[dict[str, list[object]], str, int]:
    store, src = new_store(base)
    os.environ["VELO_STORE"] = os.fspath(store.root)
    script, out = os.path.join(base, "inside.py"), os.path.join(base, "inside.json")
    with open(script, "w") as f:
        f.write(INSIDE)
    at = os.path.join(base, "at")
    r = run_session(store, ["t"], [sys.executable, script, sys.executable, out, src], at=at)
    with open(out) as f:
        return json.load(f), r.session_id, r.exit_status


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_commands_inside_a_session_read_and_say_why_they_cannot_write(mode: str) -> None:
    with unpriv_tmpdir() as base:
        res, sid, status = as_mode(mode, _inside, base)
    assert status == 0
    for verb in ("refs", "ls", "cat"):
        assert res[verb][0] == 0, (verb, res[verb])
    assert res["cat"][1] == "one\n"
    rc, _out, err = res["ingest"]
    assert rc == 1, err
    assert "reason: store-read-only" in str(err), err
    assert f"inside the veloverlay session {sid}" in str(err), err


def _plant(base: str) -> dict[str, object]:
    from veloverlay.lower.homes import boot_dir

    os.environ.pop("VELO_FORCE_LOWER", None)
    a, _src_a = new_store(os.path.join(base, "a"))
    b, _src_b = new_store(os.path.join(base, "b"))
    # a session of A fills A's part of the per-boot cache
    run_session(a, ["t"], ["true"], at=os.path.join(base, "a", "at"), discard=True)
    home = boot_dir(a.root)
    assert home is not None, "no per-boot cache here"
    victim = os.path.join(home, "planted")
    script = f"echo evil > {victim} 2>/dev/null; echo $? > {base}/plant-status"
    r = run_session(b, ["t"], ["sh", "-c", script], at=os.path.join(base, "b", "at"), discard=True)
    with open(os.path.join(base, "plant-status")) as f:
        status = int(f.read())
    return {"exit": r.exit_status, "status": status, "planted": os.path.exists(victim)}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_session_cannot_write_another_stores_cached_layers(mode: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _plant, base)
    assert out["exit"] == 0
    assert out["status"] != 0 and not out["planted"], out


def _debris(base: str) -> dict[str, object]:
    from veloverlay.lower.homes import base as cache_base

    store, _src = new_store(base)
    cache, why = cache_base()
    assert cache is not None, why
    # a store that is gone left a half-built layer deeper than any recursion limit
    dead = os.path.join(cache, "ffff-ffff")
    os.makedirs(dead, exist_ok=True)
    with open(os.path.join(dead, "store"), "wb") as f:
        f.write(os.fsencode(os.path.join(base, "no-such-store")))
    fd = os.open(dead, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    r = run_session(store, ["t"], ["true"], at=os.path.join(base, "at"), discard=True)
    return {"exit": r.exit_status, "left": os.path.exists(dead)}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_another_stores_debris_never_breaks_a_session(mode: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _debris, base)
    assert out == {"exit": 0, "left": False}


def test_sessions_bind_the_whole_layer_cache_read_only_helper() -> None:
    """The list of read-only binds names the per-boot cache of this user, whatever store."""
    from veloverlay.lower.homes import base
    from veloverlay.session.overlay.backend import readonly_caches
    from veloverlay.store.cas import Store

    cache, _why = base()
    if cache is None:
        pytest.skip("no per-boot cache on this host")
    store = Store(Path("/nonexistent-store"))
    binds = readonly_caches(store, os.path.join(cache, "1-2"))
    assert binds[0] == cache and len(set(binds)) == len(binds), binds


def _cache_inside_target(base: str, away: bool) -> dict[str, object]:
    """This user's per-boot cache lies inside the tree the session projects (VELO_RUNTIME_DIR in
    it): the projection covers it, so the read-only bind of it, made after the overlay mount,
    is left out (it looked for the cache in the projection: ENOENT, no session). `away`: the
    session projects elsewhere (--at), and the ingest path, bound to show the projection too,
    covers the cache."""
    from veloverlay.lower.homes import boot_dir

    store, src = new_store(base)
    runtime = os.path.join(src, "rt")
    os.mkdir(runtime, 0o700)
    os.environ["VELO_RUNTIME_DIR"] = runtime
    at = os.path.join(base, "at") if away else None
    cmd = f"mkdir -p {runtime} && touch {runtime}/planted"
    r = run_session(store, ["t"], ["sh", "-c", cmd], at=at)
    cache = boot_dir(store.root, create=False)
    found = sorted(os.listdir(runtime))
    planted = [os.path.join(d, n) for d, _s, ns in os.walk(runtime) for n in ns if n == "planted"]
    return {
        "exit": r.exit_status,
        "cache_used": cache is not None and os.path.dirname(os.fspath(cache)).startswith(runtime),
        "runtime": found,
        "planted": planted,
        "committed": r.changed,
    }


@pytest.mark.parametrize("away", [False, True], ids=["at-source", "elsewhere"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_layer_cache_inside_the_projection_is_covered_not_bound(mode: str, away: bool) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _cache_inside_target, base, away)
    uid = 0 if mode == "root" else UNPRIV_UID
    assert out["exit"] == 0, out
    assert out["cache_used"] and out["runtime"] == [f"veloverlay-{uid}"], out
    assert out["planted"] == [] and out["committed"], out


def _tamper_cache(base: str) -> tuple[list[str], list[str]]:
    import glob

    from veloverlay.lower.homes import layer_homes
    from veloverlay.store.manifest import Manifests
    from veloverlay.verbs.fsck import fsck

    store, _src = new_store(base)
    run_session(store, ["t"], ["true"], at=os.path.join(base, "at"), discard=True)
    m = Manifests(store)
    try:
        clean = [f.kind for f in fsck(store, m, jobs=1).findings]
        layers = [p for h in layer_homes(store) for p in glob.glob(f"{h}/layers/*")]
        assert layers, "no cached layer was built"
        with open(os.path.join(layers[0], "planted"), "w") as f:
            f.write("evil")
        os.unlink(os.path.join(layers[0], "f3"))
        tampered = [f"{f.kind} {f.what}" for f in fsck(store, m, jobs=1).findings]
    finally:
        m.close()
    return clean, tampered


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_fsck_verifies_cached_layers_against_their_manifests(mode: str) -> None:
    with unpriv_tmpdir() as base:
        clean, tampered = as_mode(mode, _tamper_cache, base)
    assert clean == []
    assert any(t.startswith("layer-mismatch") and t.endswith(": planted") for t in tampered)
    assert any(t.startswith("layer-mismatch") and t.endswith(": f3") for t in tampered)


def _unreadable_dirs_in_cache(base: str) -> tuple[list[str], list[str]]:
    import glob

    from veloverlay.lower.homes import layer_homes
    from veloverlay.store.manifest import Manifests
    from veloverlay.verbs.fsck import fsck

    store, _src = new_store(base)
    at = os.path.join(base, "at")
    script = (
        f"cd {at} && mkdir -p shut/in nosearch/in && printf s > shut/in/f && printf n > "
        "nosearch/f && chmod 000 shut && chmod 600 nosearch"
    )
    run_session(store, ["t"], ["sh", "-c", script], at=at)
    run_session(store, ["t"], ["true"], at=at, discard=True)  # the layers of that version
    m = Manifests(store)
    try:
        clean = [f"{f.kind} {f.what} {f.detail}" for f in fsck(store, m, jobs=1).findings]
        layers = [p for h in layer_homes(store) for p in glob.glob(f"{h}/layers/*")]
        for layer in layers:
            with open(os.path.join(layer, "planted"), "w") as f:
                f.write("evil")
        tampered = [f"{f.kind} {f.what}" for f in fsck(store, m, jobs=1).findings]
    finally:
        m.close()
    return clean, tampered


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_fsck_of_cached_layers_with_directories_their_owner_cannot_read(mode: str) -> None:
    """A tree's 000 and 0600 directories are in its cached layers with those modes: fsck run by
    their root-free owner neither fails on them (a raw PermissionError before) nor reports
    what it cannot see below them as missing; what it can see is still checked."""
    with unpriv_tmpdir() as base:
        clean, tampered = as_mode(mode, _unreadable_dirs_in_cache, base)
    assert clean == []
    assert any(t.startswith("layer-mismatch") and t.endswith(": planted") for t in tampered)


def _umask0(base: str) -> list[str]:
    """Everything a store can hold, made with umask 0: ingest, a session committing through
    data-only layers kept in the store (ids-v1/), one through links-form proxies, the shim's
    proxies. Returns the store's directories group or others may write."""
    from tests.session._util import use_form
    from tests.shim.test_materialize import _materialize
    from veloverlay.store.cas import Store

    os.umask(0)
    store, _src = new_store(base)
    Store.init(os.path.join(base, "home", "velo", "store"))  # with the parents it makes
    for form in ("data-only-store", "links"):
        lower = use_form(form)
        at = os.path.join(base, "at")
        r = run_session(store, ["t"], ["sh", "-c", f"echo {form} > {at}/new-{form}"], at=at)
        assert (r.exit_status, r.lower_form, r.commit is not None) == (0, lower, True)
    _materialize(store, os.path.join(base, "shim-target"), link=True)
    store.check_safe()
    layers = os.fspath(store.trees / "layers")
    loose = []
    made = (f"{base}/home", f"{base}/home/velo", *(p for p, _d, _f in os.walk(store.root)))
    for d in made:
        if d.startswith(layers + "/"):
            continue  # a layer's directories carry the manifest's modes
        if os.lstat(d).st_mode & 0o022:
            loose.append(f"{d} {os.lstat(d).st_mode & 0o7777:04o}")
    return loose


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(
            m, marks=pytest.mark.needs(*MODE_MARKS[m], *FORM_MARKS[(m, "data-only")]), id=m
        )
        for m in ("root", "rootfree")
    ],
)
def test_no_store_directory_is_writable_by_others_whatever_the_umask(mode: str) -> None:
    """A layer build runs with umask 0 so that modes are the manifest's; the store directories it
    makes on the way (ids-v1/, its fan-out, proxies) once came out 0777, and root then refused
    its own store (and a shared store let any user swap the objects root's overlay reads)."""
    with unpriv_tmpdir() as base:
        loose = as_mode(mode, _umask0, base)
    assert loose == [], "\n".join(loose)


def _shared_made_under_umask_077(base: str) -> str:
    """Root's shared store, made, ingested into and committed to by a session (data-only layers
    kept in the store: ids-v1/) by a root whose umask is 077; returns the source."""
    from tests.session._util import make_base, use_form
    from veloverlay.ingest import ingest
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests

    os.umask(0o077)
    src = os.path.join(base, "src")
    make_base(src)
    store = Store.init(os.path.join(base, "store"), shared=True)
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=2)
    finally:
        m.close()
    lower = use_form("data-only-store")
    at = os.path.join(base, "at")
    r = run_session(store, ["t"], ["sh", "-c", f"echo harvested > {at}/new"], at=at)
    assert (r.exit_status, r.lower_form, r.commit is not None) == (0, lower, True)
    return src


def _checkout_as_reader(store_root: str, dest: str) -> object:
    from veloverlay.errors import VeloError
    from veloverlay.verbs.repo import Repo

    try:
        repo = Repo.open(store_root)
        try:
            repo.checkout("t", dest)
        finally:
            repo.close()
    except (VeloError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return snapshot(dest, mtimes=False, dir_mtimes=False)


@pytest.mark.needs("root", "overlay_root", "data_only_root")
def test_a_shared_store_made_under_umask_077_is_readable_by_its_users() -> None:
    """`init --shared` promises a store every local user can read; under root's umask 077 its
    objects came out 0400, its fan-out directories, manifests.lmdb/ and ids-v1/ 0700 and the
    LMDB files 0600: every other user's `ls`, `cat`, `checkout` failed with a bare
    PermissionError (reason os-error). The store's own modes no longer follow the umask."""
    from tests.helpers.unpriv import run_unprivileged

    with unpriv_tmpdir() as base:
        src = as_mode("root", _shared_made_under_umask_077, base)
        got = run_unprivileged(_checkout_as_reader, f"{base}/store", f"{base}/out")
        want = snapshot(src, mtimes=False, dir_mtimes=False)
    assert isinstance(got, dict), got
    assert got.pop(b"new").data == b"harvested\n"
    assert got == want


def _shared_with_sticky_tmp(base: str) -> list[str]:
    """Root's shared store with a tree that has a 1777 tmp/, projected once through data-only
    layers kept in the store; returns the layer directories that are that tmp/."""
    from tests.session._util import use_form
    from veloverlay.ingest import ingest
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests

    src = os.path.join(base, "src")
    os.makedirs(os.path.join(src, "tmp"))
    os.chmod(os.path.join(src, "tmp"), 0o1777)
    with open(os.path.join(src, "f"), "w") as f:
        f.write("f\n")
    store = Store.init(os.path.join(base, "store"), shared=True)
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    lower = use_form("data-only-store")
    r = run_session(store, ["t"], ["true"], at=os.path.join(base, "at"), discard=True)
    assert (r.exit_status, r.lower_form) == (0, lower)
    return [p for p, _d, _f in os.walk(store.trees / "layers") if p.endswith("/tmp")]


def _plant_in(dirs: list[str]) -> list[str]:
    planted = []
    for d in dirs:
        try:
            with open(os.path.join(d, "planted"), "x") as f:
                f.write("evil\n")
            planted.append(d)
        except PermissionError:
            pass
    return planted


@pytest.mark.needs("root", "overlay_root", "data_only_root")
def test_no_other_user_can_add_files_to_the_layers_of_a_shared_store() -> None:
    from tests.helpers.unpriv import run_unprivileged

    with unpriv_tmpdir() as base:
        dirs = as_mode("root", _shared_with_sticky_tmp, base)
        assert dirs, "the layer holds the tree's tmp/"
        assert all(os.stat(d).st_mode & 0o7777 == 0o1777 for d in dirs)  # as the manifest says
        assert run_unprivileged(_plant_in, dirs) == []


def _fsck_as_reader(store_root: str) -> tuple[list[str], bool, bool]:
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests
    from veloverlay.verbs.fsck import fsck

    cache = f"/dev/shm/veloverlay-{os.geteuid()}"
    before = os.path.lexists(cache)
    store = Store.open(store_root)
    m = Manifests(store)
    try:
        rep = fsck(store, m, jobs=1)
    finally:
        m.close()
    return [f"{f.kind} {f.what}" for f in rep.findings], before, os.path.lexists(cache)


def _status_as_reader(store_root: str, runtime: str) -> tuple[list[str], list[str]]:
    from veloverlay.verbs.repo import Repo

    os.mkdir(runtime, 0o700)
    os.environ["VELO_RUNTIME_DIR"] = runtime  # (this forked child's own environment)
    repo = Repo.open(store_root)
    try:
        parts = sorted(repo.disk_usage())
    finally:
        repo.close()
    return parts, os.listdir(runtime)


@pytest.mark.needs("root", "overlay_root")
def test_another_users_status_of_a_shared_store_leaves_no_cache() -> None:
    """`status` (its disk use) made a per-boot cache directory for the store it only looked at,
    as fsck once did: a look makes none."""
    from tests.helpers.unpriv import run_unprivileged

    with unpriv_tmpdir() as base:
        as_mode("root", _shared_store, base)
        parts, made = run_unprivileged(_status_as_reader, f"{base}/store", f"{base}/runtime")
    assert "total" in parts
    assert made == []


@pytest.mark.needs("root", "overlay_root", "data_only_root")
def test_another_user_can_fsck_a_shared_store_and_leaves_no_cache() -> None:
    """A reader of root's shared store may run fsck: the owner's layer cache (trees-v1/, 0700)
    and proxies are not theirs to look at, and a look makes no per-boot cache of theirs."""
    from tests.helpers.unpriv import run_unprivileged

    with unpriv_tmpdir() as base:
        as_mode("root", _shared_with_sticky_tmp, base)
        findings, before, after = run_unprivileged(_fsck_as_reader, os.path.join(base, "store"))
    assert findings == []
    assert after == before  # no /dev/shm/veloverlay-<uid> made by the look


def _session_as_reader(store_root: str, at: str) -> str:
    from veloverlay.errors import VeloError
    from veloverlay.store.cas import Store

    try:
        run_session(Store.open(store_root), ["t"], ["true"], at=at, discard=True)
    except VeloError as exc:
        return exc.reason.value
    except OSError as exc:
        return f"OSError: {exc}"
    return "ran"


@pytest.mark.needs("root", "overlay_root")
def test_a_session_on_another_users_shared_store_says_it_cannot_write() -> None:
    """Another user's `run` on root's shared store died with a bare PermissionError (reason
    os-error): the probe cache sits in root's 0700 trees-v1/. It is store-permission now."""
    from tests.helpers.unpriv import run_unprivileged

    with unpriv_tmpdir() as base:
        as_mode("root", _shared_store, base)
        reason = run_unprivileged(_session_as_reader, f"{base}/store", f"{base}/at")
    assert reason == "store-permission"


def _shared_store(base: str) -> None:
    from veloverlay.ingest import ingest
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests

    os.makedirs(f"{base}/src")
    with open(f"{base}/src/f", "w") as f:
        f.write("f\n")
    store = Store.init(f"{base}/store", shared=True)
    m = Manifests(store)
    try:
        ingest(store, m, f"{base}/src", "t", jobs=1)
    finally:
        m.close()


def _shared_store_with_a_session(base: str) -> str:
    from veloverlay.store.cas import Store

    _shared_store(base)
    store = Store.open(f"{base}/store")
    r = run_session(store, ["t"], ["sh", "-c", f"echo new > {base}/at/new"], at=f"{base}/at")
    assert r.exit_status == 0
    return r.session_id


def _sessions_as_reader(store_root: str, sid: str) -> dict[str, object]:
    from veloverlay.errors import VeloError
    from veloverlay.session import core, state
    from veloverlay.store.cas import Store

    store = Store.open(store_root)
    out: dict[str, object] = {}
    calls = {
        "list": lambda: len(core.list_sessions(store)),
        "load": lambda: state.load(store, sid).id,
        "harvest": lambda: len(core.harvest_resume(store, None)),
        "clean": lambda: core.clean_sessions(store),
    }
    for name, call in calls.items():
        try:
            out[name] = call()
        except VeloError as exc:
            out[name] = exc.reason.value
        except OSError as exc:
            out[name] = f"OSError: {exc}"
    return out


@pytest.mark.needs("root", "overlay_root")
def test_another_users_sessions_in_a_shared_store_are_not_an_os_error() -> None:
    """A session's directory is its owner's alone (0700), even in a shared store: `sessions`
    and `status` of every other user died with a bare PermissionError on its state.json
    (reason os-error) once root had run one session there; `harvest --all` and `sessions
    --clean` did too. Listing now shows what this user may read; the writing verbs say
    store-permission."""
    from tests.helpers.unpriv import run_unprivileged

    with unpriv_tmpdir() as base:
        sid = as_mode("root", _shared_store_with_a_session, base)
        got = run_unprivileged(_sessions_as_reader, f"{base}/store", sid)
        still = os.path.isdir(f"{base}/store/sessions/{sid}")
    assert got == {
        "list": 0,
        "load": "store-permission",
        "harvest": "store-permission",
        "clean": "store-permission",
    }
    assert still


def _poison_contents(base: str, form: str) -> dict[str, object]:
    """Change what two files of a cached layer show without changing their names, kinds, modes
    or sizes: f1 (Tier-2) reads as f2's bytes (a data-only metadata file redirected to f2's
    object; a proxy or copy overwritten), model.gguf (Tier-1) leads to a planted file of the
    same size instead of its object. The next session shows both; fsck must say so."""
    import glob

    from veloverlay import fsflags
    from veloverlay.lower.homes import layer_homes

    lower = use_form(form, fresh_cache=os.path.join(base, "cache"))
    store, _src = new_store(base)
    at = os.path.join(base, "at")
    r = run_session(store, ["t"], ["true"], at=at, discard=True)
    assert r.lower_form == lower
    clean = fsck_ok(store)
    layers = [p for h in layer_homes(store) for p in glob.glob(f"{h}/layers/*")]
    assert len(layers) == 1, layers
    f1, f2 = (os.path.join(layers[0], n) for n in ("f1", "f2"))
    meta = next(
        (p for p in ("user", "trusted") if f"{p}.overlay.metacopy" in os.listxattr(f1)), None
    )
    if meta is not None:
        redirect = os.getxattr(f2, f"{meta}.overlay.redirect")
        os.chmod(f1, 0o644)
        os.setxattr(f1, f"{meta}.overlay.redirect", redirect)
    else:  # a proxy's (or copy's) own bytes
        if os.geteuid() == 0:
            fsflags.set_immutable(f1, False)
        os.chmod(f1, 0o644)
        with open(f1, "r+b") as f:
            f.write(b"two\n")
    evil = os.path.join(
        base, "evil", os.path.basename(os.readlink(os.path.join(layers[0], "model.gguf")))
    )
    os.makedirs(os.path.dirname(evil))
    with open(evil, "wb") as f:
        f.write(b"GGUF weights, planted outside the store!\n")
    os.unlink(os.path.join(layers[0], "model.gguf"))
    os.symlink(evil, os.path.join(layers[0], "model.gguf"))
    # whoever may change a layer may change its stack: the stamp that stops a layer changed at
    # its top from being mounted again (lower/stacks.py `_stamp`) is written anew
    [record] = glob.glob(os.path.join(os.path.dirname(os.path.dirname(layers[0])), "stacks", "*"))
    with open(record) as f:
        data = json.load(f)
    st = os.stat(layers[0])
    data["stamps"] = [[st.st_ino, st.st_ctime_ns]]
    with open(record, "w") as f:
        json.dump(data, f)
    out = os.path.join(base, "seen")
    r = run_session(
        store, ["t"], ["sh", "-c", f"cat {at}/f1 {at}/model.gguf > {out}"], at=at, discard=True
    )
    with open(out, "rb") as f:
        seen = f.read()
    return {"clean": clean, "seen": seen, "status": r.exit_status, "fsck": fsck_ok(store)}


@pytest.mark.parametrize(("mode", "form"), mode_form_params(store_layers=True, native=True))
def test_fsck_finds_cached_layers_that_show_other_contents(mode: str, form: str) -> None:
    """A cached layer whose files keep their names, modes and sizes but show other bytes (a
    metadata file's redirect, a proxy's bytes, a Tier-1 link's target) was passed by fsck: it
    compared sizes only, and took any link ending in the object's name. Every later session of
    that version shows the planted bytes while the manifest says otherwise (P0-b)."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _poison_contents, base, form)
    assert out["clean"] == [], out
    assert out["status"] == 0, out
    # The attack is real: the session shows what no manifest holds.
    assert out["seen"] == b"two\nGGUF weights, planted outside the store!\n", out
    found = out["fsck"]
    assert isinstance(found, list)
    assert any(f.startswith("layer-mismatch") and ": f1 " in f for f in found), found
    assert any(f.startswith("layer-mismatch") and ": model.gguf " in f for f in found), found


PLANT = r"""
import json, os, sys
out, targets = sys.argv[1], sys.argv[2:]
res = {}
for t in targets:
    try:
        if os.path.isdir(t):
            open(os.path.join(t, "planted"), "w").close()
        else:
            os.chmod(t, 0o644)
            with open(t, "r+b") as f:
                f.write(b"EVI\n")
            os.removexattr(t, "user.overlay.metacopy")  # its own bytes from now on
        res[t] = "written"
    except OSError as e:
        res[t] = e.errno
with open(out, "w") as f:
    json.dump(res, f)
"""


def _cache_of_another_environment(base: str, env: str) -> dict[str, object]:
    """Layers built under one per-boot base (VELO_RUNTIME_DIR=A); then a session started with
    another environment (VELO_RUNTIME_DIR=off, or =B) runs a command that writes into them."""
    import glob
    import json

    from veloverlay.lower.homes import layer_homes

    first = os.path.join(base, "cache-a")
    os.mkdir(first, 0o700)
    os.environ["VELO_RUNTIME_DIR"] = first
    os.environ["VELO_FORCE_LOWER"] = "data-only"
    store, _src = new_store(base)
    at = os.path.join(base, "at")
    run_session(store, ["t"], ["true"], at=at, discard=True)
    layers = [p for h in layer_homes(store) for p in glob.glob(f"{h}/layers/*")]
    assert layers and all(p.startswith(first) for p in layers), layers
    targets = [layers[0], os.path.join(layers[0], "f1")]
    if env == "other":
        os.mkdir(os.path.join(base, "cache-b"), 0o700)
        os.environ["VELO_RUNTIME_DIR"] = os.path.join(base, "cache-b")
    else:
        os.environ["VELO_RUNTIME_DIR"] = "off"
    script, out = os.path.join(base, "plant.py"), os.path.join(base, "out.json")
    with open(script, "w") as f:
        f.write(PLANT)
    r = run_session(store, ["t"], ["/usr/bin/python3", script, out, *targets], at=at, discard=True)
    with open(out) as f:
        res: dict[str, object] = json.load(f)
    os.environ["VELO_RUNTIME_DIR"] = first  # the next session of the usual environment
    seen = os.path.join(base, "seen")
    r2 = run_session(store, ["t"], ["sh", "-c", f"cat {at}/f1 > {seen}"], at=at, discard=True)
    with open(seen, "rb") as f:
        shown = f.read()
    return {"exit": (r.exit_status, r2.exit_status), "tried": res, "shown": shown}


@pytest.mark.parametrize("env", ["off", "other"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_session_cannot_write_the_layer_cache_of_another_environment(mode: str, env: str) -> None:
    """Only the per-boot base the session's own environment chose was bound read-only: with
    VELO_RUNTIME_DIR=off (or another one, or no XDG_RUNTIME_DIR under cron or sudo) the command
    wrote into the layers the next session of the usual environment mounted, and that session
    showed its bytes (P0-c; the manifest never held them)."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _cache_of_another_environment, base, env)
    assert out["exit"] == (0, 0), out
    tried = out["tried"]
    assert isinstance(tried, dict) and len(tried) == 2, out
    assert all(v in (errno.EROFS, errno.EACCES, errno.EPERM) for v in tried.values()), out
    assert out["shown"] == b"one\n", out


def _fsck_from_another_environment(base: str) -> tuple[list[str], list[str]]:
    import glob

    from veloverlay.lower.homes import layer_homes

    cache = os.path.join(base, "cache")
    os.mkdir(cache, 0o700)
    os.environ["VELO_RUNTIME_DIR"] = cache
    os.environ["VELO_FORCE_LOWER"] = "data-only"
    store, _src = new_store(base)
    run_session(store, ["t"], ["true"], at=os.path.join(base, "at"), discard=True)
    layers = [p for h in layer_homes(store) for p in glob.glob(f"{h}/layers/*")]
    assert layers and all(p.startswith(cache) for p in layers), layers
    with open(os.path.join(layers[0], "planted"), "w") as f:
        f.write("evil")
    here = fsck_ok(store)
    os.environ["VELO_RUNTIME_DIR"] = "off"  # e.g. fsck from cron, sessions from a login shell
    return here, fsck_ok(store)


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_fsck_checks_the_layer_cache_of_every_environment(mode: str) -> None:
    """fsck checked only the per-boot base its own environment chose: run with another one
    (VELO_RUNTIME_DIR=off, no XDG_RUNTIME_DIR under cron) it passed a cache the usual
    environment's sessions mount with a planted file in it."""
    with unpriv_tmpdir() as base:
        here, elsewhere = as_mode(mode, _fsck_from_another_environment, base)
    for found in (here, elsewhere):
        assert any(f.startswith("layer-mismatch") and ": planted " in f for f in found), found


PLANT_AHEAD = r"""
import json, os, sys
home, root = sys.argv[1], sys.argv[2]  # <base>/<store key>/objects-v2, for a session to come
os.umask(0o077)  # private, as a per-boot directory must be
os.makedirs(os.path.join(home, "layers", "evil"))
os.makedirs(os.path.join(home, "stacks"))
with open(os.path.join(home, "layers", "evil", "f1"), "wb") as f:
    f.write(b"EVI\n")
with open(os.path.join(home, "stacks", f"data-only-{root}.json"), "w") as f:
    json.dump({"built": "full", "form": "data-only", "immutable": False, "layers": ["evil"],
               "root": root}, f)
"""


def _plant_ahead(base: str) -> dict[str, object]:
    """A session whose environment keeps no per-boot cache (VELO_RUNTIME_DIR=off) runs a
    command that makes the per-boot directory another environment will use, with a stack of
    its own for the ref's root; then a session of that environment."""
    later = os.path.join(base, "later")
    os.mkdir(later, 0o700)
    os.environ["VELO_RUNTIME_DIR"] = "off"
    os.environ["VELO_FORCE_LOWER"] = "data-only"
    store, _src = new_store(base)
    root = head_root(store, "t")
    st = os.stat(store.root)
    home = os.path.join(
        later, f"veloverlay-{os.geteuid()}", f"{st.st_dev:x}-{st.st_ino:x}", store.objects.name
    )
    script = os.path.join(base, "plant.py")
    with open(script, "w") as f:
        f.write(PLANT_AHEAD)
    at = os.path.join(base, "at")
    r = run_session(
        store, ["t"], ["/usr/bin/python3", script, home, root.hex()], at=at, discard=True
    )
    planted = os.path.exists(os.path.join(home, "layers", "evil", "f1"))
    os.environ["VELO_RUNTIME_DIR"] = later
    seen = os.path.join(base, "seen")
    r2 = run_session(store, ["t"], ["sh", "-c", f"cat {at}/f1 > {seen}"], at=at, discard=True)
    with open(seen, "rb") as f:
        shown = f.read()
    return {"exit": (r.exit_status, r2.exit_status), "planted": planted, "shown": shown}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_per_boot_directory_made_by_a_command_is_never_mounted(mode: str) -> None:
    """A session's command can make a per-boot layer directory where none exists yet (one its
    own environment does not use): the next session of that environment mounted the stack it
    found there and showed the command's bytes. Only a directory the store's record vouches
    for (made by a session's manager this boot) is used; anything else is removed and rebuilt."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _plant_ahead, base)
    assert out["exit"] == (0, 0), out
    assert out["planted"], out  # the command could make it: nothing binds a path to come
    assert out["shown"] == b"one\n", out


def test_a_state_file_of_a_newer_version_is_refused_and_kept(tmp_path: Path) -> None:
    """A session a newer veloverlay started (its state file says version 2) is not resumed by
    this one from fields it may misread: manifest-schema, and the file is left as it was; gc
    still keeps the roots it names."""
    from veloverlay.errors import Reason, VeloError
    from veloverlay.session import core
    from veloverlay.session import state as session_state
    from veloverlay.store.manifest import Manifests
    from veloverlay.verbs.gc import gc

    store, _src = new_store(str(tmp_path))
    root = head_root(store, "t").hex()
    sdir = store.sessions / "20990101T000000-newer"
    sdir.mkdir(parents=True)
    data = {"version": 2, "id": sdir.name, "state": "running", "refs": ["t"], "roots": [root]}
    (sdir / "state.json").write_text(json.dumps(data))
    before = (sdir / "state.json").read_bytes()
    with pytest.raises(VeloError) as exc:
        session_state.load(store, sdir.name)
    assert exc.value.reason is Reason.MANIFEST_SCHEMA
    with pytest.raises(VeloError) as exc:
        core.harvest_resume(store, sdir.name)
    assert exc.value.reason is Reason.MANIFEST_SCHEMA
    assert (sdir / "state.json").read_bytes() == before
    m = Manifests(store)
    try:
        with m.write() as txn:
            m.delete_ref(txn, "t")
        assert gc(store, m, grace=0).objects_deleted == 0  # the roots it names are kept
    finally:
        m.close()


def _run_on_another_store_inside(base: str) -> tuple[list[object], bool]:
    """Store A's session runs `veloverlay --json run` of store B (root's: every object +i), its
    layers kept in B itself (VELO_RUNTIME_DIR=off: the per-boot cache is read-only in A's
    session anyway)."""
    from veloverlay import fsflags

    a, _src_a = new_store(os.path.join(base, "a"))
    b, _src_b = new_store(os.path.join(base, "b"))
    obj = next(p for p in b.objects.rglob("*") if p.is_file())
    immutable = fsflags.is_immutable(os.fspath(obj))
    out = os.path.join(base, "inner.json")
    script = (
        f"VELO_STORE={b.root} VELO_RUNTIME_DIR=off {sys.executable} -m veloverlay --json "
        f"run t --at {base}/b/at -- true > {out} 2>{out}.err; echo $? > {out}.rc"
    )
    r = run_session(a, ["t"], ["sh", "-c", script], at=os.path.join(base, "a", "at"), discard=True)
    assert r.exit_status == 0
    with open(out) as f, open(f"{out}.err") as e, open(f"{out}.rc") as rc:
        return [int(rc.read()), json.loads(f.read() or "{}"), e.read()], immutable


@pytest.mark.parametrize("mode", mode_params("root"))
def test_a_session_of_another_root_store_inside_a_session_is_refused_plainly(mode: str) -> None:
    """Root's `veloverlay run` of another store inside a session (root of a user namespace
    there, which may not clear +i) failed building that store's layers with 'error: [Errno 1]
    the object is immutable (+i) ...', reason os-error, no hint. Now immutable-denied, saying
    what to do instead."""
    with unpriv_tmpdir() as base:
        (rc, doc, err), immutable = as_mode(mode, _run_on_another_store_inside, base)
    assert immutable, "root's objects are +i here"
    assert rc == 1, (doc, err)
    assert isinstance(doc, dict) and doc.get("reason") == "immutable-denied", (doc, err)
    assert doc.get("hint") and "VELO_RUNTIME_DIR" in str(doc["hint"]), doc
    assert "Traceback" not in str(err) and "[Errno" not in str(doc["error"]), (doc, err)
