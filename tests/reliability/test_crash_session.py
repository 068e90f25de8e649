"""Crash safety of sessions: the manager killed with SIGKILL while it builds a lower layer,
harvests, publishes or commits (seeded crash points, see veloverlay/faults.py).

After every kill: no mount is left in this namespace, fsck is clean, the ref is at the old or the
new version; then `harvest --all`, and a rerun of the session if the command never ran, converge
to what an uninterrupted run gives (the same contents), with staging reclaimed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import tempfile
from collections import Counter

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.trees import force_rmtree
from tests.helpers.unpriv import mine, mount_lines
from tests.reliability import report
from tests.session._util import new_store
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.fsck import fsck

SEED = int(os.environ.get("VELO_CRASH_SEED", "20261124"))
FULL = os.environ.get("VELO_TEST_FULL") == "1"
RUNS = int(os.environ.get("VELO_CRASH_SESSION_RUNS", "200" if FULL else "16"))
POINTS = [
    ("lower.build", 30),
    ("harvest.file", 3),
    ("stage.written", 3),
    ("publish.synced", 1),
    ("publish.renamed", 3),
    ("publish.done", 1),
    ("commit.before", 1),
]


def _velo(store: str, *args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    return velo_text(store, *args, env={"VELO_JOBS": "1"}, fault=fault, timeout=120)


def _contents(store_root: str, ref: str) -> dict[str, str]:
    from veloverlay.store.cas import Store

    store = Store(store_root)
    m = Manifests(store)
    try:
        with m.read() as txn:
            root = bytes.fromhex(m.resolve(txn, ref)[1].root)
            out = {}
            for path, e, _n in m.walk(txn, root):
                if e.digest and e.kind.name == "FILE":
                    out[path.decode()] = store.read_object(e.digest).decode()
            return out
    finally:
        m.close()


@pytest.mark.needs("root", "overlay_root")
def test_session_manager_killed_at_crash_points() -> None:
    rng = random.Random(SEED)
    outcomes: Counter[tuple[str, str]] = Counter()
    base = mine(tempfile.mkdtemp(prefix="velo-crash-sess-", dir="/dev/shm"))
    try:
        for run in range(RUNS):
            case = os.path.join(base, f"r{run}")
            os.makedirs(case)
            store, _src = new_store(case)
            root = os.fspath(store.root)
            at = os.path.join(case, "at")
            script = f"cd {at} && echo changed > f1 && echo new-{run} > out && rm f2"
            before = _contents(root, "t")
            expected = dict(before, f1="changed\n", out=f"new-{run}\n")
            expected.pop("f2")
            point, most = rng.choice(POINTS)
            fault = f"{point}:{rng.randint(1, most)}"
            if rng.random() < 0.5:  # half the runs build their lower first (crash in harvest)
                _velo(root, "run", "t", "--at", at, "--discard", "--", "true")
            mounts = mount_lines()
            r = _velo(root, "run", "t", "--at", at, "--", "sh", "-c", script, fault=fault)
            outcome = "killed" if r.returncode == -signal.SIGKILL else f"rc={r.returncode}"
            outcomes[(point, outcome)] += 1
            assert mount_lines() == mounts, f"{fault}: a mount outlived the killed manager"
            s_store, m = store, Manifests(store)
            try:
                rep = fsck(s_store, m, jobs=1)
            finally:
                m.close()
            assert rep.ok, f"{fault}: fsck after the kill: {rep.findings[:3]}"
            now = _contents(root, "t")
            assert now in (before, expected), f"{fault}: the ref is neither old nor new"
            h = _velo(root, "harvest", "--all")
            assert h.returncode == 0, f"{fault}: harvest --all: {h.stderr}"
            if _contents(root, "t") != expected:
                # Killed before the command ran (lower build): running it again converges.
                again = _velo(root, "run", "t", "--at", at, "--", "sh", "-c", script)
                assert again.returncode == 0, again.stderr
            assert _contents(root, "t") == expected, f"{fault}: did not converge"
            assert os.listdir(os.path.join(root, "tmp")) == [], f"{fault}: staging left"
            s_store, m = store, Manifests(store)
            try:
                assert fsck(s_store, m, jobs=1).ok
            finally:
                m.close()
            force_rmtree(case)
    finally:
        force_rmtree(base)
    assert sum(n for (_p, o), n in outcomes.items() if o == "killed") > 0, outcomes
    if report.enabled():
        lines = [
            f"Session managers killed with SIGKILL: {RUNS} runs, seed {SEED} "
            "(tests/reliability/test_crash_session.py). After every kill: no mount left, fsck "
            "clean, the ref at the old or the new version; `harvest --all` (and a rerun when "
            "the command never ran) converged to the uninterrupted result, staging reclaimed.",
            "",
            "| crash point | killed | not reached (completed) |",
            "| --- | --- | --- |",
        ]
        for point, _most in POINTS:
            done = sum(n for (p, o), n in outcomes.items() if p == point and o != "killed")
            lines.append(f"| {point} | {outcomes[(point, 'killed')]} | {done} |")
        report.write_section("crash-session", "\n".join(lines))
