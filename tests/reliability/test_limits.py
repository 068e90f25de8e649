"""Resource limits real hosts have: a tree with more directories than RLIMIT_NOFILE allows open
files checks out and projects (both lower forms, a delta layer after a commit) and harvests."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys

import pytest

from tests.helpers.trees import assert_same_tree
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, mode_form_params, new_store
from veloverlay import ns, session
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.checkout import checkout
from veloverlay.store.manifest import Manifests

DIRS = 600
LIMIT = 256


def _scenario(base: str, form: str) -> dict[str, object]:
    os.environ["VELO_FORCE_LOWER"] = form
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
    src = os.path.join(base, "src")
    for d in range(DIRS):
        os.makedirs(os.path.join(src, f"d{d}", "s"))
        with open(os.path.join(src, f"d{d}", "s", "f"), "w") as f:
            f.write(str(d))
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, src, "big", jobs=1)
    with m.read() as txn:
        n = checkout(store, m, txn, bytes.fromhex(m.resolve(txn, "big")[1].root), base + "/co")
    m.close()
    at = os.path.join(base, "at")
    make = f"cd {at} && for i in $(seq 1 {DIRS}); do mkdir -p new$i/s && echo $i > new$i/s/f; done"
    first = session.run(store, session.SessionOptions(refs=["big"], at=at), ["sh", "-c", make])
    check = (
        f"test $(cat {at}/new{DIRS}/s/f) = {DIRS} && test $(cat {at}/d{DIRS - 1}/s/f) = {DIRS - 1}"
    )
    second = session.run(
        store, session.SessionOptions(refs=["big"], at=at, discard=True), ["sh", "-c", check]
    )
    return {
        "checkout": n,
        "first": first.exit_status,
        "changed": first.changed,
        "second": second.exit_status,
    }


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_more_directories_than_open_files(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _scenario, base, form)
    assert out["checkout"] == DIRS * 3
    assert out["first"] == 0 and out["changed"] >= DIRS, out
    assert out["second"] == 0, "the next session (a delta layer) does not show the harvest"


def _out_of_processes(base: str, backend: str) -> dict[str, object]:
    """A session started when this uid may start no more processes (RLIMIT_NPROC 1: the calling
    process is one), after one normal session (the probe, which forks, is then cached)."""
    from veloverlay.errors import SysError, VeloError
    from veloverlay.session import state

    store, _src = new_store(base)
    at = os.path.join(base, "at")
    opts = {"refs": ["t"], "backend": backend, "at": at}
    warm = session.run(store, session.SessionOptions(**opts, discard=True), ["true"])
    assert warm.exit_status == 0
    before = {st.id for st in state.iter_states(store)}
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    try:
        session.run(store, session.SessionOptions(**opts), ["sh", "-c", f"echo x > {at}/new"])
        raised: object = "nothing"
    except SysError as exc:
        raised = (exc.syscall, exc.hint is not None and "ulimit -u" in exc.hint)
    except (VeloError, OSError) as exc:
        raised = f"{type(exc).__name__}: {exc}"
    new = [st for st in state.iter_states(store) if st.id not in before]
    m = Manifests(store)
    try:
        with m.read() as txn:
            refs = sorted(r.name for r in m.refs(txn))
    finally:
        m.close()
    return {
        "raised": raised,
        "states": [st.state for st in new],
        "upper": [os.path.isdir(store.sessions / st.id / "upper") for st in new],
        "refs": refs,
    }


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.needs("userns", "overlay_userns")
def test_no_process_left_to_start_fails_the_session_cleanly(backend: str) -> None:
    """RLIMIT_NPROC reached: `run` died with a bare '[Errno 11] Resource temporarily
    unavailable' (reason os-error) and left a session that `sessions` listed as
    dead-unharvested (the shim's with its materialised tree and its REF@SESSION ref), though
    nothing had run. Now: a SysError naming fork (or the daemon's posix_spawn) with a hint about
    `ulimit -u`; the session is failed, nothing is left to harvest."""
    with unpriv_tmpdir() as base:
        got = as_mode("rootfree", _out_of_processes, base, backend)
    assert got["raised"] in (("fork", True), ("posix_spawn", True)), got
    assert got["states"] == ["failed"] and got["upper"] == [False], got
    assert got["refs"] == ["t"], got


DEEP = 100  # levels: more than a build's cache of 64 open directories, under a 64-file limit
DEEP_LIMIT = 64


def _ingested(base: str, src: str) -> Store:
    """A new store in `base` holding `src` as ref `deep` (ingested under the caller's limits)."""
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "deep", jobs=1)
    finally:
        m.close()
    return store


def _deep_scenario(base: str, form: str) -> dict[str, object]:
    """A tree DEEP directories deep, ingested and projected under RLIMIT_NOFILE 64; what the
    session reads at its bottom and what the source holds there."""
    os.environ["VELO_FORCE_LOWER"] = form
    resource.setrlimit(resource.RLIMIT_NOFILE, (DEEP_LIMIT, DEEP_LIMIT))
    rel = "/".join(f"d{i}" for i in range(DEEP))
    src = os.path.join(base, "src")
    os.makedirs(os.path.join(src, rel))
    with open(os.path.join(src, rel, "f"), "w") as f:
        f.write("bottom\n")
    store = _ingested(base, src)
    at = os.path.join(base, "at")
    out = os.path.join(base, "seen")
    try:
        r = session.run(
            store,
            session.SessionOptions(refs=["deep"], at=at, discard=True),
            ["sh", "-c", f"cat {at}/{rel}/f > {out}"],
        )
        status: object = r.exit_status
    except OSError as exc:  # a bare EMFILE from the layer build, before the command ran
        status = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(src, rel, "f")) as f:
        want = f.read()
    seen = open(out).read() if os.path.exists(out) else None
    return {"status": status, "seen": seen, "want": want}


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_deeper_tree_than_open_files_projects(mode: str, form: str) -> None:
    """`ulimit -n 64` and a tree 100 directories deep: `run` failed with a bare '[Errno 24] Too
    many open files' (reason os-error) before its command started, though ingest had stored
    the tree under the same limit: the layer build kept up to 64 directories open whatever
    the limit. It keeps a quarter of the limit open now, and on EMFILE gives its cached
    descriptors back and opens the one it needs."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _deep_scenario, base, form)
    assert out["status"] == 0, out
    assert out["seen"] == out["want"], out


def _deep_harvest(base: str, form: str) -> dict[str, object]:
    """A session that makes a directory DEEP levels deep under a soft RLIMIT_NOFILE of 64:
    what its harvest said, and after the limit is raised again what `harvest --resume`
    committed (checked out) and the same commands made in a plain directory."""
    from veloverlay.errors import VeloError
    from veloverlay.session import state

    os.environ["VELO_FORCE_LOWER"] = form
    store, _src = new_store(base)
    rel = "/".join(f"d{i}" for i in range(DEEP))
    make = "cd {0} && mkdir -p new/{1} && echo bottom > new/{1}/f"
    plain = os.path.join(base, "plain")
    os.mkdir(plain)
    assert os.system(make.format(plain, rel)) == 0
    at = os.path.join(base, "at")

    def limited() -> object:  # in a child, the session's manager, gone when it returns
        # The harvest walks any depth under the limit now (DirStack): halfway down the tree,
        # another part of the process takes every descriptor left (real EMFILE from the kernel
        # at the walk's next open), and gives them back as the failure unwinds the walk.
        from veloverlay.store.dirstack import DirStack

        hog: list[int] = []
        push, pop = DirStack.push, DirStack.pop

        def hogging_push(self: DirStack, fd: int, name: bytes) -> None:
            push(self, fd, name)
            if len(self) == DEEP // 2:
                with contextlib.suppress(OSError):
                    while True:
                        hog.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))

        def giving_pop(self: DirStack) -> None:
            while hog:
                os.close(hog.pop())
            pop(self)

        DirStack.push, DirStack.pop = hogging_push, giving_pop  # type: ignore[method-assign]
        resource.setrlimit(resource.RLIMIT_NOFILE, (DEEP_LIMIT, DEEP_LIMIT))
        try:
            opts = session.SessionOptions(refs=["t"], at=at)
            session.run(store, opts, ["sh", "-c", make.format(at, rel)])
        except VeloError as exc:
            return [exc.reason.value, exc.hint]
        return "harvested"

    said = ns.run_in_child_plain(limited)
    (st,) = [s for s in state.iter_states(store) if s.state != "harvested"] or [None]
    resumed: list[int] = []
    if st is not None:  # by another process: this one is the session's manager, still alive
        r = subprocess.run(
            [sys.executable, "-m", "veloverlay", "--store", str(store.root), "--json"]
            + ["harvest", "--resume", st.id],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        resumed = [h["changed"] for h in json.loads(r.stdout)]
    co = os.path.join(base, "co")
    checkout_ref(store, "t", co)
    return {"said": said, "resumed": resumed, "co": co + "/new", "plain": plain + "/new"}


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_harvest_out_of_open_files_says_ulimit_and_resumes(mode: str, form: str) -> None:
    """A harvest that runs out of open files (here: the process's descriptors taken halfway
    down a deep tree; a tree deeper than `ulimit -n` allowed did it before the walk kept a
    bounded number open): it failed with 'Too many open files (EMFILE)' and the hint 'once
    that is fixed: ...' (what is to fix, not said); an OSError outside veloverlay's own calls
    got no hint at all. Now the hint names `ulimit -n` (errors.errno_hint) before the resume
    command, and the session, kept, is committed whole once the limit is raised."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _deep_harvest, base, form)
        said = out["said"]
        assert isinstance(said, list) and "ulimit -n" in (said[1] or ""), said
        assert "harvest --resume" in said[1], said
        assert out["resumed"] == [1], out
        assert_same_tree(str(out["co"]), str(out["plain"]), mtimes=False, dir_mtimes=False)


def test_os_error_out_of_files_has_the_limit_hint() -> None:
    """The CLI's rendering of an OSError that is no SysError (reason os-error): EMFILE, ENFILE
    and EFBIG carry the hint a SysError of them carries."""
    import errno

    from veloverlay.cli.render import describe
    from veloverlay.errors import SysError

    for err in (errno.EMFILE, errno.ENFILE, errno.EFBIG):
        plain = describe(OSError(err, os.strerror(err), "some/file"))
        assert plain["reason"] == "os-error" and plain["hint"], (err, plain)
        assert plain["hint"] == describe(SysError(err, "open", "some/file"))["hint"]


def _deep_source(base: str) -> tuple[str, str]:
    """A tree DEEP directories deep with a file at every tenth level and at its bottom, and a
    directory mode of its own on the way; (its root, the path of its bottom)."""
    rel = "/".join(f"d{i}" for i in range(DEEP))
    src = os.path.join(base, "src")
    os.makedirs(os.path.join(src, rel))
    for i in range(0, DEEP + 1, 10):
        with open(os.path.join(src, *[f"d{j}" for j in range(i)], "f"), "w") as f:
            f.write(f"level {i}\n")
    os.chmod(os.path.join(src, "d0", "d1"), 0o750)
    return src, rel


def _deep_checkout(base: str) -> object:
    """Ingest and check out the deep tree under RLIMIT_NOFILE 64; None, or what was raised."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (DEEP_LIMIT, DEEP_LIMIT))
    src, _rel = _deep_source(base)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "deep", jobs=1)
        with m.read() as txn:
            root = bytes.fromhex(m.resolve(txn, "deep")[1].root)
            checkout(store, m, txn, root, os.path.join(base, "co"))
    except OSError as exc:  # the bare EMFILE of one open directory per level
        return f"{type(exc).__name__}: {exc}"
    finally:
        m.close()
    return None


def test_deeper_tree_than_open_files_checks_out() -> None:
    """`ulimit -n 64` and a tree 100 directories deep that ingest stores under that limit:
    checkout held one open directory per level and failed with a bare EMFILE (os-error) near
    level 55. It keeps a quarter of the limit open now, and opens a level again (no link
    followed, the same inode) when it comes back to it. The checkout is the source tree."""
    with unpriv_tmpdir() as base:
        raised = ns.run_in_child(_deep_checkout, base)
        assert raised is None, raised
        assert_same_tree(os.path.join(base, "src"), os.path.join(base, "co"))


def _deep_change(base: str, form: str) -> dict[str, object]:
    """A session under RLIMIT_NOFILE 64 changes the file at the bottom of the deep tree and makes
    a new tree as deep; its harvest, then the ref checked out (the limit back), and the same
    command run on a plain copy of the source."""
    import shutil

    from veloverlay.errors import VeloError

    os.environ["VELO_FORCE_LOWER"] = form
    src, rel = _deep_source(base)
    new = "/".join(f"n{i}" for i in range(DEEP))
    plain = os.path.join(base, "plain")
    shutil.copytree(src, plain, symlinks=True)
    change = f"echo changed > {rel}/f && mkdir -p {new} && echo new > {new}/f"
    subprocess.run(["sh", "-c", change], cwd=plain, check=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (DEEP_LIMIT, hard))
    store = _ingested(base, src)
    at = os.path.join(base, "at")
    try:
        r = session.run(
            store,
            session.SessionOptions(refs=["deep"], at=at),
            ["sh", "-c", f"cd {at} && {change}"],
        )
        status: object = (r.exit_status, r.changed)
    except (OSError, VeloError) as exc:  # EMFILE from the harvest's walk
        status = f"{type(exc).__name__}: {exc}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    checkout_ref(store, "deep", os.path.join(base, "co"))
    return {"status": status}


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_deeper_tree_than_open_files_harvests(mode: str, form: str) -> None:
    """`ulimit -n 64`: the harvest walked the upper with one open directory per level (both its
    merge of copied-up directories and its build of new ones) and failed with a bare EMFILE
    on a tree ~55 levels deep. It keeps a quarter of the limit open now (`DirStack`). The ref
    it made is what the same command makes of a plain copy of the source."""
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _deep_change, base, form)
        assert out["status"] == [0, 2] or out["status"] == (0, 2), out
        assert_same_tree(
            os.path.join(base, "plain"), os.path.join(base, "co"), mtimes=False, dir_mtimes=False
        )
