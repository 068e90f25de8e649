"""The store lock: `lock` in the store directory, locked shared by writers and by the verbs
that read objects, exclusively by gc (and, without waiting, by `fsck --repair` and
`remove-store`).

Linux gives a process waiting for an exclusive lock no priority over later shared lockers:
with readers and writers overlapping one another (a loop of `cat`, sessions starting all day),
gc waited for ever. A second file, `lock.gate`, makes the lock prefer gc: a verb that waits for
the store lock holds the gate shared while it does; gc takes the gate exclusively first and
keeps it until it holds the store lock. Verbs that come after gc began to wait queue behind
it, and gc waits only for those that held the lock already (for `timeout` seconds at most).

The locks are open-file-description locks (fcntl F_OFD_SETLK, `_libc.ofd_lock`), not flock:
an exclusive (write) one needs the file open for writing. The other users of a shared store
open both files read-only and take them shared, as before; with flock, which needs no write
access, any user who could read the store could also take either file exclusively and stop
its owner's every verb for as long as they liked. Like flock's, these locks belong to the
open file description: a forked child shares them, they go with its last descriptor (the
death of every process holding it), and closing another descriptor of the file does not drop
them. They do not exclude flock: a veloverlay older than this one, still running on the
store, is not waited for. The gate is made by `init` and by gc; a store without one (made by
an older version) is locked as before until its first gc. A process that holds the store lock
already (a verb nested in another, a forked worker of one) takes it again without the gate:
waiting there behind a gc that waits for this very process would never end."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from veloverlay import _libc, files, progress
from veloverlay.errors import Reason, VeloError
from veloverlay.store.access import open_nofollow, write_refusal

__all__ = ["GATE", "holders", "make_gate", "store_lock", "reader_lock"]

GATE = "lock.gate"

# The stores (dev, ino of the directory) this process holds the lock of, and how many times:
# inherited by a forked child along with the locks themselves.
_held: dict[tuple[int, int], int] = {}
_held_guard = threading.Lock()


def _removed(store_root: Path) -> VeloError:
    return VeloError(
        f"the store at {store_root} was removed while this command waited for its lock",
        reason=Reason.STORE_MISSING,
        hint="nothing was done; 'veloverlay init' makes a new store there",
        path=os.fspath(store_root),
    )


def _is_the_lock(fd: int, root_fd: int) -> bool:
    """Whether the locked file `fd` is still the store's `lock`: a lock file that was removed
    (by `remove-store`, or by hand) or replaced while this process waited for it locks nothing
    the next process will lock."""
    st = os.fstat(fd)
    try:
        now = os.stat("lock", dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


class _TimedOut(Exception):
    """The bounded wait for the gate or the store lock ended (see `store_lock`'s timeout)."""


def _lock(fd: int, op: int) -> None:
    """Lock `fd` as flock's `op` says (LOCK_SH or LOCK_EX, maybe | LOCK_NB), with an
    open-file-description lock (see the module docstring)."""
    _libc.ofd_lock(fd, write=bool(op & fcntl.LOCK_EX), wait=not op & fcntl.LOCK_NB)


def _alarm(_signum: int, _frame: object) -> None:
    raise _TimedOut


def _take(fd: int, op: int, deadline: float | None) -> None:
    """flock `fd` with `op`, waiting until `deadline` (time.monotonic()) at most: a caller
    whose deadline passes gets _TimedOut, and closes `fd` (whatever it holds goes with it).
    The main thread waits in the kernel (a SIGALRM ends the wait), so that it shows as a waiter
    in /proc/locks as an unbounded wait does; another thread, or a process that uses the alarm
    itself, asks again and again."""
    if deadline is None or op & fcntl.LOCK_NB:
        _lock(fd, op)
        return
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    ):  # the alarm is nobody else's
        left = deadline - time.monotonic()
        if left <= 0:
            try:
                _lock(fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _TimedOut from None
            return
        before = signal.signal(signal.SIGALRM, _alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, left)
            _lock(fd, op)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, before)
        return
    pause = 0.005
    while True:
        try:
            _lock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _TimedOut from None
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.1)


