"""`veloverlay push` / `pull` as a user runs them: the README's two-machine workflow (two stores),
and the error lines for wrong credentials and an untrusted certificate."""

from __future__ import annotations

import base64
import json
import os
import re

import pytest

from tests.helpers.cli import velo
from tests.helpers.trees import assert_same_tree, make_tree
from tests.remote.conftest import USER, Registry


def test_two_machines(logged_in: Registry, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {f"lib/m{i}.py": f"x = {i}\n".encode() for i in range(50)})
    here, there = os.path.join(shm_tmp, "here"), os.path.join(shm_tmp, "there")
    remote = logged_in.remote(f"cli/env-{os.getpid()}")
    ca = ["--ca-cert", str(logged_in.ca)]
    assert velo(here, "ingest", src, "--name", "py311").returncode == 0
    p = velo(here, "push", "py311", remote, *ca, "--tls-verify=true", "--json")
    assert p.returncode == 0, p.stderr.decode()
    [pushed] = json.loads(p.stdout)
    assert pushed["remote"] == f"{remote}:py311"
    p = velo(there, "pull", f"{remote}:py311", *ca, "--json")
    assert p.returncode == 0, p.stderr.decode()
    got = json.loads(p.stdout)
    assert got["ref"] == "py311" and got["digest"] == pushed["digest"]
    out = os.path.join(shm_tmp, "out")
    assert velo(there, "checkout", "py311", out).returncode == 0
    assert_same_tree(src, out)
    assert b"pull" not in p.stderr  # --json: no progress bar
    # without --json, the pull draws its bar: bytes against the total, rate and ETA
    forced = {"VELO_INTERNAL__TEST_PROGRESS": "1"}
    third = os.path.join(shm_tmp, "third")
    p = velo(third, "pull", f"{remote}:py311", *ca, env=forced)
    assert p.returncode == 0, p.stderr.decode()
    line = [x for x in p.stderr.decode().replace("\r", "\n").splitlines() if "pull" in x][-1]
    assert re.search(r"\d B / \d+ B|KiB / ", line) and "/s" in line and "ETA" in line, line
    # doctor reports the registry this store pulled from, and how it authenticates
    p = velo(there, "doctor", "--json", env={"SSL_CERT_FILE": str(logged_in.ca)})
    [r] = json.loads(p.stdout)["remotes"]
    assert r["registry"] == logged_in.host and r["ok"] and r["auth"] == "basic", r
    assert r["user"] == f"{USER} (from {logged_in.auth_file})"
    p = velo(there, "doctor", "--json")  # without the test CA: unreachable, and why
    [r] = json.loads(p.stdout)["remotes"]
    assert not r["ok"] and "remote-tls" in r["reason"]


def test_errors_say_why(registry: Registry, shm_tmp: str) -> None:
    store = os.path.join(shm_tmp, "s")
    auth = os.path.join(shm_tmp, "auth.json")
    with open(auth, "w") as f:
        bad = base64.b64encode(f"{USER}:nope".encode()).decode()
        json.dump({"auths": {registry.host: {"auth": bad}}}, f)
    remote = registry.remote("cli/x", "t")
    p = velo(store, "pull", remote, "--ca-cert", str(registry.ca), "--authfile", auth, "--json")
    err = p.stderr.decode()
    assert p.returncode == 1 and "error:" in err and "reason: remote-auth" in err, err
    assert json.loads(p.stdout)["reason"] == "remote-auth"
    assert "nope" not in err and "nope" not in p.stdout.decode()
    p = velo(
        store, "pull", remote, "--authfile", auth, "--json", env={"SSL_CERT_FILE": "/dev/null"}
    )
    err = p.stderr.decode()
    assert p.returncode == 1 and "reason: remote-tls" in err and "hint:" in err, err


@pytest.mark.needs("root", "overlay_root")
def test_run_of_a_remote_ref_pulls_it_first(logged_in: Registry, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {f"lib/m{i}.py": f"x = {i}\n".encode() for i in range(20)})
    here, there = os.path.join(shm_tmp, "here"), os.path.join(shm_tmp, "there")
    remote = logged_in.remote(f"cli/run-{os.getpid()}", "v1")
    assert velo(here, "ingest", src, "--name", "app").returncode == 0
    assert velo(here, "push", "app", remote, "--ca-cert", str(logged_in.ca)).returncode == 0
    assert velo(there, "init").returncode == 0
    at = os.path.join(shm_tmp, "at")
    env = {"SSL_CERT_FILE": str(logged_in.ca)}  # the session's pull trusts the system CAs
    p = velo(there, "run", "--at", at, remote, "--", "cat", f"{at}/lib/m7.py", env=env)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == b"x = 7\n"
    out = os.path.join(shm_tmp, "out")
    assert velo(there, "checkout", "app", out).returncode == 0
    assert_same_tree(src, out)
