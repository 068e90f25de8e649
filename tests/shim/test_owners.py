"""A shim session commits its own user's changes, never another user's files.

The tree is materialised in the real filesystem with the ref's modes: a 0777 or 1777 directory
of the ref lets every local user add files to it while the session runs, and the end's
stat-diff committed them to the session user's ref (where the next session materialises them
as that user's). Such entries are now skipped and named (`skipped`, kind "other-owner"). The
other user here is a real process of another uid.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.unpriv import UNPRIV_UID, unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref
from tests.shim._util import run_shim
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to act as two users (the session's and another)"
)

OTHER_UID = UNPRIV_UID + 1  # a second unprivileged uid (it need not exist in /etc/passwd)


def _store(base: str) -> Store:
    """Ref t: pub/ (0777, holding `existing`), tmp/ (1777), dir1/ (0755, holding x)."""
    src = os.path.join(base, "src")
    for d, mode in (("pub", 0o777), ("tmp", 0o1777), ("dir1", 0o755)):
        os.makedirs(os.path.join(src, d))
        os.chmod(os.path.join(src, d), mode)
    Path(src, "pub", "existing").write_text("the ref's\n")
    Path(src, "dir1", "x").write_text("ex\n")
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    return store


def _wait_for(path: str) -> str:
    """Shell: wait until `path` exists (a bounded poll: at most 30 s)."""
    return f"i=0; while [ ! -e {path} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"


def _as(uid: int, script: str) -> str:
    return f"setpriv --reuid={uid} --regid={uid} --clear-groups sh -c '{script}'"


def _outcome(store: Store, base: str, res: Any) -> dict[str, Any]:
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    committed = sorted(
        os.path.relpath(os.path.join(d, n), got)
        for d, dirs, names in os.walk(got)
        for n in dirs + names
    )
    return {
        "exit": res.exit_status,
        "committed": committed,
        "existing": Path(got, "pub", "existing").read_text(),
        "skipped": sorted(getattr(res, "skipped", [])),  # (the old result had none)
        "warnings": res.warnings,
        "json": res.to_dict().get("skipped"),
    }


def _root_session(base: str) -> dict[str, Any]:
    store = _store(base)
    proj = os.path.join(base, "proj")
    other = (
        f"echo evil > {proj}/pub/injected; mkdir {proj}/tmp/d; echo x > {proj}/tmp/d/f; "
        f"rm {proj}/pub/existing; echo evil > {proj}/pub/existing"
    )
    script = (
        f"set -e; echo mine > {proj}/pub/mine; "
        # a chown by the session's own command (as `tar x` as root does) is the session's
        f"echo tar > {proj}/dir1/chowned; chown {UNPRIV_UID}:{UNPRIV_UID} {proj}/dir1/chowned; "
        + _as(UNPRIV_UID, other)
    )
    res = run_shim(store, "t", ["sh", "-c", script], link=False, at=proj)
    return _outcome(store, base, res)


def test_another_users_files_in_a_root_session_are_skipped_and_named() -> None:
    with unpriv_tmpdir() as base:
        out = as_mode("root", _root_session, base)
    assert out["exit"] == 0, out
    assert "pub/injected" not in out["committed"], out
    assert not any(p.startswith("tmp/d") for p in out["committed"]), out
    assert out["existing"] == "the ref's\n", out  # theirs in its place: the ref's stays
    assert {"pub/mine", "dir1/chowned", "dir1/x"} <= set(out["committed"]), out
    expect = [("pub/existing", "other-owner"), ("pub/injected", "other-owner")]
    assert out["skipped"] == sorted([*expect, ("tmp/d", "other-owner")]), out
    assert {"path": "tmp/d", "kind": "other-owner"} in out["json"], out
    assert any(w.startswith("skipped pub/injected: owned by uid") for w in out["warnings"]), out


def _user_session(base: str) -> dict[str, Any]:
    store = _store(base)
    proj = os.path.join(base, "proj")
    # (the other user's writer runs outside the session, started by root: see the test)
    script = f"echo mine > {proj}/pub/mine; touch {proj}/pub/ready; {_wait_for(proj + '/pub/done')}"
    res = run_shim(store, "t", ["sh", "-c", script], link=False, at=proj)
    return _outcome(store, base, res)


def test_another_users_files_in_a_users_session_are_skipped() -> None:
    """uid UNPRIV_UID's session; uid OTHER_UID writes into its 0777 directory meanwhile."""
    with unpriv_tmpdir() as base:
        proj = os.path.join(base, "proj")
        wait = _wait_for(f"{proj}/pub/ready")
        writer = subprocess.Popen(
            [
                "sh",
                "-c",
                _as(OTHER_UID, f"{wait}; echo evil > {proj}/pub/injected; : > {proj}/pub/done"),
            ]
        )
        try:
            out = as_mode("rootfree", _user_session, base)
        finally:
            writer.kill()
            writer.wait()
    assert out["exit"] == 0, out
    assert "pub/mine" in out["committed"], out
    assert "pub/injected" not in out["committed"], out
    assert ("pub/injected", "other-owner") in out["skipped"], out


def _live_fold(base: str) -> list[tuple[str, str]]:
    """What the daemon's sync of journaled paths makes of the other user's entries: ops
    (kind, path) for them, none expected; the session's own new file is one."""
    from tests.session._util import head_root
    from veloverlay.session.shim.materialize import Baseline
    from veloverlay.session.shim.treesync import SELF, SUBTREE, TreeSync
    from veloverlay.tiers import Rules

    store = _store(base)
    proj = os.path.join(base, "proj")
    checkout_ref(store, "t", proj)
    Path(proj, "pub", "mine").write_text("mine\n")
    other = f"echo evil > {proj}/pub/injected; mkdir {proj}/tmp/d; echo x > {proj}/tmp/d/f"
    subprocess.run(["sh", "-c", _as(UNPRIV_UID, other)], check=True)
    root = head_root(store, "t")
    m = Manifests(store)
    try:
        sync = TreeSync(store, m, os.fsencode(proj), Baseline(), Rules.default(), link=False, uid=0)
        dirty = {b"pub/injected": SELF, b"pub/mine": SELF, b"tmp/d/f": SELF, b"tmp": SUBTREE}
        with store.lock(), store.stage() as stage, m.read() as txn:
            res = sync.sync(txn, root, dirty, stage)
    finally:
        m.close()
    return sorted((op.kind.name, os.fsdecode(op.path)) for op in res.ops)


def test_the_live_view_skips_them_too() -> None:
    with unpriv_tmpdir() as base:
        ops = as_mode("root", _live_fold, base)
    assert [p for _k, p in ops if p != "tmp"] == ["pub/mine"], ops
