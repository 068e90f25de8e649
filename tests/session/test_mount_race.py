"""`veloverlay mount` records its session (state `mounted`) before it mounts, so that a crash
after the mount leaves a record. A `harvest --resume --all` running in between must not take
that record for an overlay that is gone (dead-unharvested) and harvest and remove the upper dir
the mount is about to use: while the mounting process lives, the session is `mounted`."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.helpers.cli import data, velo
from tests.helpers.unpriv import mount_lines, unpriv_tmpdir
from tests.session._util import checkout_ref, new_store
from veloverlay import mount, ns, session
from veloverlay.session.options import SessionOptions

# In a mount namespace of its own: a session another test starts meanwhile would hold a copy
# of what this one mounts (`own_mount_namespace`).
pytestmark = [
    pytest.mark.needs("root", "overlay_native"),
    pytest.mark.usefixtures("own_mount_namespace"),
]


def _scenario(base: str) -> dict[str, Any]:
    os.environ["VELO_OVERLAY_MODE"] = "native"
    store, _src = new_store(base)
    at = os.path.join(base, "at")
    os.mkdir(at)
    out: dict[str, Any] = {}
    real = mount.pin_dir

    def harvest_all_first(path: str) -> int:  # another process's harvest --resume --all
        p = velo(os.fspath(store.root), "harvest", "--all", "--json")
        out["during"] = (p.returncode, data(p))
        out["listed"] = [i.state for i in session.list_sessions(store)]
        return real(path)

    mount.pin_dir = harvest_all_first  # type: ignore[assignment]  # a forked child
    try:
        session.mount(store, SessionOptions(refs=["t"], at=at))
    finally:
        mount.pin_dir = real  # type: ignore[assignment]
    try:
        with open(os.path.join(at, "new"), "w") as f:
            f.write("written while mounted\n")
    finally:
        res = session.umount(store, at)
    out["commit"] = res.commit is not None
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    out["new"] = open(os.path.join(got, "new")).read()
    return out


def test_harvest_all_leaves_a_session_being_mounted_alone() -> None:
    before = mount_lines()
    with unpriv_tmpdir() as base:
        r = ns.run_in_child(_scenario, base)
    assert mount_lines() == before
    assert r["during"] == (0, []), r
    assert r["listed"] == ["mounted"], r
    assert r["commit"] is True and r["new"] == "written while mounted\n", r


def _mount_fails(base: str) -> dict[str, Any]:
    from veloverlay import overlay
    from veloverlay.errors import VeloError

    os.environ["VELO_OVERLAY_MODE"] = "native"
    store, _src = new_store(base)
    parent = os.path.join(base, "parent")
    os.mkdir(parent)

    def refused(*_a: Any, **_k: Any) -> None:  # the kernel refuses the mount
        raise OSError(19, "No such device")

    overlay.OverlaySpec.mount = refused  # type: ignore[method-assign]  # a forked child
    try:
        session.mount(store, SessionOptions(refs=["t"], at=os.path.join(parent, "new")))
        outcome = "mounted"
    except (OSError, VeloError) as exc:
        outcome = type(exc).__name__
    return {"outcome": outcome, "left": os.listdir(parent)}


def test_a_target_mount_made_goes_again_when_the_mount_fails() -> None:
    """`mount REF NEW` makes NEW; a mount the kernel refused left it behind, empty (the
    targets pass's list). It goes, as after a run."""
    before = mount_lines()
    with unpriv_tmpdir() as base:
        r = ns.run_in_child(_mount_fails, base)
    assert mount_lines() == before
    assert r == {"outcome": "OSError", "left": []}, r  # old: left ["new"]
