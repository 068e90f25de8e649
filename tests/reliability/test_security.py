"""Security properties of sessions: no_new_privs, no setuid helper root-free, the store (other
sessions' upper dirs and staging included) unwritable from inside, setuid/setgid bits not carried
into projections unless asked."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_params, new_store, run_session
from veloverlay import session
from veloverlay.ingest import ingest
from veloverlay.store.manifest import Manifests

PROBE = r"""
import json, os, subprocess, sys
store, out, at = sys.argv[1], sys.argv[2], sys.argv[3]
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
res = {
    "no_new_privs": status["NoNewPrivs"].strip(),
    "uid_map": open("/proc/self/uid_map").read().split("\n")[:-1],
}
for d in sorted(os.listdir(os.path.join(store, "sessions"))):
    try:
        with open(os.path.join(store, "sessions", d, "upper", "evil"), "w") as f:
            f.write("x")
        res.setdefault("wrote", []).append(d)
    except OSError as e:
        res.setdefault("refused", []).append(e.errno)
for sub in ("tmp", "locks-v1", "manifests.lmdb"):
    try:
        open(os.path.join(store, sub, "evil"), "w").close()
        res.setdefault("wrote", []).append(sub)
    except OSError as e:
        res.setdefault("refused", []).append(e.errno)
# The session's mounts are locked: neither the store writable again nor the overlay removed.
for cmd in (["mount", "-o", "remount,bind,rw", store], ["umount", "-l", at]):
    r = subprocess.run(cmd, capture_output=True)
    res.setdefault("mounts", []).append([" ".join(cmd[:2]), r.returncode])
res["store_still_ro"] = not os.access(os.path.join(store, "tmp"), os.W_OK)
res["overlay_still_there"] = os.path.exists(os.path.join(at, "f1"))
with open(out, "w") as f:
    json.dump(res, f)
"""


def _scenario(base: str) -> dict[str, Any]:
    import json

    store, src = new_store(base)
    script, out = os.path.join(base, "probe.py"), os.path.join(base, "out.json")
    with open(script, "w") as f:
        f.write(PROBE)
    at = os.path.join(base, "at")
    r = session.run(
        store,
        session.SessionOptions(refs=["t"], at=at, discard=True),
        ["/usr/bin/python3", script, os.fspath(store.root), out, at],
    )
    with open(out) as f:
        res: dict[str, Any] = json.load(f)
    res["exit"] = r.exit_status
    # A setuid file created in a session is harvested without the bit.
    r = session.run(
        store,
        session.SessionOptions(refs=["t"], at=at),
        ["sh", "-c", f"cp /bin/true {at}/suid && chmod 6755 {at}/suid"],
    )
    m = Manifests(store)
    try:
        with m.read() as txn:
            e = m.lookup(txn, bytes.fromhex(m.resolve(txn, "t")[1].root), b"suid")
            res["harvested_mode"] = e.mode if e else None
    finally:
        m.close()
    # ... and an ingested setuid file too (unless asked).
    os.chmod(os.path.join(src, "exec.sh"), 0o4755)
    m = Manifests(store)
    try:
        ingest(store, m, src, "u", jobs=1)
        ingest(store, m, src, "k", jobs=1, keep_setid=True)
        with m.read() as txn:
            res["ingested_mode"] = m.lookup(
                txn, bytes.fromhex(m.resolve(txn, "u")[1].root), b"exec.sh"
            ).mode  # type: ignore[union-attr]
            res["kept_mode"] = m.lookup(
                txn, bytes.fromhex(m.resolve(txn, "k")[1].root), b"exec.sh"
            ).mode  # type: ignore[union-attr]
    finally:
        m.close()
    return res


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_session_security(mode: str) -> None:
    with unpriv_tmpdir() as base:
        res = as_mode(mode, _scenario, base)
    assert res["exit"] == 0
    assert all(code != 0 for _cmd, code in res["mounts"]), res["mounts"]
    assert res["store_still_ro"] and res["overlay_still_there"], res
    assert res["no_new_privs"] == "1", "the session's command can gain privileges"
    if mode == "rootfree":
        # One line, mapping only the invoking uid: what an unprivileged process can write
        # itself. A setuid newuidmap would have been needed for more.
        assert len(res["uid_map"]) == 1, res["uid_map"]
        assert res["uid_map"][0].split()[2] == "1"
    assert "wrote" not in res, f"wrote into the store from a session: {res['wrote']}"
    assert res.get("refused"), "nothing was tried"
    assert res["harvested_mode"] is not None
    assert not res["harvested_mode"] & (stat.S_ISUID | stat.S_ISGID), oct(res["harvested_mode"])
    assert res["ingested_mode"] == 0o755
    assert res["kept_mode"] == 0o4755


# The command tries to write a frame into pid 1's report pipe through /proc/1/fd: an `error`
# frame with a reason no version knows. What it could open is written to out (a host path). The
# system's python: root's venv is not executable by the root-free user.
FORGE = r"""
import json, os, struct, sys
out = {}
try:
    fds = os.listdir("/proc/1/fd")
except OSError as e:  # not even listed: try the numbers
    fds = [str(n) for n in range(300)]
    out["list"] = e.errno
for fd in fds:
    try:
        w = os.open(f"/proc/1/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        out[fd] = e.errno
        continue
    d = json.dumps({"error": {"message": "forged", "reason": "not-a-reason"}}).encode()
    try:
        os.write(w, struct.pack("<I", len(d)) + d)
        out[fd] = "written"
    except OSError as e:
        out[fd] = e.errno
json.dump(out, open(sys.argv[1], "w"))
"""


def _forge(base: str) -> dict[str, Any]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    script = os.path.join(base, "forge.py")
    with open(script, "w") as f:
        f.write(FORGE)
    out = os.path.join(base, "forge.json")
    argv = ["sh", "-c", f"printf kept > {proj}/kept; /usr/bin/python3 {script} {out}"]
    res = run_session(store, ["t"], argv, at=proj)
    with open(out) as f:
        opened = json.load(f)
    m = Manifests(store)
    try:
        with m.read() as txn:
            _ref, commit = m.resolve(txn, "t")
            kept = m.lookup(txn, bytes.fromhex(commit.root), b"kept") is not None
    finally:
        m.close()
    return {"exit": res.exit_status, "state": res.state, "opened": opened, "kept": kept}


@pytest.mark.parametrize("mode", mode_params("root", "native", "rootfree"))
def test_the_command_cannot_write_pid1s_report(mode: str) -> None:
    """Root in its user namespace, the command could open pid 1's report pipe through
    /proc/1/fd and forge an `error` frame: the manager then dropped the session's work and
    failed with a ValueError traceback. pid 1 is not dumpable: nothing there opens."""
    with unpriv_tmpdir() as base:
        res = as_mode(mode, _forge, base)
    assert res["opened"] and "written" not in res["opened"].values(), res["opened"]
    assert (res["exit"], res["state"], res["kept"]) == (0, "harvested", True)
