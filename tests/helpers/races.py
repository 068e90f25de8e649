"""Races made deterministic: another user's move lands exactly between two steps of root's;
a verb starts at a chosen point of another one's (`start_and_settle`).

`swap_at_mkdir` wraps os.mkdir (for one test, by pytest's monkeypatch) so that a callback runs
once, right before or right after the real mkdir of one path, whether that path is made by its
name from `/` or by its last component relative to a directory descriptor. A forked child (a
session manager) inherits the wrapper.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers.cli import VELO, velo_env

__all__ = ["swap_at_mkdir", "start_and_settle", "settle", "verb_at_first_call", "GC_KEEP_1"]

# a gc that drops every version but the newest at once
GC_KEEP_1 = ["gc", "--keep", "1", "--grace", "0"]


def swap_at_mkdir(
    monkeypatch: pytest.MonkeyPatch, made: str, swap: Callable[[], None], *, before: bool
) -> None:
    """Run `swap` once, right before or right after the real mkdir of the absolute path
    `made` (by path, or by name relative to a directory descriptor)."""
    real_mkdir = os.mkdir
    fired: list[bool] = []

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        where = os.fsdecode(path)
        if dir_fd is not None:
            where = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), where)
        hit = not fired and where == made
        if hit:
            fired.append(True)
        if hit and before:
            swap()
        real_mkdir(path, mode, dir_fd=dir_fd)
        if hit and not before:
            swap()

    monkeypatch.setattr(os, "mkdir", mkdir)


# fcntl(2) and flock(2): the calls a process waits for a lock in
_LOCK_CALLS = {"x86_64": ("72", "73"), "aarch64": ("25", "32")}.get(os.uname().machine, ())


def _blocked_on(pid: int, st: os.stat_result) -> bool:
    """Whether a thread of `pid` is in fcntl or flock on a descriptor of the file `st`: /proc/locks
    gives -1 for the pid of a waiter for an open-file-description lock."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                call = f.read().split()
            if len(call) < 2 or call[0] not in _LOCK_CALLS:
                continue
            there = os.stat(f"/proc/{pid}/fd/{int(call[1], 16)}")
        except (OSError, ValueError):
            continue
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def _waiting_on(lock: str, pid: int | None = None) -> bool:
    """Whether some process (the process `pid`, when given) waits for a lock on the file `lock`
    (a `->` line of /proc/locks); False where there is no such file."""
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return False
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        waits = [line.split() for line in f if "->" in line]
    if pid is not None and any(dev in w and "-1" in w for w in waits) and _blocked_on(pid, st):
        return True
    return any(dev in w and (pid is None or str(pid) in w) for w in waits)


def start_and_settle(store: str, args: list[str]) -> subprocess.Popen[str]:
    """`veloverlay --json ARGS` on `store`, returned once it has finished or waits for the
    store lock: a verb started at a chosen point of another's, with no sleep deciding."""
    proc = subprocess.Popen(
        [*VELO, "--json", *args],
        env=velo_env(store),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return settle(proc, os.path.join(store, "lock"))


def verb_at_first_call(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, store: str, args: list[str]
) -> list[subprocess.Popen[str]]:
    """Wrap `owner.name` (a function of a module, or a class's method) so that its first call
    starts `veloverlay --json ARGS` on `store` (start_and_settle) before it goes on. Returns the
    list the started verb goes into (still empty: never called)."""
    procs: list[subprocess.Popen[str]] = []
    real: Callable[..., Any] = getattr(owner, name)

    def first_call_starts_the_verb(*a: Any, **kw: Any) -> Any:
        if not procs:
            procs.append(start_and_settle(store, args))
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, first_call_starts_the_verb)
    return procs


def settle(
    proc: subprocess.Popen[Any], lock: str, *more: str, own: bool = False
) -> subprocess.Popen[Any]:
    """`proc`, once it has finished or waits for a lock on the file `lock` (or one of `more`)
    (/proc/locks); with `own`, once `proc` itself waits (not some other process)."""
    pid = proc.pid if own else None
    deadline = time.monotonic() + 60
    while proc.poll() is None and not any(_waiting_on(f, pid) for f in (lock, *more)):
        assert time.monotonic() < deadline, "the writer neither finished nor waited"
        time.sleep(0.01)
    return proc
