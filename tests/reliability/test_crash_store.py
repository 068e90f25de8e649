"""Crash safety of the store's writers: ingest, re-ingest, gc and bundle import killed with SIGKILL.

Each run picks, from a seeded RNG, a scenario and a kill: either a crash point with a crossing
count (`VELO_INTERNAL__TEST_FAULT`, see veloverlay/faults.py: the process SIGKILLs itself exactly
there), or SIGKILL from outside after a random delay. After every kill:
- the manifest database opens and `fsck` is clean (every object hashes to its name, every
  reference resolves);
- every ref points at a complete manifest: the version before the command or the one after;
- rerunning the interrupted command converges to the result of an uninterrupted run;
- orphan staging files are reclaimed by that rerun.
The default run takes a short sample; `make test-full` runs >= 200 (VELO_CRASH_RUNS overrides).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.trees import force_rmtree
from tests.reliability import report
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.repo import Repo

SEED = int(os.environ.get("VELO_CRASH_SEED", "20261124"))
FULL = os.environ.get("VELO_TEST_FULL") == "1"
RUNS = int(os.environ.get("VELO_CRASH_RUNS", "240" if FULL else "24"))

POINTS = {
    "ingest": [
        "stage.written",
        "publish.synced",
        "publish.renamed",
        "publish.done",
        "commit.before",
        "commit.after",
    ],
    "reingest": [
        "stage.written",
        "publish.synced",
        "publish.renamed",
        "publish.done",
        "commit.before",
        "commit.after",
    ],
    "gc": ["gc.sweep", "commit.before"],
    "import": [
        "import.record",
        "stage.written",
        "publish.synced",
        "publish.renamed",
        "publish.done",
        "commit.before",
    ],
}


def _tree(root: Path, rng: random.Random, files: int) -> None:
    for i in range(files):
        d = root / f"d{i % 7}" / f"s{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 10, 4096, 70_000])
        (d / f"f{i}").write_bytes(rng.randbytes(size) if i % 5 else b"dup")
    (root / "empty").mkdir()
    os.symlink("d0/s0/f0", root / "link")


def _mutate(root: Path, rng: random.Random) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    for p in files[::9]:
        p.unlink()
    for p in files[1::11]:
        p.write_bytes(rng.randbytes(500))
    (root / "d1" / "new").mkdir()
    for i in range(30):
        (root / "d1" / "new" / f"n{i}").write_bytes(rng.randbytes(3000))


def _backdate(root: Path) -> None:
    old = time.time_ns() - 3_600 * 10**9
    for p in [root, *root.rglob("*")]:
        os.utime(p, ns=(old, old), follow_symlinks=False)


@dataclass
class World:
    base: Path
    t0: Path
    t1: Path
    bundle: Path
    expected: dict[str, str]  # scenario -> root (or store digest listing for gc)


def _velo(
    store: Path, *args: str, fault: str | None = None, jobs: int = 2
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, VELO_STORE=os.fspath(store), VELO_JOBS=str(jobs))
    env.pop("VELO_INTERNAL__TEST_FAULT", None)
    if fault:
        env["VELO_INTERNAL__TEST_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "veloverlay", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _ok(store: Path, *args: str) -> None:
    p = _velo(store, *args)
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 0, f"veloverlay {' '.join(args)} failed: {err.decode()}"


def _refs(store: Path) -> dict[str, str]:
    repo = Repo.open(os.fspath(store))
    try:
        return {r.name: c.root for r, c in repo.refs()}
    finally:
        repo.close()


def _objects(store: Path) -> set[str]:
    return {p.name for p in (store / "objects-v2").rglob("*") if p.is_file()}


def _open(store: Path):  # type: ignore[no-untyped-def]
    r = Repo.open(os.fspath(store))
    return r.store, r.m


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="velo-crash-", dir="/dev/shm"))
    rng = random.Random(SEED)
    t0 = base / "t0"
    _tree(t0, rng, 160)
    t1 = base / "t1"
    shutil.copytree(t0, t1, symlinks=True)
    _mutate(t1, rng)
    _backdate(t0)
    _backdate(t1)
    ref = base / "reference"
    # Uninterrupted results of every scenario.
    expected: dict[str, str] = {}
    _ok(ref, "ingest", os.fspath(t0), "--name", "a")
    expected["ingest"] = _refs(ref)["a"]
    src = base / "src-ref"
    shutil.copytree(t0, src, symlinks=True)
    _ok(ref, "ingest", os.fspath(src), "--name", "r")
    shutil.rmtree(src)
    shutil.copytree(t1, src, symlinks=True)
    _ok(ref, "ingest", os.fspath(src), "--name", "r")
    expected["reingest"] = _refs(ref)["r"]
    bundle = base / "a.velo"
    _ok(ref, "export", "a", "-o", os.fspath(bundle))
    expected["import"] = expected["ingest"]
    yield World(base, t0, t1, bundle, expected)
    force_rmtree(base)


def _setup(world: World, scenario: str, store: Path, src: Path) -> list[str]:
    """Prepare the store for a scenario; return the command to crash."""
    if scenario == "ingest":
        return ["ingest", os.fspath(world.t0), "--name", "a"]
    if scenario == "reingest":
        shutil.copytree(world.t0, src, symlinks=True)
        _ok(store, "ingest", os.fspath(src), "--name", "r")
        shutil.rmtree(src)
        shutil.copytree(world.t1, src, symlinks=True)
        return ["ingest", os.fspath(src), "--name", "r"]
    if scenario == "gc":
        _ok(store, "ingest", os.fspath(world.t0), "--name", "a")
        _ok(store, "ingest", os.fspath(world.t1), "--name", "b")
        _ok(store, "refs", "--delete", "b")
        return ["gc", "--grace", "0"]
    if scenario == "import":
        return ["import", os.fspath(world.bundle)]
    raise AssertionError(scenario)


def _crash_once(world: World, rng: random.Random, run: int) -> dict[str, object]:
    scenario = rng.choice(sorted(POINTS))
    jobs = rng.choice([1, 2])
    case_dir = world.base / f"run{run}"
    store, src = case_dir / "store", case_dir / "src"
    case_dir.mkdir()
    cmd = _setup(world, scenario, store, src)
    before = _refs(store) if store.exists() else {}
    before_objects = _objects(store) if scenario == "gc" else set()
    if rng.random() < 0.8:
        point = rng.choice(POINTS[scenario])
        count = (
            rng.randint(1, 40)
            if point in ("stage.written", "publish.renamed", "gc.sweep", "import.record")
            else 1
        )
        kill = f"{point}:{count}"
        p = _velo(store, *cmd, fault=kill, jobs=jobs)
        p.communicate(timeout=120)
    else:
        delay = rng.uniform(0.0, 0.6)
        kill = f"after {delay:.3f}s"
        p = _velo(store, *cmd, jobs=jobs)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        p.communicate(timeout=120)
    rc = p.returncode
    outcome = "killed" if rc == -signal.SIGKILL else ("failed" if rc else "completed")

    # Invariants right after the crash.
    if store.exists() and (store / "manifests.lmdb").exists():
        s, m = _open(store)
        rep = fsck(s, m, jobs=1)
        assert rep.ok, f"{scenario} {kill}: fsck after the crash: {rep.findings[:3]}"
        after = {r.name: c.root for r, c in Repo(s, m).refs()}
        m.close()
        for name, root in after.items():
            allowed = {before.get(name), world.expected.get(scenario)}
            if scenario == "gc":
                allowed = {before.get(name)}
            assert root in allowed, f"{scenario} {kill}: ref {name} is at an unknown root {root}"
    # Rerun without a fault: converges to the uninterrupted result; staging is reclaimed.
    committed = scenario == "import" and store.exists() and "a" in _refs(store)
    if not committed:  # (an import that committed before the kill has nothing left to redo)
        _ok(store, *cmd)
    refs = _refs(store)
    if scenario == "gc":
        assert refs == {"a": world.expected["ingest"]}
        s, m = _open(store)
        with m.read() as txn:
            needed: set[bytes] = set()
            objs: set[bytes] = set()
            m.reachable(txn, bytes.fromhex(refs["a"]), needed, objs)
        m.close()
        assert {d.hex() for d in objs} <= _objects(store) <= before_objects
    else:
        name = {"ingest": "a", "reingest": "r", "import": "a"}[scenario]
        assert refs[name] == world.expected[scenario], f"{scenario} {kill}: rerun did not converge"
    s, m = _open(store)
    assert fsck(s, m, jobs=1).ok
    m.close()
    leftovers = [n for n in os.listdir(store / "tmp")]
    assert leftovers == [], f"{scenario} {kill}: staging not reclaimed: {leftovers}"
    force_rmtree(case_dir)  # (objects published as root carry +i)
    return {"scenario": scenario, "kill": kill, "outcome": outcome, "jobs": jobs}


def test_crash_store_writers(world: World) -> None:
    rng = random.Random(SEED)
    results = [_crash_once(world, rng, i) for i in range(RUNS)]
    outcomes = Counter((r["scenario"], r["outcome"]) for r in results)
    # The sample must really crash things, in every scenario.
    for scenario in POINTS:
        assert outcomes[(scenario, "killed")] + outcomes[(scenario, "failed")] > 0, outcomes
    if report.enabled():
        lines = [
            f"Store writers killed with SIGKILL: {RUNS} runs, seed {SEED} "
            "(tests/reliability/test_crash_store.py). After every kill: fsck clean, every ref "
            "at the old or the new version, the rerun converged to the uninterrupted result, "
            "staging reclaimed.",
            "",
            "| scenario | killed | failed cleanly (a worker was killed) "
            "| completed (kill point not reached) |",
            "| --- | --- | --- | --- |",
        ]
        for scenario in sorted(POINTS):
            lines.append(
                f"| {scenario} | {outcomes[(scenario, 'killed')]} "
                f"| {outcomes[(scenario, 'failed')]} | {outcomes[(scenario, 'completed')]} |"
            )
        report.write_section("crash-store", "\n".join(lines))
