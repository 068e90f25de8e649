"""Who can still write a session's overlay once its own processes are gone.

A session's upper dir is harvested only when nothing can write it any more. Its pid namespace
ends with pid 1, but the overlay's superblock lives on while any process elsewhere holds:

* a mount namespace with a copy of the overlay (nsenter -m without --pid, unshare -m or a
  container started while it was mounted);
* an open file, a cwd or a root on it (a path opened through /proc/PID/root, an fd passed out
  over a unix socket), even after every mount of it is gone (a detached mount).

`holders` finds both through /proc: the first by the overlay's upper dir in each mount
namespace's mountinfo, the second by each open file's mount (`mnt_id` in fdinfo) looked up in
its process's mountinfo, else in every namespace's (mount ids are unique across namespaces: a
file opened through /proc/PID/root of a process elsewhere is on another namespace's mount, and a
mount made after its namespace's table was read is found by reading them again). A file on an
overlay whose mount is in no mountinfo (detached) cannot be told apart from this session's: it
counts as a holder (the harvest waits rather than lose writes). Limits: processes of other
users are invisible to a root-free manager, and an fd in flight in a unix socket message belongs
to no process.

A shim session's tree is a plain directory, which nothing can seal: `tree_writers` finds the
processes that hold one of its files open for writing (or mapped shared and writable), whose
writes after the end-of-session stat-diff would go to a file the session then removes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from veloverlay import _libc, mountinfo
from veloverlay.errors import VeloError
from veloverlay.mountinfo import MountEntry

__all__ = ["holders", "namespaces_holding", "tree_writers", "ask_again"]

_LINKS = ("cwd", "root")


def holders(is_ours: Callable[[MountEntry], bool]) -> list[int]:
    """Pids that hold the overlay `is_ours` picks (other than this process): see the module."""
    me = os.getpid()
    tables = _Mounts()
    found: list[int] = []
    for name, ns in tables.procs:
        if int(name) == me:
            continue
        try:
            by_id = tables.by_ns[ns]
            if any(is_ours(e) for e in by_id.values()) and not _own_namespace(ns):
                found.append(int(name))  # a copy of the overlay in another mount namespace
            elif _holds_file(name, by_id, is_ours, tables):
                found.append(int(name))
        except OSError:
            continue  # gone, or not ours to read
    return found


class _Mounts:
    """The mounts of each mount namespace (`_scan`), and a mount looked up by id in every
    namespace. Mount ids are unique across namespaces, so a file on a mount its process's table
    does not show is still told apart from this session's overlay: one opened through
    /proc/PID/root of a process elsewhere (another session's tree), or one on a mount made after
    the table was read (the overlay another session's namespace child mounts and pins while the
    scan runs: seen as a holder by every `harvest --resume` and seal check that raced a
    session's start)."""

    def __init__(self) -> None:
        self.by_ns, self.procs = _scan()
        self.every: dict[int, MountEntry] | None = None
        self.nowhere: set[int] = set()  # ids found in no namespace since they were first seen

    def anywhere(self, mnt: int) -> MountEntry | None:
        """Mount `mnt` in whatever namespace shows it; None: in none this process can read
        (detached, or in a namespace of processes it may not read). Every namespace is read
        again when an id is not found, once per id: the tables may predate the mount."""
        if self.every is not None and mnt in self.every:
            return self.every[mnt]
        if mnt in self.nowhere:
            return None
        self.every = {i: e for table in _scan()[0].values() for i, e in table.items()}
        if mnt not in self.every:
            self.nowhere.add(mnt)
        return self.every.get(mnt)


def _scan() -> tuple[dict[int, dict[int, MountEntry]], list[tuple[str, int]]]:
    """(mount namespace -> its mounts by id, [(pid, its mount namespace)]) of every process this
    process may read. A process's mountinfo shows only the mounts under its root: a namespace's
    table is the union of its processes' tables, read once per distinct root (the root's mount
    and inode). Read from its first process alone, a namespace whose first process had chrooted
    hid the mounts outside that root — an overlay copy held there looked free."""
    by_ns: dict[int, dict[int, MountEntry]] = {}
    procs: list[tuple[str, int]] = []
    roots: set[tuple[int, int | None, int]] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{name}/ns/mnt").st_ino
            root = (ns, *_root_of(name))
            if root not in roots:
                table = by_ns.setdefault(ns, {})
                table.update((e.mnt_id, e) for e in mountinfo.mounts(name))
                roots.add(root)  # (only once read: another process of it may be readable)
            procs.append((name, ns))
        except OSError:
            continue
    return by_ns, procs


def _root_of(pid: str) -> tuple[int | None, int]:
    """(mount id, inode) of the root directory of `pid`; (None, 0) where it may not be read
    (another user's process): its mountinfo is read once per namespace then, as it may be."""
    try:
        fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None, 0
    try:
        return mountinfo.mnt_id_of(fd), os.fstat(fd).st_ino
    except (OSError, VeloError):
        return None, 0
    finally:
        os.close(fd)


def _own_namespace(ns: int) -> bool:
    """The mount namespace is this process's: the overlay mounted here (`veloverlay mount`)
    is not a holder by itself; processes using it are found by their files."""
    try:
        return os.stat("/proc/self/ns/mnt").st_ino == ns
    except OSError:
        return False


def _holds_file(
    pid: str,
    by_id: dict[int, MountEntry],
    is_ours: Callable[[MountEntry], bool],
    tables: _Mounts,
) -> bool:
    """An open file, cwd or root of `pid` on the overlay: its mount (by id, from fdinfo; never
    a call into the file's filesystem, which a stopped FUSE server could hang) looked up in the
    process's mountinfo, else in every namespace's; a mount in none counts when it is an
    overlay."""
    base = f"/proc/{pid}"
    for name in _LINKS:
        try:
            fd = os.open(f"{base}/{name}", os.O_PATH | os.O_CLOEXEC)
            try:
                mnt = mountinfo.mnt_id_of(fd)
            finally:
                os.close(fd)
        except OSError:
            continue
        if _is_held(f"{base}/{name}", by_id.get(mnt) or tables.anywhere(mnt), is_ours):
            return True
    try:
        fds = os.listdir(f"{base}/fdinfo")
    except OSError:
        return False
    for fd_name in fds:
        try:
            with open(f"{base}/fdinfo/{fd_name}", encoding="ascii") as f:
                mnt = next(int(ln.split()[1]) for ln in f if ln.startswith("mnt_id:"))
        except (OSError, ValueError, StopIteration):
            continue
        if mnt in by_id and not is_ours(by_id[mnt]):
            continue  # the common case: a file on another mount of its namespace
        entry = by_id.get(mnt) or tables.anywhere(mnt)
        if _is_held(f"{base}/fd/{fd_name}", entry, is_ours):
            return True
    return False


def _is_held(link: str, entry: MountEntry | None, is_ours: Callable[[MountEntry], bool]) -> bool:
    if entry is not None:
        return is_ours(entry)
    try:  # detached (or in a namespace not ours to read): any overlay may be this session's
        return _libc.statfs_type(link) == _libc.OVERLAYFS_SUPER_MAGIC
    except OSError:
        return False


def namespaces_holding(match: Callable[[MountEntry], bool]) -> list[int]:
    """One pid per mount namespace other than this process's in which a mount satisfies `match`
    (a copy made by unshare(CLONE_NEWNS) or clone after it was mounted keeps the superblock alive
    after it is unmounted here). Processes that vanish or cannot be read are skipped."""
    try:
        own = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return []
    by_ns, procs = _scan()  # (every root's view of a namespace: see _scan)
    first = {ns: int(pid) for pid, ns in reversed(procs)}
    return [
        pid
        for ns, pid in sorted(first.items(), key=lambda x: x[1])
        if ns != own and any(match(e) for e in by_ns[ns].values())
    ]


def ask_again(find: Callable[[], list[int]], wait: float) -> list[int]:
    """`find()` (holders, tree_writers), asked again for up to `wait` seconds while it finds
    some: the processes of a session that just ended may still be exiting. The last answer."""
    deadline = time.monotonic() + wait
    while True:
        found = find()
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def tree_writers(top: str) -> list[int]:
    """Pids (other than this process) with a file below the directory `top` open for writing,
    or mapped shared and writable. A file already deleted does not count (its writes go
    nowhere whatever the session does)."""
    prefix = top.rstrip("/") + "/"
    try:
        dev = os.stat(top).st_dev
    except OSError:
        return []
    me = os.getpid()
    found: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        if _writes_below(name, prefix, dev):
            found.append(int(name))
    return found


def _writes_below(pid: str, prefix: str, dev: int) -> bool:
    base = f"/proc/{pid}"
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            where = os.readlink(f"{base}/fd/{fd}")
            if not where.startswith(prefix) or where.endswith(" (deleted)"):
                continue
            with open(f"{base}/fdinfo/{fd}", encoding="ascii") as f:
                flags = next(int(ln.split()[1], 8) for ln in f if ln.startswith("flags:"))
            if flags & (os.O_WRONLY | os.O_RDWR) and os.stat(f"{base}/fd/{fd}").st_dev == dev:
                return True
        except (OSError, ValueError, StopIteration):
            continue
    try:
        with open(f"{base}/maps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[1][1] == "w" and parts[1][3] == "s":
                    path = parts[5].rstrip("\n")
                    if path.startswith(prefix) and not path.endswith(" (deleted)"):
                        return True
    except OSError:
        pass
    return False
