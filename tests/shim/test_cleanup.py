"""The end of a root shim session removes its tree and nothing else.

The tree lies at a path another user may partly own: whoever owns a directory above the target
can rename that directory and put a symbolic link to a directory of root's in its place. The
clean-up checked the tree's (dev, ino) by path, then removed by path (chmod following links,
rmdir by name): root's directory behind the link was chmod-ed and removed (reproduced with a
real race, 3 of 5 tries). The attacker here is a real second uid, acting at a seam the removal
calls between its identity check and the removal (`backend._checked`), or between the commit
and the removal; the victim is root's, with content and a mode of its own.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers.races import swap_at_mkdir
from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged, unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, new_store
from tests.shim._util import run_shim
from veloverlay.errors import VeloError
from veloverlay.session.shim import backend

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to be the session's user and another uid the attacker"
)

VICTIM_MODE = 0o750


@pytest.fixture
def victim() -> Iterator[str]:
    """Root's directory `proj` (0750: keep, sub/inner) in a root-only directory: what the
    attacker's link leads the session's path to."""
    holder = tempfile.mkdtemp(prefix="velo-victim-", dir="/dev/shm")
    os.chmod(holder, 0o755)  # (a link of uid UNPRIV_UID's to it must resolve for root only)
    proj = os.path.join(holder, "proj")
    os.makedirs(os.path.join(proj, "sub"))
    for rel in ("keep", "sub/inner"):
        with open(os.path.join(proj, rel), "w") as f:
            f.write(f"root's {rel}\n")
    os.chmod(proj, VICTIM_MODE)
    try:
        yield holder
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _intact(holder: str) -> tuple[int, list[str], str] | None:
    proj = os.path.join(holder, "proj")
    try:
        with open(os.path.join(proj, "sub", "inner")) as f:
            inner = f.read()
        return stat.S_IMODE(os.stat(proj).st_mode), sorted(os.listdir(proj)), inner
    except FileNotFoundError:
        return None  # removed


INTACT = (VICTIM_MODE, ["keep", "sub"], "root's sub/inner\n")


def _repoint(anc: str, holder: str) -> None:
    """As uid UNPRIV_UID, who owns anc's parent: anc renamed to anc.moved, and anc a symbolic
    link to root's `holder` (so anc/proj is root's victim)."""

    def attack() -> None:
        os.rename(anc, anc + ".moved")
        os.symlink(holder, anc)

    run_unprivileged(attack)


def _session(base: str, *, existing: bool, seam: Callable[[], None]) -> dict[str, Any]:
    """Root's shim session at base/anc/proj (anc: uid UNPRIV_UID's); `seam` runs at
    backend._checked. What happened, as plain data (this runs in a forked child)."""
    store, _src = new_store(base)
    anc = os.path.join(base, "anc")
    os.mkdir(anc)
    os.chown(anc, UNPRIV_UID, UNPRIV_UID)
    proj = os.path.join(anc, "proj")
    if existing:  # the emptying branch: an empty directory of root's, with a mode of its own
        os.mkdir(proj)
        os.chmod(proj, 0o710)
    backend._checked = lambda _target: seam()  # type: ignore[assignment]
    out: dict[str, Any] = {}
    try:
        res = run_shim(store, "t", ["sh", "-c", f"echo new > {proj}/new"], link=False, at=proj)
        out["result"] = (res.state, res.exit_status, bool(res.commit))
    except VeloError as exc:
        out["error"] = (exc.reason.value, exc.message)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    out["committed"] = sorted(os.listdir(got))
    moved = os.path.join(anc + ".moved", "proj")
    out["moved"] = sorted(os.listdir(moved)) if os.path.isdir(moved) else None
    if out["moved"] is not None:
        out["moved_mode"] = stat.S_IMODE(os.stat(moved).st_mode)
    return out


@pytest.mark.parametrize("existing", [False, True], ids=["created", "emptied"])
def test_an_ancestor_swapped_after_the_check_removes_nothing_of_roots(
    victim: str, existing: bool
) -> None:
    """The swap lands after the tree was opened and found to be the session's: the removal
    goes on through descriptors, so the session's own tree goes (or is emptied, with its old
    mode back) wherever it was moved, and root's directory behind the link keeps its mode and
    content (the old code chmod-ed it, then removed or emptied it)."""
    with unpriv_tmpdir() as base:
        anc = os.path.join(base, "anc")
        out = as_mode("root", _session, base, existing=existing, seam=lambda: _repoint(anc, victim))
        assert _intact(victim) == INTACT, out
        assert out.get("result") == ("harvested", 0, True), out
        assert "new" in out["committed"], out
        if existing:
            assert (out["moved"], out["moved_mode"]) == ([], 0o710), out
        else:
            assert out["moved"] is None, out  # the session's tree is gone from where it went


def test_an_ancestor_swapped_before_the_removal_is_an_error_not_silence(victim: str) -> None:
    """The swap lands between the commit and the removal: the directory now at the target's
    path is not the session's tree; it is left alone and the session says so (target-invalid,
    naming the commit it made), instead of returning as if the tree had gone."""
    from veloverlay.session.commit import harvest_and_commit

    def committed_then_swapped(*args: Any, **kw: Any) -> Any:
        done = harvest_and_commit(*args, **kw)
        _repoint(anc, victim)
        return done

    with unpriv_tmpdir() as base:
        anc = os.path.join(base, "anc")
        backend_hc = backend.harvest_and_commit
        backend.harvest_and_commit = committed_then_swapped  # type: ignore[assignment]
        try:
            out = as_mode("root", _session, base, existing=False, seam=lambda: None)
        finally:
            backend.harvest_and_commit = backend_hc  # type: ignore[assignment]
        assert _intact(victim) == INTACT, out
        assert "error" in out, out
        reason, message = out["error"]
        assert reason == "target-invalid", out
        assert "committed as" in message and "not removed" in message, message
        assert "new" in out["committed"], out  # the session's work is in the ref
        left = sorted(["new", *os.listdir(os.path.join(base, "src"))])
        assert out["moved"] == left, out  # the session's tree, where it was moved: left alone


def test_an_ancestor_swapped_right_after_the_target_is_made_is_refused(
    victim: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap lands between root's mkdir of the target and the identity taken of it: the old
    code took that identity by path, through the link, so root's directory became "the
    session's tree": materialised into (its mode changed), then emptied and removed at the end.
    Now the target is made and opened through its pinned parent and must still be where its
    path says: the session refuses to start (target-invalid), removes the directory it made,
    and root's directory keeps its mode and content."""
    with unpriv_tmpdir() as base:
        anc = os.path.join(base, "anc")
        proj = os.path.join(anc, "proj")
        swap_at_mkdir(monkeypatch, proj, lambda: _repoint(anc, victim), before=False)
        out = as_mode("root", _session, base, existing=False, seam=lambda: None)
        monkeypatch.undo()
        assert _intact(victim) == INTACT, out
        assert "error" in out, out
        reason, message = out["error"]
        assert reason == "target-invalid", out
        assert "changed while it was opened" in message, message
        assert out["moved"] is None, out  # the directory made there was removed again
        assert os.listdir(anc + ".moved") == [], out
        assert os.listdir(os.path.join(base, "store", "sessions")) == [], out


def test_a_reaper_ending_after_its_session_directory_was_removed_makes_nothing(
    tmp_path: Any,
) -> None:
    """The reaper's last act is its report (reaper.json): once the session directory is gone
    (the store removed meanwhile), it wrote it by making every missing directory on the way,
    the store's path included (seen as a stray store/sessions/<id>/reaper.json in /dev/shm)."""
    from veloverlay.session.shim import procs

    store = tmp_path / "store"
    sdir = store / "sessions" / "20261207-000000-abcdef"
    go = os.pipe()
    report = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(report[0])
            env = {"PATH": "/usr/bin:/bin"}
            procs._reaper_main(["true"], env, str(tmp_path), 1.0, report[1], go, sdir)
            code = 0
        finally:
            os._exit(code)
    os.close(report[1])
    os.close(go[0])
    os.write(go[1], b"g")
    os.close(go[1])
    while os.read(report[0], 4096):
        pass
    os.close(report[0])
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not store.exists()
