"""Deep trees in sessions (issue 14, item 3): a session that makes a tree deeper than the bound
is refused with `too-deep` (kept, never a RecursionError), one within it is harvested exactly; a
ref deeper than the bound (a store from before it) is refused before any layer is built, and
leaves nothing in the layer cache."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, mode_params, new_store, run_session
from veloverlay.paths import DEPTH_MAX

MAKE = (
    "import os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    os.mkdir('q', dir_fd=fd)\n"
    "    c = os.open('q', os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)\n"
    "    os.close(fd); fd = c\n"
    "os.close(os.open('f', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))\n"
)


def _deep_session(base: str, levels: int, backend: str) -> dict[str, object]:
    from veloverlay.errors import VeloError

    store, _src = new_store(base)
    script = os.path.join(base, "make.py")
    with open(script, "w") as f:
        f.write(MAKE)
    at = os.path.join(base, "at")
    out: dict[str, object] = {}
    try:
        r = run_session(
            store, ["t"], [sys.executable, script, at, str(levels)], at=at, backend=backend
        )
        out["exit"] = r.exit_status
    except VeloError as exc:
        out["reason"] = exc.reason.value
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    deep = os.path.join(got, *(["q"] * levels), "f") if levels < 300 else ""
    out["harvested"] = bool(deep) and os.path.exists(deep)
    # the next session of the ref works (elsewhere: a kept shim session still holds `at`)
    r = run_session(store, ["t"], ["true"], at=at + "2", discard=True, backend=backend)
    out["next"] = r.exit_status
    return out


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_session_deeper_than_the_bound_is_too_deep(mode: str, backend: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _deep_session, base, DEPTH_MAX + 40, backend)
    assert out.get("reason") == "too-deep", out
    assert out["next"] == 0


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_session_within_the_bound_is_harvested(mode: str, backend: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _deep_session, base, DEPTH_MAX - 2, backend)
    assert out.get("exit") == 0 and out["harvested"], out
    assert out["next"] == 0


def _old_deep_ref(base: str, backend: str = "overlay") -> dict[str, object]:
    from veloverlay.errors import VeloError
    from veloverlay.lower.homes import layer_homes
    from veloverlay.store.manifest import Manifests
    from veloverlay.store.tree import Entry, Kind

    store, _src = new_store(base)
    m = Manifests(store)
    try:
        with m.write() as txn:  # written straight into the database, as an older build could
            d = m.put_node(txn, 0o755, 1, [])
            for _ in range(2000):
                d = m.put_node(txn, 0o755, 1, [Entry(b"d", Kind.DIR, digest=d)])
            m.commit(txn, "deep", d, expect_head=None, message="deep", path=None)
    finally:
        m.close()
    reasons = []
    for _ in range(2):
        try:
            run_session(
                store,
                ["deep"],
                ["true"],
                at=os.path.join(base, "at"),
                discard=True,
                backend=backend,
            )
            reasons.append("ran")
        except VeloError as exc:
            reasons.append(exc.reason.value)
    left = [
        os.path.join(h, sub, n)
        for h in layer_homes(store)
        for sub in ("layers", "tmp")
        if os.path.isdir(os.path.join(h, sub))
        for n in os.listdir(os.path.join(h, sub))
        if "deep" in n or n.endswith(tuple("0123456789abcdef"))
    ]
    from veloverlay.session import state

    sessions = [st.id for st in state.iter_states(store)]
    made = os.path.lexists(os.path.join(base, "at"))
    return {"reasons": reasons, "left": left, "sessions": sessions, "made": made}


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_ref_beyond_the_bound_builds_nothing(mode: str, backend: str) -> None:
    """The shim backend materialised such a ref, ran the command and only then refused it, at
    harvest: a session left unharvested (too deep for any harvest) and its tree at the target.
    Found by running a ref committed past the bound with --backend shim."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _old_deep_ref, base, backend)
    assert out["reasons"] == ["too-deep", "too-deep"], out
    assert out["sessions"] == [] and out["made"] is False, out


