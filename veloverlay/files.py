"""Small filesystem helpers every layer uses: remove a tree whatever its modes, write JSON
atomically, hold an exclusive flock.

A leaf: imports only the standard library and `errors`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from veloverlay.errors import Reason, SysError, VeloError

__all__ = [
    "DIRFLAGS",
    "open_below",
    "open_regular",
    "NotRegular",
    "NEWFILE",
    "TreeChanged",
    "Unflag",
    "force_rmtree",
    "remove_at",
    "open_dir_at",
    "open_opened_up",
    "opened_dir",
    "open_walkable",
    "let_search",
    "empty_dir",
    "rmdir_at",
    "makedirs",
    "read_regular",
    "write_json_atomic",
    "write_bytes_atomic",
    "flock",
    "wait_for_writes",
    "given_path",
]

# Open a directory we walk or write into without following a symlink; create a file exclusively.
DIRFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def given_path(path: str, what: str, *, hint: str = "name it ('.' for this directory)") -> str:
    """`path` as the user gave it, refused (USAGE) when empty: Python reads '' as the working
    directory, so a script's unset variable (`ingest "$SRC"`) would ingest, check out into or
    record whatever directory it runs in. `.` says that on purpose."""
    if not path:
        raise VeloError(f"{what} is an empty path", reason=Reason.USAGE, hint=hint)
    return path


def open_below(dfd: int, parts: Sequence[str | bytes]) -> int:
    """A new descriptor of the directory `parts` below the directory `dfd`, opened one
    component at a time, none followed if it is a symbolic link (OSError ELOOP or ENOTDIR
    then): a directory on the way that another process swaps for a link never leads out."""
    if not parts:
        return os.open(".", DIRFLAGS, dir_fd=dfd)
    fd = dfd
    try:
        for name in parts:
            nxt = os.open(name, DIRFLAGS, dir_fd=fd)
            if fd != dfd:
                os.close(fd)
            fd = nxt
    except BaseException:
        if fd != dfd:
            os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def exact_modes() -> Iterator[None]:
    """Umask 0 for the block: what the store makes gets exactly the mode asked for (0444
    objects, 0755 directories, 0644 records: none writable by others). A user's umask 077
    made a shared store's objects 0400 and its directories 0700, unreadable by the users it is
    shared with. The umask is per process and threads enter this at once (publish's renames,
    pull's fetches): the first in sets it, the last out gives the saved one back (each thread
    saving and restoring its own left umask 0 for good when two overlapped: every later file
    of the process world-writable)."""
    with _UMASK_LOCK:
        if _UMASK[0] == 0:
            _UMASK[1] = os.umask(0)
        _UMASK[0] += 1
    try:
        yield
    finally:
        with _UMASK_LOCK:
            if _UMASK[0] > 0:  # (0: a forked child that gave it back already)
                _UMASK[0] -= 1
                if _UMASK[0] == 0:
                    os.umask(_UMASK[1])


def umask_now() -> int:
    """The process's umask (the one `exact_modes` blocks give back, while one runs)."""
    with _UMASK_LOCK:
        if _UMASK[0]:
            return _UMASK[1]
        try:  # read, not set and set back: another thread's file made meanwhile keeps its bits
            with open("/proc/self/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Umask:"):
                        return int(line.split()[1], 8)
        except (OSError, ValueError, IndexError):
            pass
        old = os.umask(0o022)  # no /proc (or a kernel before 4.7)
        os.umask(old)
        return old


_UMASK_LOCK = threading.Lock()
_UMASK = [0, 0]  # blocks inside exact_modes now, the umask they replaced


def _umask_after_fork() -> None:
    """A child forked while another thread was inside `exact_modes` has that thread's count
    but not the thread: it gets the umask back now, not never."""
    global _UMASK_LOCK
    _UMASK_LOCK = threading.Lock()
    if _UMASK[0]:
        os.umask(_UMASK[1])
        _UMASK[0] = 0


os.register_at_fork(after_in_child=_umask_after_fork)


