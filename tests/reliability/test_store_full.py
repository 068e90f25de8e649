"""A store whose filesystem fills up during a session (issue 14, item 4): the session's command
meets ENOSPC like any program, and veloverlay says `store-full` (the docs' promise), never a
raw `os-error`; nothing committed is lost, and the session can be harvested once there is room."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _in_small_tmpfs(base: str) -> list[tuple[int, str, str]]:
    from veloverlay import _libc, mount

    _libc.unshare(_libc.CLONE_NEWNS)
    mount.make_rprivate("/")
    mnt = os.path.join(base, "mnt")
    mount.mount_tmpfs(mnt, "size=3m")
    src = os.path.join(mnt, "src")
    os.makedirs(src)
    with open(os.path.join(src, "a"), "w") as f:
        f.write("hi\n")
    env = {**os.environ, "VELO_STORE": os.path.join(mnt, "store"), "NO_COLOR": "1"}
    out = []
    for args in (
        ["ingest", src, "--name", "t"],
        [
            "run",
            "t",
            "--at",
            os.path.join(base, "at"),
            "--",
            "sh",
            "-c",
            f"head -c 4000000 /dev/zero > {base}/at/big; echo x > {base}/at/small",
        ],
        ["refs"],
    ):
        p = subprocess.run(
            [sys.executable, "-m", "veloverlay", "--json", *args],
            env=env,
            capture_output=True,
            text=True,
        )
        out.append((p.returncode, p.stdout, p.stderr))
    return out


@pytest.mark.needs("overlay_root")
def test_a_full_store_during_a_session_is_store_full(shm_tmp: str) -> None:
    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_in_small_tmpfs, shm_tmp)
    assert out[0][0] == 0, out[0]
    rc, _stdout, stderr = out[1]
    assert "reason: store-full" in stderr, stderr
    assert "os-error" not in stderr and "Traceback" not in stderr, stderr
    assert out[2][0] == 0 and '"name": "t"' in out[2][1], out[2]
