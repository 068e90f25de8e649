"""The session verbs through the real command line (`python -m veloverlay run …`), as root with
overlay: what a user sees at the start and end of a session, and what scripts read."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.e2e.test_cli import data, ok, velo
from tests.helpers.trees import make_tree

pytestmark = pytest.mark.needs("root", "overlay_root")


@pytest.fixture
def store(shm_tmp: str) -> str:
    return os.path.join(shm_tmp, "store")


@pytest.fixture
def proj(store: str, shm_tmp: str) -> str:
    src = os.path.join(shm_tmp, "proj")
    make_tree(src, {"README": b"hello\n", "src/main.c": b"int main(){}\n", "old.txt": b"x\n"})
    ok(velo(store, "ingest", src, "-n", "proj", "--adopt"))
    return src


def test_run_json_report_is_not_mixed_with_the_command_output(store: str, proj: str) -> None:
    """`run --json`: stdout is the report alone; the command's stdout goes to stderr (15.7)."""
    p = velo(
        store,
        "run",
        "--json",
        "proj",
        "--",
        "sh",
        "-c",
        f"echo from-the-command; echo x > {proj}/new",
    )
    report = json.loads(p.stdout)  # the whole of stdout parses
    assert p.returncode == 0, p.stderr
    assert report["exit_status"] == 0 and report["commit"] and report["changed"] >= 1
    assert b"from-the-command" in p.stderr
    # the exit status still passes through
    p = velo(store, "run", "proj", "--json", "--", "sh", "-c", "echo out; exit 3")
    assert p.returncode == 3 and json.loads(p.stdout)["exit_status"] == 3


def test_status_lists_only_running_or_unharvested_sessions(store: str, proj: str) -> None:
    ok(velo(store, "run", "proj", "--", "true"))
    assert [s["state"] for s in data(velo(store, "sessions", "--json"))] == ["harvested"]
    assert data(velo(store, "status", "--json"))["sessions"] == []
    assert "session" not in ok(velo(store, "status"))


def test_doctor_names_the_backend_a_session_gets(shm_tmp: str) -> None:
    """One rule (session/select.py): on a filesystem without user xattrs a session takes the
    shim, and doctor says so (it used to say overlay there)."""
    mnt = os.path.join(shm_tmp, "ramfs")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "ramfs", "none", mnt], check=True)
    try:
        store = os.path.join(mnt, "store")
        src = os.path.join(shm_tmp, "src")
        make_tree(src, {"a.txt": b"a\n"})
        ok(velo(store, "ingest", src, "-n", "r"))
        report = data(velo(store, "doctor", "--json"))
        assert report["store_xattrs"]["ok"] is False
        at = os.path.join(shm_tmp, "at")
        p = velo(store, "run", "r", "--at", at, "--json", "--", "true")
        assert p.returncode == 0, p.stderr
        assert report["chosen"]["backend"] == json.loads(p.stdout)["backend"] == "shim"
        assert report["features"]["store_xattrs"]["matters"] == "for overlay"
        # and where the store holds xattrs, both say overlay
        good = os.path.join(shm_tmp, "store2")
        ok(velo(good, "ingest", src, "-n", "r"))
        p = velo(good, "run", "r", "--at", os.path.join(shm_tmp, "at2"), "--json", "--", "true")
        chosen = data(velo(good, "doctor", "--json"))["chosen"]["backend"]
        assert chosen == json.loads(p.stdout)["backend"] == "overlay"
    finally:
        subprocess.run(["umount", "-l", mnt], check=True)


def test_doctor_explains_each_feature(store: str) -> None:
    out = ok(velo(store, "doctor"))
    report = data(velo(store, "doctor", "--json"))
    for name, f in report["features"].items():
        assert f["purpose"] and f["matters"], name
        assert name in out
