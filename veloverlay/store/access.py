"""Who may use a store, and how its files are made: nothing in it is ever a symbolic link, root
uses only stores no other user can write, and a store that cannot be written says why (a
read-only filesystem, the inside of a session, another user's store)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from veloverlay.errors import Reason, VeloError
from veloverlay.files import DIRFLAGS

__all__ = [
    "TOP_DIRS",
    "TOP_FILES",
    "check_safe",
    "write_refusal",
    "read_only_error",
    "open_nofollow",
    "mkdir_nofollow",
    "private_trees",
    "private_dir",
    "create_once",
    "rmtree_count",
    "reclaim_stages",
    "store_lock",
]

TOP_DIRS = (
    "objects-v1",
    "objects-v2",
    "tmp",
    "trees-v1",
    "sessions",
    "locks-v1",
    "ids-v1",
    "shim-v1",
    "remote-v1",
    "quarantine-v1",
    "manifests.lmdb",
)
TOP_FILES = (
    "lock",
    "manifests.record",
    "manifests.lmdb/data.mdb",
    "manifests.lmdb/lock.mdb",
    "unprotected-v1",
    "fsverity-v1.json",
)


def open_nofollow(path: str | os.PathLike[str] | bytes, flags: int, mode: int = 0o600) -> int:
    """Open (maybe create) a file of the store, never through a symbolic link."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VeloError(
                f"{os.fsdecode(path)} is a symbolic link: nothing in a store may be one",
                reason=Reason.STORE_UNSAFE,
                hint="someone who can write the store planted it; remove it and check who can",
                path=path,
            ) from None
        raise


