"""`enter` driven through a pseudo-terminal: prompt, a command, Ctrl-C reaching only the session's
foreground command (the shell and the manager survive), exit, harvest, commit."""

from __future__ import annotations

import json
import os
import pty
import select
import time
import traceback

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, mode_params, new_store
from veloverlay import session


def _pty_session(base: str) -> dict[str, object]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    result_path = os.path.join(base, "result.json")
    pid, fd = pty.fork()
    if pid == 0:  # the terminal's session leader: runs `enter`
        code = 0
        try:
            os.environ["SHELL"] = "/bin/sh"
            os.environ.pop("ENV", None)
            res = session.enter(store, session.SessionOptions(refs=["t"], at=proj, grace=1.0))
            with open(result_path, "w") as f:
                json.dump(res.to_dict(), f)
        except BaseException:  # noqa: BLE001
            with open(result_path + ".err", "w") as f:
                f.write(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    transcript = bytearray()

    def expect(needle: bytes, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in transcript:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {needle!r}; got {bytes(transcript)!r}"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"terminal closed before {needle!r}: {bytes(transcript)!r}"
                transcript.extend(chunk)

    expect(b"(velo:t)")
    os.write(fd, b"sleep 30\n")
    time.sleep(0.5)
    t0 = time.monotonic()
    os.write(fd, b"\x03")
    os.write(fd, b"echo alive$((40+2)) $VELO_SESSION_REF\n")
    expect(b"alive42 t")
    interrupted_after = time.monotonic() - t0
    os.write(fd, f"printf pty > {proj}/ptyfile; exit\n".encode())
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline, f"enter did not finish: {bytes(transcript)!r}"
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                transcript.extend(os.read(fd, 4096))
            except OSError:
                pass
    os.close(fd)
    if os.path.exists(result_path + ".err"):
        with open(result_path + ".err") as f:
            raise AssertionError(f.read())
    with open(result_path) as f:
        res = json.load(f)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    with open(os.path.join(got, "ptyfile")) as f:
        data = f.read()
    return {
        "status": os.waitstatus_to_exitcode(status),
        "res": res,
        "ptyfile": data,
        "interrupted_after": interrupted_after,
        "transcript": bytes(transcript).decode(errors="replace"),
    }


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_enter_through_a_pty_with_ctrl_c(mode: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _pty_session, base)
    assert r["status"] == 0
    res = r["res"]
    assert isinstance(res, dict)
    assert res["exit_status"] == 0 and res["commit"], r["transcript"]
    assert r["ptyfile"] == "pty"
    assert isinstance(r["interrupted_after"], float) and r["interrupted_after"] < 10
