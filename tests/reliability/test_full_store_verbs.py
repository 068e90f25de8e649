"""Every verb that writes the store, on a store whose filesystem is full: each fails with the
machine-readable reason `store-full` (a hint that says what frees room, never "fix the source"),
leaves refs, tags, commit logs, objects and sessions as they were, and works once there is room.
Reading verbs, and verbs whose output goes elsewhere, work on a full store. (Deleting refs and gc
on a full disk: test_store_full.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.fulldisk import fill, private_tmpfs


def _velo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "veloverlay", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
    )


def _state(env: dict[str, str], store: str) -> str:
    """What the store holds: refs, tags, the commit logs, objects and sessions (a digest)."""
    parts = [_velo(env, *a).stdout for a in (["refs"], ["tag"], ["log", "t"], ["sessions"])]
    for top, _dirs, names in sorted(os.walk(os.path.join(store, "objects-v2"))):
        parts.extend(os.path.join(top, n) for n in sorted(names))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _random_tree(path: str, names: list[str], size: int) -> None:
    os.makedirs(path)
    for n in names:
        with open(os.path.join(path, n), "wb") as f:
            f.write(os.urandom(size))


def _verbs_on_a_full_store(base: str) -> dict[str, object]:

    mnt = private_tmpfs(base, "4m")
    store = os.path.join(mnt, "store")
    env = {**os.environ, "VELO_STORE": store, "NO_COLOR": "1", "VELO_RUNTIME_DIR": "off"}
    other = {**env, "VELO_STORE": os.path.join(base, "other")}
    _random_tree(os.path.join(base, "t"), ["a", "b"], 50_000)
    _random_tree(os.path.join(base, "new"), ["n"], 400_000)
    _random_tree(os.path.join(base, "u"), ["u"], 400_000)
    out: dict[str, object] = {}
    out["setup"] = [
        _velo(env, "ingest", os.path.join(base, "t"), "--name", "t").returncode,
        _velo(other, "ingest", os.path.join(base, "u"), "--name", "u").returncode,
        _velo(other, "export", "u", "-o", os.path.join(base, "u.velo")).returncode,
    ]
    before = _state(env, store)
    filler = os.path.join(mnt, "filler")
    out["filler"] = fill(filler)
    at = os.path.join(base, "at")
    writes = {
        "ingest": ["ingest", os.path.join(base, "new"), "--name", "new"],
        "import": ["import", os.path.join(base, "u.velo")],
        "checkout": ["checkout", "t", os.path.join(mnt, "out")],
        "export": ["export", "t", "-o", os.path.join(mnt, "t.velo")],
        "run": ["run", "t", "--at", at, "--", "sh", "-c", f"head -c 300000 /dev/urandom > {at}/x"],
    }
    failed: dict[str, object] = {}
    for verb, args in writes.items():
        res = _velo(env, *args)
        try:
            err = json.loads(res.stdout)
        except ValueError:
            err = {"stdout": res.stdout, "stderr": res.stderr}
        failed[verb] = (res.returncode, err.get("reason"), err.get("hint") or "", res.stderr)
    out["failed"] = failed
    out["left"] = sorted(n for n in os.listdir(mnt) if n not in ("store", "filler"))
    out["same"] = _state(env, store) == before
    reads = {
        "checkout": ["checkout", "t", os.path.join(base, "out")],
        "export": ["export", "t", "-o", os.path.join(base, "t.velo")],
        "fsck": ["fsck"],
        "gc": ["gc"],
    }
    out["reads"] = {v: _velo(env, *a).returncode for v, a in reads.items()}
    out["same after reads"] = _state(env, store) == before
    os.unlink(filler)
    out["again"] = {v: _velo(env, *writes[v]).returncode for v in ("ingest", "import", "run")}
    out["refs"] = sorted(r["name"] for r in json.loads(_velo(env, "refs").stdout))
    out["fsck after"] = _velo(env, "fsck").returncode
    return out


@pytest.mark.needs("overlay_root")
def test_every_writer_on_a_full_store_says_store_full_and_changes_nothing(shm_tmp: str) -> None:
    """Found by running each verb on a filled tmpfs: ingest said store-full with the hint
    "fix the source and retry" and the source file as its path (the source was fine: the store
    was full), as if the user's files were at fault. Now a store-side failure of an ingest wins
    over the source's and says what frees room."""
    import errno

    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_verbs_on_a_full_store, shm_tmp)
    assert out["setup"] == [0, 0, 0] and out["filler"] == errno.ENOSPC, out
    failed: dict[str, tuple[int, str, str, str]] = out["failed"]  # type: ignore[assignment]
    for verb, (rc, reason, hint, stderr) in failed.items():
        assert rc == 1 and reason == "store-full", (verb, failed[verb])
        assert "Traceback" not in stderr and "fix the source" not in hint, (verb, failed[verb])
    assert "refs --delete" in failed["ingest"][2], failed["ingest"]
    assert out["left"] == [], out  # no partial checkout or bundle on the full filesystem
    # (the session failed making its layers, before its command ran: no session is left)
    assert out["same"] and out["same after reads"], out
    assert out["reads"] == {"checkout": 0, "export": 0, "fsck": 0, "gc": 0}, out
    assert out["again"] == {"ingest": 0, "import": 0, "run": 0}, out
    assert out["refs"] == ["new", "t", "u"] and out["fsck after"] == 0, out
