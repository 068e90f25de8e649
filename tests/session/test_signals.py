"""Signals sent to a session's manager (`kill`, `docker stop`, a closed terminal) reach the
command, in every overlay mode (root in a user namespace, root-native, root-free) and in the shim
backend: its trap runs and what it wrote is committed, exactly as a plain directory given the same
writes shows it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.trees import diff_snapshots, snapshot
from tests.helpers.unpriv import mount_lines, unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, make_base, mode_params, new_store

_WRITES = "echo before > before.txt && rm f1 && mkdir -p nd && echo n > nd/n"
_TRAP = "echo trapped > trapped.txt && rm f2 && echo more >> before.txt"


def _term_the_manager(base: str, backend: str) -> dict[str, object]:
    """`run` a command that writes, then traps SIGTERM (writes more, then ends by the signal
    as a well-behaved program does); SIGTERM the manager once the command is ready."""
    store, _src = new_store(base)
    at = os.path.join(base, "at")
    ready = os.path.join(base, "ready")
    script = (
        f"cd {at} && {_WRITES} && trap '{_TRAP}; trap - TERM; kill -TERM $$' TERM && "
        f"touch {ready}; while :; do sleep 0.05; done"
    )
    manager = subprocess.Popen(
        [sys.executable, "-m", "veloverlay", "--store", os.fspath(store.root), "run", "t"]
        + ["--backend", backend, "--at", at, "--", "sh", "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            assert manager.poll() is None, manager.stderr.read() if manager.stderr else ""
            assert time.monotonic() < deadline, "the command never got ready"
            time.sleep(0.02)
        manager.send_signal(signal.SIGTERM)
        _out, err = manager.communicate(timeout=120)
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.communicate()
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    plain = os.path.join(base, "plain")
    make_base(plain)
    subprocess.run(["sh", "-c", f"{_WRITES} && {_TRAP}"], cwd=plain, check=True)
    return {
        "status": manager.returncode,
        "stderr": err.decode(errors="replace")[-800:],
        "differ": diff_snapshots(
            snapshot(got, mtimes=False, dir_mtimes=False),
            snapshot(plain, mtimes=False, dir_mtimes=False),
        ),
    }


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_sigterm_to_the_manager_runs_the_commands_trap_and_commits_its_writes(mode: str) -> None:
    """SIGTERM to `run` SIGKILLed the command at once (status 137): its trap never ran, and
    what it would have written (or removed) there was missing from the commit."""
    before = mount_lines()
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _term_the_manager, base, "overlay")
    assert mount_lines() == before
    assert r["status"] == 128 + signal.SIGTERM, r["stderr"]
    assert r["differ"] == [], r["stderr"]


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_sigterm_to_a_shim_sessions_manager_runs_the_commands_trap(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _term_the_manager, base, "shim")
    assert r["status"] == 128 + signal.SIGTERM, r["stderr"]
    assert r["differ"] == [], r["stderr"]
