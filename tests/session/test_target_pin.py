"""The session's overlay goes on the directory the manager chose: a directory on the way to the
target swapped for a symlink (by a user who owns it) between the manager's check and the mount
in the namespace child makes the session refuse to start (target-invalid), never mount over
what the symlink leads to."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_params, new_store, run_session
from veloverlay.errors import VeloError
from veloverlay.session.overlay import backend


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