def _flock_store(
    store_root: Path, root_fd: int, flags: int, op: int, deadline: float | None = None
) -> int:
    """Open the store's lock file with `flags` and flock it with `op`; again when the file
    was removed or replaced meanwhile, so that every holder locks the same file. A store
    removed meanwhile (its directory is gone: no lock file can be made) is STORE_MISSING."""
    shown = store_root / "lock"
    for _ in range(100):
        try:
            with files.exact_modes():
                fd = open_nofollow("lock", flags, 0o644, dir_fd=root_fd, shown=shown)
        except FileNotFoundError:
            if os.fstat(root_fd).st_nlink == 0:
                raise _removed(store_root) from None
            raise
        try:
            _take(fd, op, deadline)
        except BaseException:
            os.close(fd)
            raise
        if _is_the_lock(fd, root_fd):
            return fd
        os.close(fd)
        if os.fstat(root_fd).st_nlink == 0:
            raise _removed(store_root)
    raise VeloError(
        f"the lock file of the store at {store_root} keeps being replaced",
        reason=Reason.LOCKED,
        hint="some other program removes or replaces it: stop it and retry",
        path=os.fspath(shown),
    )


def _open_gate(store_root: Path, root_fd: int, *, create: bool) -> int:
    """A descriptor of the gate (to write, for gc, whose lock on it is a write lock; read-only
    otherwise), -1 where there is none this process may make or write."""
    flags = os.O_RDWR | os.O_CREAT if create else os.O_RDONLY
    try:
        with files.exact_modes():
            return open_nofollow(GATE, flags, 0o644, dir_fd=root_fd, shown=store_root / GATE)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS):
            return -1
        raise