def makedirs(path: str | bytes | os.PathLike[str], mode: int = 0o755) -> None:
    """`mkdir -p` giving every directory it makes `mode` (masked by the umask), not only the
    last: os.makedirs makes the parents 0777 & ~umask, and a layer build runs with umask 0, where
    that is a directory of the store anyone can write."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = os.path.dirname(os.fspath(path))
        if not parent or parent == os.fspath(path):
            raise
        makedirs(parent, mode)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)


class TreeChanged(OSError):
    """The tree being removed is not (or no longer) the one meant: the directory at its name is
    another one than the caller recorded, or a directory of the walk was moved away from under
    it. Nothing outside what was reached through descriptors of the tree was touched."""


# Called with an O_RDONLY descriptor of a file or directory whose unlink or rmdir was refused:
# clears what the caller may clear there (fsflags.make_mutable: chattr -i -a).
Unflag = Callable[[int], object]


def force_rmtree(
    path: str | os.PathLike[str],
    *,
    expect: tuple[int, int] | None = None,
    unflag: Unflag | None = None,
) -> None:
    """Remove `path` and, for a directory, everything in it, whatever its modes (0555/000 dirs,
    overlay's work/work) and whatever its depth. `path` is resolved once, when its parent is
    opened; from then on the walk acts only through descriptors (`remove_at`): no mode change,
    open, unlink or rmdir goes by a path an other user could re-point (a directory of theirs on
    the way swapped for a symbolic link). Symbolic links are removed, never followed. `expect`:
    the (dev, ino) the entry must have (else `TreeChanged`, nothing removed); `unflag`: called
    on an entry whose removal is refused (EPERM), to clear +i/+a, then tried once more. A
    missing `path` is no error."""
    parent, name = os.path.split(os.fspath(path).rstrip("/"))
    if name in ("", ".", ".."):
        raise OSError(errno.EINVAL, "not a removable name", os.fspath(path))
    try:
        pfd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        remove_at(pfd, name, expect=expect, unflag=unflag)
    finally:
        os.close(pfd)


def remove_at(
    dfd: int, name: str, *, expect: tuple[int, int] | None = None, unflag: Unflag | None = None
) -> bool:
    """Remove the entry `name` of the directory `dfd` (any descriptor of it, O_PATH too) and,
    for a directory, everything in it (`empty_dir`); False when there is no such entry. The
    directory is opened without following a link and checked against `expect` before anything
    in it changes. `dfd`'s own flags are never touched (it is outside the tree)."""
    for _ in range(3):
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            _same(st, expect, name)
            _remove_entry(dfd, name, False, unflag, outside=True)
            return True
        try:
            fd, dst = open_dir_at(dfd, name, expect=expect)
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            continue  # replaced by a link or a file since the stat: look again
        try:
            empty_dir(fd, unflag=unflag)
        finally:
            os.close(fd)
        rmdir_at(dfd, name, expect=(dst.st_dev, dst.st_ino), unflag=unflag, outside=True)
        return True
    raise TreeChanged(errno.ESTALE, "kept changing between a directory and something else", name)


def open_dir_at(
    dfd: int, name: str, *, expect: tuple[int, int] | None = None
) -> tuple[int, os.stat_result]:
    """(descriptor, fstat) of the directory `name` in `dfd`, opened without following a
    symbolic link (ENOTDIR when `name` is one, or no directory). When `expect` is given, the
    directory must be that (dev, ino) — checked before anything changes — else `TreeChanged`.
    A directory of ours that its mode keeps us from listing or emptying (000, 0555) gets u+rwx
    through a descriptor of that very inode, never by name."""
    try:
        fd = os.open(name, DIRFLAGS, dir_fd=dfd)
    except PermissionError:
        fd = _opened_up(dfd, name, expect)
    try:
        st = os.fstat(fd)
        _same(st, expect, name)
        if st.st_uid == os.geteuid() and st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            with contextlib.suppress(PermissionError):  # +i: what follows says so
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


@contextlib.contextmanager
def opened_dir(dfd: int, name: bytes, mode: int) -> Iterator[int]:
    """`open_walkable` for the block; the directory's bits are given back at its end, also when
    it fails: a walk run again finds the modes the tree's processes left."""
    fd, back = open_walkable(dfd, name, mode)
    try:
        yield fd
    finally:
        if back is not None:
            with contextlib.suppress(OSError):
                os.fchmod(fd, back)
        os.close(fd)


def open_walkable(dfd: int, name: bytes, mode: int) -> tuple[int, int | None]:
    """A descriptor of the directory `name` in `dfd` (no link followed) in which names can be
    listed and looked up, and the bits to give it back (fchmod: its mtime stays) when the walk
    leaves it, or None: one its owner made unreadable or unsearchable (000, 0100, 0300, 0600)
    has u+rwx meanwhile. `mode`: its mode as listed."""
    try:
        fd, back = os.open(name, DIRFLAGS, dir_fd=dfd), None
    except PermissionError:
        fd = open_opened_up(os.open(name, os.O_PATH | DIRFLAGS, dir_fd=dfd), mode)
        back = mode  # (u+rwx now: searchable)
    try:
        searched = let_search(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, back if searched is None else searched


def let_search(fd: int) -> int | None:
    """u+rwx on the directory `fd` if no name can be looked up in it (0600: "." resolves not);
    its bits before, or None."""
    try:
        os.lstat(".", dir_fd=fd)
        return None
    except PermissionError:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.fchmod(fd, mode | stat.S_IRWXU)
        return mode


def _opened_up(dfd: int, name: str, expect: tuple[int, int] | None) -> int:
    """The directory `name` that refused to be opened for reading, if it is ours, opened up
    (left u+rwx: it is about to be emptied)."""
    pfd = os.open(name, os.O_PATH | DIRFLAGS, dir_fd=dfd)
    try:
        st = os.fstat(pfd)
        _same(st, expect, name)
        if st.st_uid != os.geteuid():
            raise PermissionError(errno.EACCES, "a directory of another user", name)
    except BaseException:
        os.close(pfd)
        raise
    return open_opened_up(pfd, stat.S_IMODE(st.st_mode))


def open_opened_up(pfd: int, mode: int) -> int:
    """A descriptor for reading of the directory the O_PATH descriptor `pfd` names (closed
    here), which its owner made unreadable or unsearchable: chmod to `mode` | u+rwx goes through
    /proc/self/fd, so it reaches that very inode whatever happens to its name, and the open goes
    the same way. The directory is left u+rwx; the caller gives its mode back (fchmod of the
    returned descriptor) once it no longer needs to look names up in it."""
    proc = f"/proc/self/fd/{pfd}"
    try:
        os.chmod(proc, mode | stat.S_IRWXU)
        try:
            return os.open(proc, DIRFLAGS & ~os.O_NOFOLLOW)
        except BaseException:
            with contextlib.suppress(OSError):
                os.chmod(proc, mode)
            raise
    finally:
        os.close(pfd)


def empty_dir(top: int, *, unflag: Unflag | None = None) -> None:
    """Remove everything in the directory `top` (a descriptor opened for reading), never
    crossing into another filesystem (a mount point in the tree: EBUSY before anything below
    it goes). An explicit stack, not recursion (a tree deeper than Python's recursion limit
    must go too), and one descriptor at a time: the walk climbs back by "..", and each ".." must
    be the directory it descended from (its (dev, ino)), else `TreeChanged` — a directory moved
    elsewhere by whoever can write its parent never leads the walk out of the tree."""
    dev = os.fstat(top).st_dev
    fd = os.open(".", DIRFLAGS, dir_fd=top)
    try:
        # per level: its (dev, ino), its name in the level above, the subdirectories left
        here = os.fstat(fd)
        levels = [((here.st_dev, here.st_ino), "", _clear_files(fd, unflag))]
        while True:
            ident, name, pending = levels[-1]
            if pending:
                sub = pending.pop()
                try:
                    child, cst = open_dir_at(fd, sub)
                except FileNotFoundError:
                    continue
                except NotADirectoryError:  # no longer a directory (a link now): it goes
                    _remove_entry(fd, sub, False, unflag)
                    continue
                if cst.st_dev != dev:
                    os.close(child)
                    raise OSError(errno.EBUSY, "a mount point in the tree: not crossed", sub)
                os.close(fd)
                fd = child
                levels.append(((cst.st_dev, cst.st_ino), sub, _clear_files(fd, unflag)))
                continue
            if len(levels) == 1:
                return
            levels.pop()
            up = os.open("..", DIRFLAGS, dir_fd=fd)
            ust = os.fstat(up)
            os.close(fd)
            fd = up
            if (ust.st_dev, ust.st_ino) != levels[-1][0]:
                raise TreeChanged(errno.ESTALE, "a directory was moved out of the tree", name)
            rmdir_at(fd, name, expect=ident, unflag=unflag)
    finally:
        os.close(fd)


def close_to_others(fd: int, shown: str) -> int:
    """Take group and other access off the existing directory `fd` that a tree is about to be
    written into (checkout in place, a shim session's --at): its mode before. The tree's own
    top mode is set last, and until then this directory is all that keeps the tree's files
    from other users (a 0700 top over 0644 files; a writer killed midway leaves them there).
    One this user may not chmod (another user's) is refused (VeloError, TARGET_INVALID): the
    tree's mode could not be set on it at the end either. Any other failure (a read-only
    filesystem, an immutable or append-only directory of one's own) is a SysError naming it."""
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    try:
        os.fchmod(fd, mode & 0o7700 | 0o700)
    except PermissionError:
        if st.st_uid == os.geteuid():  # our own: EPERM of `chattr +i` or `+a`
            raise SysError(
                errno.EPERM,
                "chmod",
                shown,
                hint=f"an immutable or append-only directory (lsattr -d {shown}) takes no "
                "tree: chattr -ia it, or write the tree into another directory",
            ) from None
        raise VeloError(
            f"{shown} belongs to another user (uid {st.st_uid}): the tree's mode cannot be set "
            "on it, and until "
            "then its files would be open to that user",
            reason=Reason.TARGET_INVALID,
            hint="write the tree into a directory of your own, or a new one",
            path=shown,
        ) from None
    except OSError as exc:  # EROFS: a read-only mount point
        err = exc.errno or errno.EIO
        hint = "write the tree into a directory on a writable filesystem"
        raise SysError(err, "chmod", shown, hint=hint if err == errno.EROFS else None) from None
    return mode


def is_a_cwd(ident: tuple[int, int]) -> bool:
    """Whether a process this one can see (itself included) works in the directory `ident`
    (dev, ino): a shell that did `cd DIR`. Replaced by a rename, DIR would leave it in a deleted,
    empty directory. Processes of other users are seen by root only."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            st = os.stat(f"/proc/{pid}/cwd")
        except OSError:
            continue  # gone, or not ours to look at
        if (st.st_dev, st.st_ino) == ident:
            return True
    return False


def rmdir_at(
    dfd: int,
    name: str,
    *,
    expect: tuple[int, int] | None = None,
    unflag: Unflag | None = None,
    outside: bool = False,
) -> None:
    """rmdir `name` in `dfd` if it is still the directory `expect` (else `TreeChanged`)."""
    if expect is not None:
        _same(os.stat(name, dir_fd=dfd, follow_symlinks=False), expect, name)
    _remove_entry(dfd, name, True, unflag, outside=outside)


def _same(st: os.stat_result, expect: tuple[int, int] | None, name: str) -> None:
    if expect is not None and (st.st_dev, st.st_ino) != tuple(expect):
        raise TreeChanged(errno.ESTALE, "not the directory meant: it was replaced", name)


def _clear_files(dfd: int, unflag: Unflag | None) -> list[str]:
    """Unlink every non-directory in the directory `dfd`; return its subdirectories' names."""
    subdirs = []
    with os.scandir(dfd) as it:
        entries = list(it)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            subdirs.append(e.name)
        else:
            _remove_entry(dfd, e.name, False, unflag)
    return subdirs


def _remove_entry(
    dfd: int, name: str, isdir: bool, unflag: Unflag | None, *, outside: bool = False
) -> None:
    """unlink/rmdir `name` in `dfd`; a refusal (EPERM: +i or +a on the entry or on `dfd`) is
    handed to `unflag` and tried once more. A name already gone is no error."""
    rm = os.rmdir if isdir else os.unlink
    try:
        rm(name, dir_fd=dfd)
        return
    except FileNotFoundError:
        return
    except PermissionError:
        if unflag is None:
            raise
    with contextlib.suppress(OSError):  # (a refusal the retry below reports)
        if not outside:
            unflag(dfd)
    with contextlib.suppress(OSError):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):  # never open a device
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            efd = os.open(name, flags, dir_fd=dfd)
            try:
                if (os.fstat(efd).st_dev, os.fstat(efd).st_ino) == (st.st_dev, st.st_ino):
                    unflag(efd)
            finally:
                os.close(efd)
    rm(name, dir_fd=dfd)


class NotRegular(ValueError):
    """`open_regular` found something other than a regular file at the path."""


def open_regular(
    path: str | bytes | os.PathLike[str],
    flags: int = os.O_RDONLY,
    mode: int = 0o600,
    *,
    dir_fd: int | None = None,
) -> int:
    """Open (maybe create, with `flags`) a regular file, never through a symbolic link (ELOOP)
    and never blocking on a FIFO put in its place (O_NONBLOCK: a damaged or planted store file,
    object or state file hung every verb that opened it): NotRegular, the descriptor closed,
    when it is anything else (a directory opened for writing, or to be made: EISDIR, as much
    not a regular file as one opened read-only). Callers say what that means where they are."""
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
    except IsADirectoryError:
        raise NotRegular(f"{os.fsdecode(path)} is not a regular file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegular(f"{os.fsdecode(path)} is not a regular file")
    return fd


def read_regular(path: str | os.PathLike[str], limit: int = -1) -> bytes:
    """The bytes of a regular file (at most `limit`), as `open_regular` opens it: ValueError
    (NotRegular) when it is not one (a caller reading a state file or a cache treats it as
    unreadable)."""
    with open(open_regular(path), "rb") as f:
        return f.read(limit)


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    makedirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: object, *, parents: bool = True) -> None:
    """Replace `path` with `data` as JSON, atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(data, sort_keys=True).encode(), parents=parents)


def write_bytes_atomic(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o644, *, parents: bool = True
) -> None:
    """Replace `path` with `data`, atomically: a new file (created exclusively, never through a
    symbolic link, with `mode` whatever the umask) renamed over it. A full filesystem is
    STORE_FULL and leaves no temporary file; the old content stays. `parents`: make missing
    parent directories (else a missing one is FileNotFoundError: a late writer into a session
    directory removed meanwhile must not make the store's path again)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        if parents:
            makedirs(path.parent)
        fd = os.open(tmp, NEWFILE, mode)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VeloError(
                f"the filesystem of {path.parent} is full",
                reason=Reason.STORE_FULL,
                hint=(
                    "free space and retry (in a store: 'veloverlay refs --delete REF', then "
                    "'veloverlay gc'); what was committed is kept"
                ),
                path=path,
            ) from exc
        raise


def wait_for_writes(fd: int, *, keep_offset: bool = True) -> None:
    """Wait until no write(2) to this file is in flight. `keep_offset=False`: the file offset
    may move (a caller that reads with pread saves two lseeks per file).

    Buffered writes hold the inode's i_rwsem for their whole copy on tmpfs, ext4 and btrfs, and
    lseek(SEEK_DATA) takes it there too, so this returns only once a concurrent write has
    finished (elsewhere it is a cheap no-op: the double read still narrows the window). Without
    it an unlocked in-place writer could be read half-old, half-new with identical stats
    before and after (measured on tmpfs: ~half the reads of a 1-3 MiB file under a writer
    that pwrite()s without a lock).
    """
    # SEEK_DATA moves the offset to the first data: in a sparse file that starts with a hole,
    # a caller reading on from the offset would miss the hole's zeros. Put it back.
    pos = os.lseek(fd, 0, os.SEEK_CUR) if keep_offset else 0
    try:
        moved = os.lseek(fd, 0, os.SEEK_DATA)
    except OSError:
        return  # ENXIO (empty file, or one that is all hole), or no SEEK_DATA: offset unmoved
    if keep_offset and moved != pos:
        os.lseek(fd, pos, os.SEEK_SET)
