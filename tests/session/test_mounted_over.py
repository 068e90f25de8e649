"""A command that mounts over part of its projection (a tmpfs over a directory, a bind over a
file) writes into that mount, not into the session's upper dir: those writes cannot be
harvested. The session says so, naming each path (result and state warnings), and still
commits everything written elsewhere; a session that mounts nothing has no such warning."""

from __future__ import annotations

import os

import pytest

from tests.helpers.unpriv import mount_lines, unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, mode_params, new_store, run_session
from veloverlay import session


def _mount_over(base: str, as_root: bool) -> dict[str, object]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    script = (
        f"cd {proj} && mount -t tmpfs velo-test d && echo lost > d/y && echo kept > kept && "
        "touch other && mount --bind other f1 && echo lost > f1"
    )
    res = run_session(store, ["t"], ["sh", "-c", script], at=proj, as_root=as_root)
    plain = run_session(store, ["t"], ["sh", "-c", f"cd {proj} && echo x > plain"], at=proj)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    listed = {i.id: i.warnings for i in session.list_sessions(store)}
    return {
        "exit": res.exit_status,
        "warnings": res.warnings,
        "state_warnings": listed[res.session_id],
        "plain_warnings": [w for w in plain.warnings if "mounted over" in w],
        "committed": sorted(p for _s, p in res.changes),
        "d": sorted(os.listdir(os.path.join(got, "d"))),
        "f1": open(os.path.join(got, "f1")).read(),
        "kept": open(os.path.join(got, "kept")).read(),
    }


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_writes_under_a_mount_the_command_made_are_reported(mode: str) -> None:
    before = mount_lines()
    with unpriv_tmpdir() as base:
        # root-free: appear as root inside, which may mount in the session's own namespace
        r = as_mode(mode, _mount_over, base, mode == "rootfree")
    assert mount_lines() == before
    assert r["exit"] == 0
    proj = "/proj/"
    said = [w for w in r["warnings"] if "mounted over" in w]  # type: ignore[union-attr]
    assert len(said) == 1, r["warnings"]
    assert f"{proj}d" in said[0] and f"{proj}f1" in said[0] and "not committed" in said[0]
    assert said[0] in r["state_warnings"]  # type: ignore[operator]
    assert r["plain_warnings"] == []
    # everything written outside those mounts is committed; the tree under them is unchanged
    assert r["committed"] == ["kept", "other"]
    assert r["d"] == ["b", "c"] and r["f1"] == "one\n" and r["kept"] == "kept\n"
