"""The `veloverlay` command line as a user runs it, for every test directory: `velo` (one run),
`ok` and `data` (its output, checked), and `live_session` (a `run` whose command waits while
the test looks at, or works beside, the running session: the CLI twin of
tests/session/_util.py's `while_running`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

# the checkout these tests belong to, first on the path of every command they run
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VELO = [sys.executable, "-m", "veloverlay"]


def velo_env(
    store: str | os.PathLike[str] | None,
    env: dict[str, str] | None = None,
    fault: str | None = None,
) -> dict[str, str]:
    """The environment of a command of `store` (None: none named; VELO_STORE is removed), with
    the crash point `fault` (none inherited), and `env` over all."""
    path = os.environ.get("PYTHONPATH")
    e = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": TOP + (os.pathsep + path if path else "")}
    e.pop("VELO_STORE", None)
    e.pop("VELO_INTERNAL__TEST_FAULT", None)
    if store is not None:
        e["VELO_STORE"] = os.fspath(store)
    if fault:
        e["VELO_INTERNAL__TEST_FAULT"] = fault
    return {**e, **(env or {})}


def velo(
    store: str | os.PathLike[str] | None,
    *args: str,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    fault: str | None = None,
    cwd: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[bytes]:
    """`veloverlay ARGS` of `store` (in `cwd`, with the crash point `fault`), run to its end
    (bounded by `timeout`), reading `input`."""
    return subprocess.run(
        [*VELO, *args],
        env=velo_env(store, env, fault),
        cwd=cwd,
        capture_output=True,
        input=input,
        timeout=timeout,
    )


def velo_text(
    store: str | os.PathLike[str] | None,
    *args: str,
    env: dict[str, str] | None = None,
    fault: str | None = None,
    cwd: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """`velo` with its output as text, reading nothing (stdin: /dev/null)."""
    return subprocess.run(
        [*VELO, *args],
        env=velo_env(store, env, fault),
        cwd=cwd,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=timeout,
    )


def ok(p: subprocess.CompletedProcess[bytes]) -> str:
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return p.stdout.decode()


def data(p: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(ok(p))


def wait_running(store: str) -> str:
    """The id of the one running session, once it runs (bounded: 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = [s for s in data(velo(store, "sessions", "--json")) if s["state"] == "running"]
        if running:
            return str(running[0]["id"])
        time.sleep(0.05)
    raise AssertionError("no session started")


class LiveSession:
    """A `veloverlay run` started by `live_session`: its process, and once it ended (after the
    `with`), what it wrote."""

    def __init__(self, store: str, proc: subprocess.Popen[bytes], ready: str) -> None:
        self.store, self.proc, self.ready = store, proc, ready
        self.out = self.err = b""

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def sid(self) -> str:
        """The id of the one running session (this one: the test starts no other)."""
        return wait_running(self.store)

    def wait_for(self, path: str, timeout: float = 60) -> None:
        """Until `path` exists (the command made it), while `run` still runs."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            assert self.proc.poll() is None, f"run ended ({self.proc.returncode}) before {path}"
            assert time.monotonic() < deadline, f"the command never made {path}"
            time.sleep(0.02)


@contextmanager
def live_session(
    store: str | os.PathLike[str],
    *args: str,
    command: str = "true",
    then: str = "",
    base: str,
    wrap: Sequence[str] = (),
    env: dict[str, str] | None = None,
    **popen: Any,
) -> Iterator[LiveSession]:
    """`veloverlay ARGS -- sh -c SCRIPT` (ARGS: `run REFS ...`): SCRIPT runs `command`, then
    waits for a go file, then runs `then`. Yields once `command` succeeded (the session is
    live), with the session's files and process as they are then. At the end of the `with`,
    whatever happened in it (a failed assert too), the command is let go, and `run` is waited
    for (killed after 120 s) and reaped; its output is then in `.out` and `.err`. `base`: a
    directory the command can reach, for the ready and go files; `wrap`: a command `run` is
    started under (`unshare ...`); `popen`: more Popen arguments (start_new_session)."""
    sync = tempfile.mkdtemp(prefix="live-", dir=base)
    ready, go = os.path.join(sync, "ready"), os.path.join(sync, "go")
    script = f"{command} && touch {ready} && while [ ! -e {go} ]; do sleep 0.05; done"
    if then:
        script += f" && {then}"
    proc = subprocess.Popen(
        [*wrap, *VELO, *args, "--", "sh", "-c", script],
        env=velo_env(store, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )
    live = LiveSession(os.fspath(store), proc, ready)
    try:
        live.wait_for(ready)
        yield live
    finally:
        open(go, "w").close()
        try:
            live.out, live.err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                live.out, live.err = proc.communicate()