# The same operations in a session and in a plain directory: a new file, and a chain of
# directories one more level than the bound and a file at its end.
OPS = (
    "import os, sys\n"
    "with open(os.path.join(sys.argv[1], 'b'), 'w') as f:\n"
    "    f.write('new')\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    os.mkdir('q', dir_fd=fd)\n"
    "    c = os.open('q', os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)\n"
    "    os.close(fd); fd = c\n"
    "with open(os.open('f', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), 'w') as f:\n"
    "    f.write('deep')\n"
)


def _too_deep_run(base: str, levels: int, backend: str) -> dict[str, object]:
    from veloverlay.errors import VeloError

    store, _src = new_store(base)
    script = os.path.join(base, "ops.py")
    with open(script, "w") as f:
        f.write(OPS)
    at = os.path.join(base, "at")
    try:
        run_session(store, ["t"], [sys.executable, script, at, str(levels)], at=at, backend=backend)
    except VeloError as exc:
        return {"reason": exc.reason.value, "hint": exc.hint, "path": exc.path}
    return {"reason": None}


def _set_aside_resume(base: str, levels: int, t0: int) -> dict[str, object]:
    import shutil
    import subprocess

    from tests.session._util import compare_trees
    from veloverlay.session import harvest_resume, list_sessions
    from veloverlay.store.cas import Store

    store = Store.open(os.path.join(base, "store"))
    (sid,) = [s.id for s in list_sessions(store) if s.state == "dead-unharvested"]
    # the plain directory: the same operations, then the entry past the bound moved aside
    want = os.path.join(base, "want")
    shutil.copytree(os.path.join(base, "src"), want, symlinks=True)
    subprocess.run([sys.executable, os.path.join(base, "ops.py"), want, str(levels)], check=True)
    want_aside = os.path.join(base, "want-aside")
    os.mkdir(want_aside)
    os.rename(os.path.join(want, *["q"] * (DEPTH_MAX + 1)), os.path.join(want_aside, "q"))
    aside = os.path.join(base, "aside")
    (res,) = harvest_resume(store, sid, set_aside=aside)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return {
        "committed": compare_trees(got, want, since_ns=t0),
        "aside": compare_trees(
            os.path.join(aside, "1", "q"), os.path.join(want_aside, "q"), since_ns=t0
        ),
        "slots": sorted(os.listdir(aside)),
        "warned": [w for w in res.warnings if "set aside, NOT committed" in w],
        "left": sorted(s.state for s in list_sessions(store) if s.id == sid),
    }


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_set_aside_commits_the_rest_of_a_too_deep_session(mode: str, backend: str) -> None:
    """A session that made a path past the bound cannot be harvested whole; `harvest --resume
    ID --set-aside DIR` commits everything else, exactly as a plain directory that got the same
    operations (minus the entry past the bound), and that entry, whole, is in DIR/1, said in a
    warning. Before, every resume failed with too-deep and nothing could be committed."""
    levels = DEPTH_MAX + 40
    with unpriv_tmpdir() as base:
        t0 = time.time_ns()
        first = as_mode(mode, _too_deep_run, base, levels, backend)
        assert first["reason"] == "too-deep", first
        assert "--set-aside" in str(first["hint"]), first
        assert first["path"] == "/".join(["q"] * (DEPTH_MAX + 1)), first
        out = as_mode(mode, _set_aside_resume, base, levels, t0)
    assert out["committed"] == [] and out["aside"] == [], out
    assert out["slots"] == ["1"] and len(out["warned"]) == 1, out
    assert out["left"] == ["harvested"], out


LONG = 200  # a name's bytes: 10 such levels under a 12-level tree pass PATH_MAX