def _lockers(st: os.stat_result) -> set[int]:
    """The processes whose open descriptors hold a lock on the file `st` (each one's
    /proc/PID/fdinfo names the locks its descriptor holds: /proc/locks says -1 for the pid of
    an open-file-description lock). Only those this process may look into."""
    found: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                there = os.stat(f"/proc/{pid}/fd/{fd}")
                if (there.st_dev, there.st_ino) != (st.st_dev, st.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if any(line.startswith("lock:") for line in f):
                        found.add(int(pid))
            except OSError:
                continue
    return found


def holders(lock: Path) -> list[str]:
    """Who holds a lock on the file `lock`, as `pid N (its command line)`."""
    try:
        st = os.stat(lock, follow_symlinks=False)
        with open("/proc/locks") as f:
            lines = [line.split() for line in f if "->" not in line]
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = {int(w[4]) for w in lines if len(w) > 5 and w[5] == dev and w[4].isdigit()}
    if any(len(w) > 5 and w[5] == dev and not w[4].isdigit() for w in lines):
        pids |= _lockers(st)
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read(4096).rstrip(b"\0").split(b"\0")
        except OSError:
            argv = []
        shown = " ".join(os.fsdecode(a) for a in argv)[:120]
        out.append(f"pid {pid} ({shown})" if shown else f"pid {pid}")
    return out


def _flock_waiting(
    store_root: Path,
    root_fd: int,
    flags: int,
    op: int,
    waiting: Callable[[str], None] | None,
    deadline: float | None,
    timeout: float | None,
) -> int:
    """`_flock_store`; when it would wait, `waiting` is told who it waits for first."""
    waiting = waiting or (progress.notice if progress.has_notice() else None)
    if waiting is None or op & fcntl.LOCK_NB:
        return _flock_store(store_root, root_fd, flags, op, deadline)
    try:
        return _flock_store(store_root, root_fd, flags, op | fcntl.LOCK_NB)
    except BlockingIOError:
        who = holders(store_root / "lock")
        waiting(
            f"waiting for the store lock of {store_root}"
            + (f", held by {', '.join(who)}" if who else "")
            + (" (it ends when they do)" if timeout is None else f" (for {timeout:g} s at most)")
        )
    return _flock_store(store_root, root_fd, flags, op, deadline)


def _pass_gate(store_root: Path, gate_fd: int, exclusive: bool, deadline: float | None) -> None:
    """Take the gate (exclusively for gc); a verb that finds gc there says it waits behind it."""
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    if exclusive or not progress.has_notice():
        _take(gate_fd, op, deadline)
        return
    try:
        _lock(gate_fd, op | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        gc = holders(store_root / GATE)
        who = holders(store_root / "lock")
        progress.notice(
            f"waiting for the store lock of {store_root} behind {', '.join(gc) or 'gc'}"
            + (f", which waits for {', '.join(who)}" if who else "")
        )
    _take(gate_fd, op, deadline)


def make_gate(root_fd: int) -> None:
    """Make the gate in the store directory `root_fd` where it is missing and this process may
    (another user's store, a read-only filesystem: it is left as it is)."""
    try:
        with files.exact_modes():
            os.close(open_nofollow(GATE, os.O_RDONLY | os.O_CREAT, 0o644, dir_fd=root_fd))
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise


@contextlib.contextmanager
def _locked(
    store_root: Path,
    root_fd: int,
    flags: int,
    op: int,
    *,
    gate: bool,
    exclusive: bool,
    waiting: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    deadline = None if timeout is None else time.monotonic() + timeout
    st = os.fstat(root_fd)
    key = (st.st_dev, st.st_ino)
    with _held_guard:
        nested = _held.get(key, 0) > 0
    gate_fd = -1
    if gate and not nested:
        gate_fd = _open_gate(store_root, root_fd, create=exclusive)
    try:
        if gate_fd >= 0:
            _pass_gate(store_root, gate_fd, exclusive, deadline)
        fd = _flock_waiting(store_root, root_fd, flags, op, waiting, deadline, timeout)
    finally:
        if gate_fd >= 0:
            os.close(gate_fd)  # held until the store lock is: who comes later waits behind
    with _held_guard:
        _held[key] = _held.get(key, 0) + 1
    try:
        yield
    finally:
        with _held_guard:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        os.close(fd)


@contextlib.contextmanager
def store_lock(
    store_root: Path,
    root_fd: int,
    *,
    exclusive: bool = False,
    wait: bool = True,
    waiting: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> Iterator[None]:
    """The store lock (`lock` in the store directory `root_fd`): shared for writers, exclusive
    for gc. Waiting, it goes through the gate (see the module docstring); `waiting` is told
    whom it waits for, when it does. `timeout`: waiting (the gate held, for gc, so every verb
    that comes meanwhile queues behind it) ends after that many seconds with `locked`, and
    nothing held."""
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    if not wait:
        op |= fcntl.LOCK_NB
    flags = os.O_RDWR | os.O_CREAT
    ctx = _locked(
        store_root,
        root_fd,
        flags,
        op,
        gate=wait,
        exclusive=exclusive,
        waiting=waiting,
        timeout=timeout,
    )
    try:
        ctx.__enter__()
    except _TimedOut:
        who = holders(store_root / "lock") or holders(store_root / GATE)
        raise VeloError(
            f"gave up waiting for the store lock of {store_root} after {timeout:g} s"
            + (f": held by {', '.join(who)}" if who else ""),
            reason=Reason.LOCKED,
            hint="nothing was done; end them (a 'veloverlay cat' into a pager holds it until "
            "the pager is closed) and retry, or give --timeout more seconds",
            path=os.fspath(store_root / "lock"),
        ) from None
    except BlockingIOError:
        raise VeloError(
            "the store is locked by another veloverlay process",
            reason=Reason.LOCKED,
            hint="wait for it (gc holds the store exclusively) and retry",
        ) from None
    except OSError as exc:
        refusal = write_refusal(store_root) if exc.errno in (errno.EROFS, errno.EACCES) else None
        if refusal is not None:
            raise refusal from None
        raise
    with contextlib.ExitStack() as stack:
        stack.push(ctx)
        yield


@contextlib.contextmanager
def reader_lock(store_root: Path, root_fd: int) -> Iterator[None]:
    """The store lock (`lock` in the store directory `root_fd`) taken shared by a verb that
    reads objects after resolving a version (checkout, export, cat, push): gc, which takes it
    exclusively, waits until the reader is done, instead of deleting the objects of a version
    the reader has already resolved. Opened read-only (a read lock needs no write access): another
    user of a shared store and a store on a read-only filesystem read as before; a store with
    no lock file that this process may not create one in has no gc running to wait for."""
    flags = os.O_RDONLY | os.O_CREAT
    try:
        ctx = _locked(store_root, root_fd, flags, fcntl.LOCK_SH, gate=True, exclusive=False)
        ctx.__enter__()
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.push(ctx)
        yield
