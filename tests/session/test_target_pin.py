"""The session's overlay goes on the directory the manager chose: a directory on the way to the
target swapped for a symlink (by a user who owns it) between the manager's check and the mount
in the namespace child makes the session refuse to start (target-invalid), never mount over
what the symlink leads to."""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest

from tests.helpers.races import swap_at_mkdir
from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged, unpriv_tmpdir
from tests.session._util import as_mode, mode_params, new_store, run_session
from veloverlay.errors import Reason, VeloError
from veloverlay.session.overlay import backend
from veloverlay.session.target import overlay_target, resolve_stack
from veloverlay.store.manifest import Manifests


def _scenario(base: str) -> dict[str, Any]:
    store, _src = new_store(base)
    owned = os.path.join(base, "owned")  # the directory another user could re-point
    os.makedirs(os.path.join(owned, "proj"))
    victim = os.path.join(base, "victim")
    os.makedirs(os.path.join(victim, "proj"))
    with open(os.path.join(victim, "proj", "mine"), "w") as f:
        f.write("the victim's\n")
    real = backend.child_main

    def swap_then_run(ctx: Any) -> None:  # in the namespace child, before it mounts
        os.rename(owned, owned + "-moved")
        os.symlink(victim, owned)
        real(ctx)

    backend.child_main = swap_then_run  # type: ignore[assignment]  # a forked child
    target = os.path.join(owned, "proj")
    cmd = f"cd {target} && ls > listing && cat mine > seen 2>/dev/null; true"
    try:
        run_session(store, ["t"], ["sh", "-c", cmd], at=target)
        outcome = "ran"
    except VeloError as exc:
        outcome = exc.reason.value
    return {
        "outcome": outcome,
        "victim": sorted(os.listdir(os.path.join(victim, "proj"))),
    }


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_a_target_re_pointed_before_the_mount_is_refused(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _scenario, base)
    assert r["outcome"] == "target-invalid", r
    assert r["victim"] == ["mine"], r


def _swapped_after_mount(base: str) -> dict[str, Any]:
    """The target's parent renamed and replaced by a symlink while the session runs (its owner
    can do it at any time: outside the session's namespace it is an ordinary directory; done
    here from the namespace child, just before the seal, on the same shared directories). The
    symlink leads to another filesystem's mount point: a seal by path would remount that one."""
    from veloverlay import mount
    from veloverlay.session.overlay import pid1

    store, _src = new_store(base)
    owned = os.path.join(base, "owned")
    os.makedirs(os.path.join(owned, "proj"))
    victim = os.path.join(base, "victim")
    os.makedirs(os.path.join(victim, "proj"))
    mount.mount_tmpfs(os.path.join(victim, "proj"), "size=1m")
    real = pid1.seal

    def swap_then_seal(target: str, wait: float) -> str | None:
        os.rename(owned, owned + "-moved")
        os.symlink(victim, owned)
        why = real(target, wait)
        with open(os.path.join(base, "seal"), "w") as f:  # this runs in the namespace child
            f.write(repr(why))
        return why

    pid1.seal = swap_then_seal  # type: ignore[assignment]  # a forked child
    target = os.path.join(owned, "proj")
    try:
        res = run_session(store, ["t"], ["sh", "-c", f"echo new > {target}/made"], at=target)
        readonly = bool(os.statvfs(os.path.join(victim, "proj")).f_flag & os.ST_RDONLY)
    finally:
        mount.umount(os.path.join(victim, "proj"))
    with open(os.path.join(base, "seal")) as f:
        sealed = f.read()
    return {
        "victim_readonly": readonly,
        "seal": sealed,
        "commit": res.commit is not None,
        "exit": res.exit_status,
    }


@pytest.mark.parametrize("mode", mode_params("root", "native"))
def test_the_seal_acts_on_the_mounted_overlay_not_on_the_path(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _swapped_after_mount, base)
    assert r == {"victim_readonly": False, "seal": "None", "commit": True, "exit": 0}, r


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, and another uid as the attacker")
def test_a_missing_target_is_made_where_its_path_says_or_not_at_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing target is made by the manager: the old code resolved it, then made it by path,
    so a directory on the way swapped for a symlink in between (by uid UNPRIV_UID, who owns it)
    had root make the directory in one of root's own. Now it is made through its pinned parent
    and must be where the path says (else target-invalid, and it is removed again)."""
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        anc = os.path.join(base, "anc")
        os.mkdir(anc)
        os.chown(anc, UNPRIV_UID, UNPRIV_UID)
        victim = os.path.join(base, "victim")  # root's
        os.mkdir(victim)
        os.chmod(victim, 0o750)

        def attack() -> None:
            os.rename(anc, anc + ".moved")
            os.symlink(victim, anc)

        m = Manifests(store)
        try:
            top = resolve_stack(m, ["t"]).refs[-1]
        finally:
            m.close()
        target = os.path.join(anc, "proj")
        swap_at_mkdir(monkeypatch, target, lambda: run_unprivileged(attack), before=True)
        with pytest.raises(VeloError) as exc:
            overlay_target(store, target, top)
        monkeypatch.undo()
        assert exc.value.reason is Reason.TARGET_INVALID, exc.value
        assert os.listdir(victim) == []
        assert stat.S_IMODE(os.stat(victim).st_mode) == 0o750
        assert os.listdir(anc + ".moved") == []