def _renamed_too_deep(base: str) -> dict[str, object]:
    import subprocess

    from veloverlay.errors import VeloError
    from veloverlay.ingest import ingest
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests

    src = os.path.join(base, "src")
    deep = os.path.join(src, "d", *["a" * LONG] * 12)
    os.makedirs(deep)
    with open(os.path.join(deep, "f"), "w") as f:
        f.write("bottom")
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    plain = os.path.join(base, "plain")
    subprocess.run(["cp", "-a", src, plain], check=True)
    # a renamed directory (rename(2) with a redirect, root-native) put 10 levels deeper
    ops = (
        "import os, sys\n"
        "os.chdir(sys.argv[1])\n"
        f"p = os.path.join('g', *['c' * {LONG}] * 10)\n"
        "os.makedirs(p)\n"
        "os.rename('d', os.path.join(p, 'x'))\n"
    )
    script = os.path.join(base, "ops.py")
    with open(script, "w") as f:
        f.write(ops)
    at = os.path.join(base, "at")
    out: dict[str, object] = {}
    try:
        run_session(store, ["t"], [sys.executable, script, at], at=at)
        out["first"] = "committed"
    except VeloError as exc:
        out["first"], out["path"] = exc.reason.value, exc.path
    return out


def _renamed_resume(base: str, since: int) -> dict[str, object]:
    import shutil
    import subprocess

    from tests.session._util import compare_trees
    from veloverlay.session import harvest_resume, list_sessions
    from veloverlay.store.cas import Store

    store = Store.open(os.path.join(base, "store"))
    plain, at = os.path.join(base, "plain"), os.path.join(base, "at")
    out: dict[str, object] = {}
    subprocess.run([sys.executable, os.path.join(base, "ops.py"), plain], check=True)
    # the plain directory without what is past the bound: a11 and below (relative paths: the
    # absolute ones are past PATH_MAX)
    keep = os.path.join(plain, "g", *["c" * LONG] * 10, "x", *["a" * LONG] * 10)
    mtime = os.stat(keep).st_mtime_ns
    fd = os.open(keep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        shutil.rmtree("a" * LONG, dir_fd=fd)
    finally:
        os.close(fd)
    os.utime(keep, ns=(mtime, mtime))
    (sid,) = [s.id for s in list_sessions(store) if s.state == "dead-unharvested"]
    (res,) = harvest_resume(store, sid, set_aside=os.path.join(base, "aside"))
    out["warned"] = [w for w in res.warnings if "NOT committed" in w]
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    out["problems"] = compare_trees(got, plain, since_ns=since)
    out["next"] = run_session(store, ["t"], ["true"], at=at, discard=True).exit_status
    return out


@pytest.mark.parametrize("mode", mode_params("native"))
def test_a_directory_renamed_past_the_bound_is_never_committed(mode: str) -> None:
    """Root-native, a renamed directory's untouched entries come from its origin's nodes: the
    harvest never walked their new paths, and a directory renamed 10 levels deeper was committed
    with paths past PATH_MAX, a ref no session could project again (ENAMETOOLONG, no reason).
    Now the harvest stops with too-deep naming the path; --set-aside commits the rest (a plain
    directory that got the same rename, without what is past the bound) and says what is not
    committed; the next session of the ref runs."""
    with unpriv_tmpdir() as base:
        since = time.time_ns() - 10**9
        first = as_mode(mode, _renamed_too_deep, base)
        assert first["first"] == "too-deep", first
        assert str(first["path"]).startswith("g/"), first
        out = as_mode(mode, _renamed_resume, base, since)
    assert out["problems"] == [], out
    assert len(out["warned"]) == 1 and out["next"] == 0, out


def _set_aside_in_the_store(base: str) -> dict[str, object]:
    from veloverlay.errors import VeloError
    from veloverlay.session import harvest_resume, list_sessions
    from veloverlay.store.cas import Store

    store = Store.open(os.path.join(base, "store"))
    (sid,) = [s.id for s in list_sessions(store) if s.state == "dead-unharvested"]
    tmp = sorted(os.listdir(store.tmp))
    out: dict[str, object] = {}
    for where in (os.path.join(store.tmp, "aside"), os.path.join(store.root, "aside")):
        try:
            harvest_resume(store, sid, set_aside=where)
            out[where] = "harvested"
        except VeloError as exc:
            out[where] = exc.reason.value
        out[where + " made"] = os.path.lexists(where)
    out["tmp"] = sorted(os.listdir(store.tmp)) == tmp
    out["left"] = [s.state for s in list_sessions(store) if s.id == sid]
    return out


@pytest.mark.parametrize("mode", mode_params("root"))
def test_a_set_aside_directory_in_the_store_is_refused(mode: str) -> None:
    """`--set-aside DIR` must be on the session's files' filesystem, and the hint suggested the
    store's: old code took STORE/tmp/aside and moved the one copy of what was set aside into
    the store (in a fan-out directory, fsck then fails on it as stray objects; `remove-store`
    deletes it with the store). A DIR in the store is now refused (target-invalid) before
    anything is harvested; the session waits for another DIR."""
    levels = DEPTH_MAX + 40
    with unpriv_tmpdir() as base:
        first = as_mode(mode, _too_deep_run, base, levels, "overlay")
        assert first["reason"] == "too-deep", first
        out = as_mode(mode, _set_aside_in_the_store, base)
    for key, value in out.items():
        if key.endswith(" made"):
            assert value is False, out
        elif key not in ("tmp", "left"):
            assert value == "target-invalid", out
    assert out["tmp"] is True and out["left"] == ["dead-unharvested"], out


def _resume_into(base: str, aside: str) -> dict[str, object]:
    from veloverlay.errors import VeloError
    from veloverlay.session import harvest_resume, list_sessions
    from veloverlay.store.cas import Store

    store = Store.open(os.path.join(base, "store"))
    (sid,) = [s.id for s in list_sessions(store) if s.state == "dead-unharvested"]
    out: dict[str, object] = {}
    try:
        harvest_resume(store, sid, set_aside=aside)
        out["outcome"] = "harvested"
    except VeloError as exc:
        out["outcome"] = exc.reason.value
    out["left"] = [s.state for s in list_sessions(store) if s.id == sid]
    return out


@pytest.mark.parametrize("mode", mode_params("root"))
def test_a_set_aside_parent_swapped_for_a_link_is_refused(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root's `--set-aside ANC/aside`, ANC another user's: that user renames ANC and puts a
    link to one of root's directories in its place right before root's mkdir. Old code made
    the directory by its path, through the link, and moved the session's entries into root's
    directory; now it is made through ANC pinned, the swap is seen (target-invalid), root's
    directory stays empty, and a resume into another directory commits the session."""
    from tests.helpers.races import swap_at_mkdir
    from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged

    levels = DEPTH_MAX + 40
    with unpriv_tmpdir() as base:
        first = as_mode(mode, _too_deep_run, base, levels, "overlay")
        assert first["reason"] == "too-deep", first
        anc, holder = os.path.join(base, "anc"), os.path.join(base, "holder")
        os.mkdir(anc)
        os.chown(anc, UNPRIV_UID, UNPRIV_UID)
        os.mkdir(holder, 0o700)

        def attack() -> None:
            os.rename(anc, anc + ".moved")
            os.symlink(holder, anc)

        aside = os.path.join(anc, "aside")
        swap_at_mkdir(monkeypatch, aside, lambda: run_unprivileged(attack), before=True)
        out = as_mode(mode, _resume_into, base, aside)
        monkeypatch.undo()
        assert out["outcome"] == "target-invalid", out
        # resumed again (by another process), into a directory of root's own: committed
        good = os.path.join(base, "good")
        again = as_mode(mode, _resume_into, base, good)
        assert again == {"outcome": "harvested", "left": ["harvested"]}, again
        assert os.listdir(good) == ["1"]
        assert os.listdir(holder) == []
        assert os.listdir(anc + ".moved") == []  # the directory made there is gone again
