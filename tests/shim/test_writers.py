"""A shim session's tree is a plain directory: a process outside the session's process tree
(not the command's descendant, so never ended by the reaper) can hold one of its files open for
writing when the command ends. Its writes after the end-of-session stat-diff would go to a file
the session then removes, and be lost though they succeed. The session is `held` instead:
nothing committed, the tree kept, until `harvest --resume` finds no such writer; then every byte
the writer wrote is committed."""

from __future__ import annotations

import os
import time

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref
from tests.shim._util import run_shim
from veloverlay import session
from veloverlay.errors import VeloError
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests

_WAIT = "touch ready; i=0; while [ ! -e go ] && [ $i -lt 2000 ]; do sleep 0.01; i=$((i+1)); done"


def _outsider(proj: str, to_parent: int, from_parent: int) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(proj, "ready")):
        assert time.monotonic() < deadline, "the session did not start"
        time.sleep(0.01)
    fd = os.open(os.path.join(proj, "out"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"a")
    os.close(os.open(os.path.join(proj, "go"), os.O_WRONLY | os.O_CREAT, 0o644))
    os.read(from_parent, 1)  # the session has returned (or raised)
    os.write(fd, b"b")
    os.close(fd)
    os.write(to_parent, b"d")


def _scenario(base: str) -> dict[str, object]:
    src = os.path.join(base, "src")
    os.makedirs(os.path.join(src, "d"))
    with open(os.path.join(src, "d", "f"), "w") as f:
        f.write("f\n")
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    proj = os.path.join(base, "proj")
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _outsider(proj, up_w, down_r)
            os._exit(0)
        except BaseException:
            os._exit(1)
    out: dict[str, object] = {}
    try:
        res = run_shim(store, "t", ["sh", "-c", f"cd {proj}; {_WAIT}"], link=False, at=proj)
        out["run"] = ("returned", res.state)
    except VeloError as exc:
        out["run"] = ("raised", exc.reason.value)
    out["listed"] = [i.state for i in session.list_sessions(store)]
    out["tree_kept"] = os.path.exists(os.path.join(proj, "out"))
    os.write(down_w, b"e")
    out["outsider"] = os.read(up_r, 1)
    _, status = os.waitpid(pid, 0)
    out["outsider_exit"] = os.waitstatus_to_exitcode(status)
    out["listed_after"] = [i.state for i in session.list_sessions(store)]
    out["resumed"] = [r.state for r in session.harvest_resume(store, None)]
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    with open(os.path.join(got, "out"), "rb") as f:
        out["out"] = f.read()
    out["tree_gone"] = not os.path.exists(os.path.join(proj, "out"))
    return out


@pytest.mark.parametrize(
    "mode", [pytest.param("root", marks=pytest.mark.needs("root"), id="root"), "rootfree"]
)
def test_a_file_open_for_writing_outside_holds_the_session(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _scenario, base)
    assert r["run"] == ("raised", "session-active"), r
    assert r["listed"] == ["held"] and r["tree_kept"] is True, r
    assert r["outsider"] == b"d" and r["outsider_exit"] == 0, r
    assert r["listed_after"] == ["dead-unharvested"], r
    assert r["resumed"] == ["harvested"], r
    assert r["out"] == b"ab", r  # the write after the command ended is committed too
    assert r["tree_gone"] is True, r