def mkdir_nofollow(path: str | os.PathLike[str] | bytes, mode: int = 0o755) -> None:
    """mkdir -p for one level that refuses to accept a symbolic link as the directory."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise VeloError(
                f"{os.fsdecode(path)} is not a directory"
                + (" but a symbolic link" if stat.S_ISLNK(st.st_mode) else ""),
                reason=Reason.STORE_UNSAFE,
                hint="someone who can write the store planted it; remove it and check who can",
                path=path,
            ) from None


def private_trees(trees: Path) -> None:
    """`trees-v1/` is its owner's alone (0700), even in a shared store: the layers kept there
    carry the manifests' directory modes, and a 1777 `tmp/` of a tree would otherwise let any
    local user add files to the lower layers of the owner's (root's) sessions. Nobody else reads
    it: other users of a shared store only run reading commands, which never look there."""
    private_dir(trees)


def private_dir(path: Path) -> None:
    """Make `path` (one level) a directory only its owner can enter, 0700, also when an older
    version made it open (by its owner; a symbolic link is refused)."""
    mkdir_nofollow(path, 0o700)
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, 0o700)  # a store made before this rule


def create_once(path: Path, data: bytes) -> None:
    try:
        fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def check_safe(store_root: Path) -> None:
    """Refuse a store where a symbolic link stands for one of its own files or directories
    (planted by whoever could write it), and, as root, a store that another user can
    write: whoever can write a store directory can plant a link where root will create a
    file (`lock`, a stage, the manifest database), or swap objects under root's sessions.
    Checked on the store directory (followed if the path the user chose is a link to it, but
    as root only a link root owns) and its own files and directories that exist."""
    root = os.geteuid() == 0
    for d in (store_root, *(store_root / n for n in TOP_DIRS + TOP_FILES)):
        try:
            st = os.stat(d) if d == store_root else os.lstat(d)
            link = os.lstat(d) if d == store_root and root else st
        except FileNotFoundError:
            continue
        why = None
        if stat.S_ISLNK(link.st_mode) and link.st_uid != 0:
            # root follows no other user's link to its store: it could name any root-owned
            # directory, which root would then fill (and, init --shared, open to everyone)
            why = f"is a symbolic link that belongs to uid {link.st_uid}"
        elif stat.S_ISLNK(st.st_mode):
            why = "is a symbolic link"
        elif not root:
            continue
        elif st.st_uid != 0:
            why = f"belongs to uid {st.st_uid}"
        elif st.st_mode & 0o022 and stat.S_ISDIR(st.st_mode):
            why = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if why is not None:
            raise VeloError(
                f"refusing to use the store{' as root' if root else ''}: {d} {why}",
                reason=Reason.STORE_UNSAFE,
                hint="root uses only stores no other user can write: use a store of root's "
                "own, or fix ownership (chown -R root) and modes (chmod go-w)"
                if root
                else "someone who could write the store planted it: remove it",
                path=d,
            )


def write_refusal(store_root: Path, path: str | os.PathLike[str] | None = None) -> VeloError | None:
    """Why this process cannot change `path` (default: the store), as the error to raise
    when it tries; None when it can. Inside a session, on a read-only filesystem: reason
    STORE_READ_ONLY; a store this user may read but not write: STORE_PERMISSION."""
    where = Path(path if path is not None else store_root)
    while not where.exists() and where != where.parent:  # not made yet: its parent's say
        where = where.parent
    if os.access(where, os.W_OK):
        return None
    sid = os.environ.get("VELO_SESSION")
    try:
        ro = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except OSError:
        ro = False
    if sid and ro:
        return read_only_error(
            store_root,
            f"this runs inside the veloverlay session {sid}, where the store is mounted read-only",
            inside=True,
        )
    if ro:
        return read_only_error(store_root, f"the store's filesystem is mounted read-only ({where})")
    try:
        owner = f" (it belongs to uid {os.stat(where).st_uid})"
    except OSError:
        owner = ""
    return VeloError(
        f"this user (uid {os.geteuid()}) cannot write the store at {store_root}{owner}",
        reason=Reason.STORE_PERMISSION,
        hint="reading commands work on a shared store; use a store of your own to change "
        "anything (--store or VELO_STORE)",
        path=where,
    )


def read_only_error(store_root: Path, why: str, *, inside: bool = False) -> VeloError:
    return VeloError(
        f"cannot change the store: {why}",
        reason=Reason.STORE_READ_ONLY,
        hint="reading commands work here; run this one outside the session"
        if inside
        else "reading commands work; remount the filesystem read-write to change the store",
        path=store_root,
    )


def rmtree_count(path: Path) -> int:
    """Remove a stage directory (flat: staged files); returns the files removed. Everything is
    reached through directory descriptors opened without following a symbolic link: a link
    planted at a stage's name is removed itself, never the tree it names."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return 0
    if st.st_uid == os.geteuid() and st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
        os.chmod(path, 0o700)  # a stage left 0000: only its owner's (a directory, checked)
    fd = os.open(path, DIRFLAGS)
    try:
        count = _clear_dir(fd)
    finally:
        os.close(fd)
    os.rmdir(path)
    return count


def _clear_dir(fd: int) -> int:
    count = 0
    for e in list(os.scandir(fd)):
        if e.is_dir(follow_symlinks=False):
            sub = os.open(e.name, DIRFLAGS, dir_fd=fd)
            try:
                count += _clear_dir(sub)
            finally:
                os.close(sub)
            os.rmdir(e.name, dir_fd=fd)
        else:
            os.unlink(e.name, dir_fd=fd)
            count += 1
    return count


def reclaim_stages(tmp: Path) -> int:
    """Remove the stages in `tmp` left by dead writers (their flock is free)."""
    removed = 0
    try:
        names = os.listdir(tmp)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.endswith(".lock"):
            continue
        lockpath = tmp / name
        try:
            fd = open_nofollow(lockpath, os.O_RDWR)
        except (FileNotFoundError, VeloError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            removed += rmtree_count(tmp / name[: -len(".lock")])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lockpath)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def store_lock(store_root: Path, *, exclusive: bool = False, wait: bool = True) -> Iterator[None]:
    """The store lock (`<store>/lock`): shared for writers, exclusive for gc."""
    try:
        fd = open_nofollow(store_root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        refusal = write_refusal(store_root) if exc.errno in (errno.EROFS, errno.EACCES) else None
        if refusal is not None:
            raise refusal from None
        raise
    try:
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if not wait:
            op |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            raise VeloError(
                "the store is locked by another veloverlay process",
                reason=Reason.LOCKED,
                hint="wait for it (gc holds the store exclusively) and retry",
            ) from None
        yield
    finally:
        os.close(fd)
