"""8 sessions on one ref, plus a re-ingest and a gc (grace 0), all at once, repeated.

Checks: no lost update (each session's change is in the ref or in its conflict ref), no object
that any ref or commit references is ever deleted (fsck resolves every reference), the re-ingest
lands or refuses cleanly, and nothing deadlocks (every process ends within a bound).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.session._util import new_store
from veloverlay import paths
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.fsck import fsck

FULL = os.environ.get("VELO_TEST_FULL") == "1"
ROUNDS = 8 if FULL else 2
SESSIONS = 8
BOUND_S = 180


def _velo(store: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "veloverlay", *args],
        env=dict(os.environ, VELO_STORE=store),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _content(m: Manifests, txn: object, root: bytes, path: str) -> bytes | None:
    e = m.lookup(txn, root, paths.parse_user_path(path))
    if e is None or not e.digest:
        return None
    return m.store.read_object(e.digest)


@pytest.mark.needs("root", "overlay_root")
def test_sessions_ingest_and_gc_together(shm_tmp: str) -> None:
    store, src = new_store(shm_tmp)
    root = os.fspath(store.root)
    for rnd in range(ROUNDS):
        with open(os.path.join(src, f"from-ingest-{rnd}"), "w") as f:
            f.write(f"ingest round {rnd}\n")
        procs = []
        for i in range(SESSIONS):
            script = (
                f"echo 'session {rnd}-{i}' > s-{rnd}-{i} && "
                f"echo 'shared by {rnd}-{i}' > f1 && cat f2 >/dev/null"
            )
            at = os.path.join(shm_tmp, f"at-{rnd}-{i}")
            procs.append(
                (
                    "session",
                    i,
                    _velo(
                        root,
                        "run",
                        "t",
                        "--at",
                        at,
                        "--json",
                        "--",
                        "sh",
                        "-c",
                        f"cd {at} && {script}",
                    ),
                )
            )
        procs.append(("ingest", -1, _velo(root, "ingest", src, "--name", "t", "--json")))
        procs.append(("gc", -1, _velo(root, "gc", "--grace", "0", "--json")))
        deadline = time.monotonic() + BOUND_S
        outcomes = []
        for kind, i, p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for _k, _i, q in procs:
                    q.kill()
                pytest.fail(f"round {rnd}: {kind} {i} did not finish within {BOUND_S} s")
            outcomes.append((kind, i, p.returncode, out, err))
        m = Manifests(store)
        try:
            with m.read() as txn:
                head = bytes.fromhex(m.resolve(txn, "t")[1].root)
                for kind, i, rc, out, err in outcomes:
                    if kind == "gc":
                        assert rc == 0, err
                    elif kind == "ingest":
                        # A re-ingest racing sessions lands (merged) or refuses on a conflict.
                        assert rc == 0 or '"reason": "conflict"' in out, err
                    else:
                        res = json.loads(out)
                        # a conflict is a failure the session reports (exit 1), not a loss
                        assert rc == (1 if res["conflicts"] else 0), f"session {i}: {err}"
                        want = f"session {rnd}-{i}\n".encode()
                        if res["conflict_ref"]:
                            _r, c = m.resolve(txn, res["conflict_ref"])
                            where = bytes.fromhex(c.root)
                        else:
                            assert res["commit"], res
                            where = head
                        got = _content(m, txn, where, f"s-{rnd}-{i}")
                        assert got == want, f"round {rnd}: session {i}'s change was lost ({res})"
            report = fsck(store, m, jobs=1)
            assert report.ok, f"round {rnd}: {report.findings[:5]}"
        finally:
            m.close()
