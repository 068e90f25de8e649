"""Who may use a store, and how its files are made: nothing in it is ever a symbolic link, root
uses only stores no other user can write or move, and a store that cannot be written says why (a
read-only filesystem, the inside of a session, another user's store).

A store is held by a descriptor of its directory, opened once its path has been judged
(`check_safe`); the writes that follow (stages, object names, shard directories, locks) name
their files relative to that descriptor and never follow a symbolic link, so a store moved or
replaced by name after the check is not where they go."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from pathlib import Path

from veloverlay import _libc, files, pathtrust
from veloverlay.errors import Reason, VeloError
from veloverlay.files import DIRFLAGS

__all__ = [
    "exists_at",
    "TOP_DIRS",
    "TOP_FILES",
    "check_safe",
    "check_place",
    "store_there",
    "refuse_filled",
    "refuse_newer_format",
    "write_refusal",
    "shim_refusal",
    "read_only_error",
    "refuse_overlap",
    "open_nofollow",
    "mkdir_nofollow",
    "open_dir",
    "make_dir",
    "private_trees",
    "private_dir",
    "create_once",
    "rmtree_count",
    "reclaim_stages",
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
    "lock.gate",
    "manifests.record",
    "manifests.record.lock",
    "manifests.lmdb/data.mdb",
    "manifests.lmdb/lock.mdb",
    "unprotected-v1",
    "fsverity-v1.json",
    "space-reserve",
)


AnyPath = str | os.PathLike[str] | bytes


# A versioned name of the store's top level (`objects-v2`, `fsverity-v1.json`): a format change
# is a new name, so one this version does not know is a newer veloverlay's.
_VERSIONED = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*-v[0-9]+(?:\.[a-z0-9]+)?")
_KNOWN = frozenset(n for n in (*TOP_DIRS, *TOP_FILES) if _VERSIONED.fullmatch(n))


def refuse_newer_format(store_root: Path) -> None:
    """Refuse a store that holds a versioned name this version does not know (`objects-v3`, a
    `trees-v2`): a newer veloverlay made or upgraded it, and nothing here may write into a
    format it does not understand. Checked before anything is made in the store."""
    try:
        names = os.listdir(store_root)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return  # no store yet, or not ours to read: the caller says so
    newer = sorted(n for n in names if _VERSIONED.fullmatch(n) and n not in _KNOWN)
    if newer:
        raise VeloError(
            f"the store at {store_root} holds {', '.join(newer)}, a format this veloverlay does "
            "not know: a newer version made or upgraded it; nothing was changed",
            reason=Reason.MANIFEST_SCHEMA,
            hint="use the veloverlay version that created this store",
            path=store_root,
        )


def exists_at(dir_fd: int, name: AnyPath) -> bool:
    """Is there an entry `name` (of any kind, a link not followed) in the directory `dir_fd`?"""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _planted(shown: AnyPath) -> VeloError:
    return VeloError(
        f"{os.fsdecode(shown)} is a symbolic link: nothing in a store may be one",
        reason=Reason.STORE_UNSAFE,
        hint="someone who can write the store planted it; remove it and check who can",
        path=os.fsdecode(shown),
    )


def open_nofollow(
    path: AnyPath, flags: int, mode: int = 0o600, *, dir_fd: int | None = None, shown: AnyPath = ""
) -> int:
    """Open (maybe create) a regular file of the store, never through a symbolic link; `path`
    is relative to `dir_fd` when given (then `shown` is its name in messages). O_NONBLOCK: a
    FIFO put in the place of one (the lock, the gate) would block the open for ever."""
    try:
        return files.open_regular(path, flags, mode, dir_fd=dir_fd)
    except files.NotRegular:
        name = os.fsdecode(shown or path)
        raise VeloError(
            f"{name} is not a regular file",
            reason=Reason.STORE_UNSAFE,
            hint="someone who can write the store put it there; remove it and check who can",
            path=name,
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _planted(shown or path) from None
        raise


def mkdir_nofollow(
    path: AnyPath, mode: int = 0o755, *, dir_fd: int | None = None, shown: AnyPath = ""
) -> None:
    """mkdir -p for one level that refuses to accept a symbolic link as the directory."""
    try:
        with files.exact_modes():  # the store's modes, whatever the umask
            os.mkdir(path, mode, dir_fd=dir_fd)
    except FileExistsError:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise _not_a_dir(shown or path, stat.S_ISLNK(st.st_mode)) from None


def _not_a_dir(shown: AnyPath, link: bool) -> VeloError:
    return VeloError(
        f"{os.fsdecode(shown)} is not a directory" + (" but a symbolic link" if link else ""),
        reason=Reason.STORE_UNSAFE,
        hint="someone who can write the store planted it; remove it and check who can",
        path=os.fsdecode(shown),
    )


def open_dir(path: AnyPath, *, dir_fd: int | None = None, shown: AnyPath = "") -> int:
    """A descriptor of a directory of the store, never reached through a symbolic link."""
    try:
        return os.open(path, DIRFLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _not_a_dir(shown or path, exc.errno == errno.ELOOP) from None
        raise


def make_dir(
    path: AnyPath, mode: int = 0o755, *, dir_fd: int | None = None, shown: AnyPath = ""
) -> int:
    """`mkdir_nofollow`, then a descriptor of that directory (opened first: it mostly exists,
    and a failed mkdir costs a stat besides)."""
    try:
        return open_dir(path, dir_fd=dir_fd, shown=shown)
    except FileNotFoundError:
        pass
    mkdir_nofollow(path, mode, dir_fd=dir_fd, shown=shown)
    return open_dir(path, dir_fd=dir_fd, shown=shown)


def private_trees(trees: Path, *, dir_fd: int | None = None) -> None:
    """`trees-v1/` is its owner's alone (0700), even in a shared store: the layers kept there
    carry the manifests' directory modes, and a 1777 `tmp/` of a tree would otherwise let any
    local user add files to the lower layers of the owner's (root's) sessions. Nobody else reads
    it: other users of a shared store only run reading commands, which never look there."""
    private_dir(trees.name if dir_fd is not None else trees, dir_fd=dir_fd, shown=trees)


def private_dir(path: AnyPath, *, dir_fd: int | None = None, shown: AnyPath = "") -> None:
    """Make `path` (one level) a directory only its owner can enter, 0700, also when an older
    version made it open (by its owner; a symbolic link is refused)."""
    mkdir_nofollow(path, 0o700, dir_fd=dir_fd, shown=shown)
    st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, 0o700, dir_fd=dir_fd)  # a store made before this rule (a directory)


def create_once(path: AnyPath, data: bytes, *, dir_fd: int | None = None) -> None:
    try:
        with files.exact_modes():
            fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    except FileExistsError:
        return
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def check_safe(store_root: Path) -> int:
    """Judge the store at `store_root` and return a descriptor of its directory (the very one
    judged, opened without following a symbolic link): every later write goes relative to it.

    Refused (STORE_UNSAFE):
    * as root (uid 0 outside any user namespace), a store another user could move, replace or
      redirect: every directory on the way to it (`pathtrust.untrusted_on_path`) must belong to root
      and be writable by root alone, a sticky one (/tmp) only holding a root-owned next step,
      and every symbolic link on the way must be root's. A store in a user's home is refused:
      that user could rename the store away and put one whose directories lead elsewhere (root
      would then write its files there, +i);
    * a store that is not the caller's (another user's shared store, read): the same, with root,
      the caller and the store's owner trusted. A user's own store is that user's to place: the
      ancestors of a store one owns are not judged (what they could redirect is that user's
      own writes, and those go by the descriptor);
    * as root, a store directory another user can write, or one of its own files and
      directories that belongs to another user or is writable by group or others;
    * for everyone, a symbolic link standing for one of the store's own files or directories."""
    uid = os.geteuid()
    as_root = uid == 0
    real_root = pathtrust.real_root()
    st = os.stat(store_root)
    link = os.lstat(store_root)
    if real_root or st.st_uid != uid:
        trusted = {0, uid} if real_root else {0, uid, st.st_uid}
        where, why = pathtrust.untrusted_on_path(store_root, trusted)
        if why is not None:
            raise _unsafe_place(store_root, Path(where), why, real_root)
        real = where
    else:
        real = os.path.realpath(store_root)
    fd = open_dir(real)
    try:
        held = os.fstat(fd)
        if (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
            raise VeloError(
                f"the store at {store_root} changed while it was being checked",
                reason=Reason.STORE_UNSAFE,
                hint="someone moved or replaced it: check who can write the directories above it",
                path=store_root,
            )
        _check_entries(store_root, fd, held, link, as_root)
    except BaseException:
        os.close(fd)
        raise
    return fd


# What a directory may hold for `init` to make a store in it: a store's own names (a store, or
# one an earlier init left half made) and a new filesystem's lost+found.
_STORE_MARKS = {"objects-v1", "objects-v2", "CACHEDIR.TAG"}


def store_there(root: Path, fd: int) -> bool:
    """For `init` of the existing directory `fd`: whether a store is there (False: empty, a new
    one). One holding other things (`--store ~/project` by mistake) is refused: CACHEDIR.TAG
    there tells backup tools "skip this tree", a `.gitignore` of `*` hides a git checkout's
    files. So is another user's store (STORE_PERMISSION): only its owner writes it, and a
    directory another user made to look like one (B's 0777 /tmp/st holding an objects-v2) would
    give B every object this user's writes name there."""
    names = set(os.listdir(fd)) - {"lost+found"}
    if names and not names & _STORE_MARKS:
        raise VeloError(
            f"{root} is not empty and not a veloverlay store",
            reason=Reason.EXISTS,
            path=root,
            hint="make the store in a new or empty directory (--store DIR or VELO_STORE)",
        )
    st = os.fstat(fd)
    if names and st.st_mode & 0o002:  # store entries arrived since `check_safe` judged it empty
        raise _changed(root)
    owner = st.st_uid
    if names and owner != os.geteuid() and not pathtrust.real_root():
        raise VeloError(
            f"the store at {root} belongs to uid {owner}: only its owner writes it",
            reason=Reason.STORE_PERMISSION,
            hint="reading commands work on another user's shared store; use a store of your "
            "own to change anything (--store or VELO_STORE)",
            path=root,
        )
    return bool(names)


def refuse_filled(root: Path, fd: int) -> None:
    """After `init` closed a new store's directory `fd` (0700 or 0755): it must still be empty.
    Until then another user could add entries to it (an empty 0777 directory passes
    `check_safe`), which the store's writes would then go into."""
    if set(os.listdir(fd)) - {"lost+found"}:
        raise _changed(root)


def _changed(root: Path) -> VeloError:
    return VeloError(
        f"refusing to make a store at {root}: entries appeared in it while it was being made",
        reason=Reason.STORE_UNSAFE,
        hint="another user can write that directory: make the store in a new directory only "
        "you can write",
        path=root,
    )


def check_place(store_root: Path) -> None:
    """As root, refuse to make a store where another user could move or replace it (the
    directories above it that exist; see `check_safe`), before anything is made there."""
    if pathtrust.real_root():
        where, why = pathtrust.untrusted_on_path(store_root, {0, os.geteuid()})
        if why is not None:
            raise _unsafe_place(store_root, Path(where), why, True)


def _unsafe_place(store_root: Path, where: Path, why: str, real_root: bool) -> VeloError:
    if real_root:
        hint = (
            "root uses a store only where no other user can move or replace it: every directory "
            "above it must belong to root and be writable by root alone (in a sticky one such as "
            "/tmp, the next directory must be root's). Move the store (e.g. under /var/lib), or "
            f"make {where} root's alone (chown root, chmod go-w)"
        )
    else:
        hint = (
            "a store that is not yours is used only where nobody but root, you and its owner can "
            f"move or replace it: use another store, or have {where} fixed (chmod go-w)"
        )
    return VeloError(
        f"refusing to use the store at {store_root}{' as root' if real_root else ''}: {why}",
        reason=Reason.STORE_UNSAFE,
        hint=hint,
        path=where,
    )


def _check_entries(
    store_root: Path, fd: int, held: os.stat_result, link: os.stat_result, as_root: bool
) -> None:
    """The store directory (`held`, reached through `link`) and its own files and directories
    that exist (looked up relative to `fd`)."""
    entries: list[tuple[Path, os.stat_result]] = [(store_root, held)]
    for n in TOP_DIRS + TOP_FILES:
        try:
            entries.append((store_root / n, os.stat(n, dir_fd=fd, follow_symlinks=False)))
        except (FileNotFoundError, NotADirectoryError):
            continue
    for d, st in entries:
        why = None
        if d == store_root and stat.S_ISLNK(link.st_mode) and link.st_uid != 0 and as_root:
            # root follows no other user's link to its store: it could name any root-owned
            # directory, which root would then fill (and, init --shared, open to everyone)
            why = f"is a symbolic link that belongs to uid {link.st_uid}"
        elif stat.S_ISLNK(st.st_mode):
            why = "is a symbolic link"
        elif not as_root:  # everyone: one owner (or root), and no other user can add files
            if st.st_uid not in (0, held.st_uid):
                why = f"belongs to uid {st.st_uid}, the store to uid {held.st_uid}"
            elif st.st_mode & 0o002 and stat.S_ISDIR(st.st_mode) and len(entries) > 1:
                why = f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
        elif st.st_uid != 0:
            why = f"belongs to uid {st.st_uid}"
        elif st.st_mode & 0o022 and stat.S_ISDIR(st.st_mode):
            why = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if why is not None:
            raise VeloError(
                f"refusing to use the store{' as root' if as_root else ''}: {d} {why}",
                reason=Reason.STORE_UNSAFE,
                hint="root uses only stores no other user can write: use a store of root's "
                "own, or fix ownership (chown -R root) and modes (chmod go-w)"
                if as_root
                else "another user could plant files in the store (a link, an entry of theirs, "
                "a directory anyone can write): remove what is not yours or chmod o-w, or use "
                "another store",
                path=d,
            )


def shim_refusal(store_root: Path) -> VeloError | None:
    """STORE_READ_ONLY when this process runs in a shim session of this store: its library
    refuses every write into the store (EROFS) though `access(2)` says it may write."""
    sid, conf = os.environ.get("VELO_SESSION"), os.environ.get("VELO_SHIM_CONFIG")
    if not sid or not conf:
        return None
    sessions = os.path.join(os.path.realpath(store_root), "sessions", "")
    if not os.path.realpath(conf).startswith(sessions):
        return None  # another store's session: this store is writable here
    return read_only_error(
        store_root,
        f"this runs inside the veloverlay session {sid}, whose shim keeps the store read-only",
        inside=True,
    )


def write_refusal(store_root: Path, path: str | os.PathLike[str] | None = None) -> VeloError | None:
    """Why this process cannot change `path` (default: the store), as the error to raise
    when it tries; None when it can. Inside a session, on a read-only filesystem: reason
    STORE_READ_ONLY; a store this user may read but not write: STORE_PERMISSION."""
    shim = shim_refusal(store_root)
    if shim is not None:
        return shim
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


def refuse_overlap(
    real: str, store_root: Path, *, what: str, hint: str, reason: Reason = Reason.TARGET_INVALID
) -> None:
    """`reason` (TARGET_INVALID) when `real` (absolute, its directories resolved) is the store,
    lies inside it or contains it: the one test for a checkout, an export, a session's target
    and an ingest's source. What another verb writes there is not the store's: a checkout into a new
    fan-out directory would plant files under object names (a later ingest trusts a name that
    exists: the store would lie, P0-a), an export could replace an object, and `remove-store`
    or `gc` would delete the user's copy with the store."""
    sroot = os.path.realpath(store_root)
    if real == sroot or real.startswith(sroot + "/") or sroot.startswith(real.rstrip("/") + "/"):
        raise VeloError(
            f"{what} {real} contains or lies inside the store {sroot}",
            reason=reason,
            hint=hint,
            path=real,
        )


def refuse_kernel_fs(
    real: str, *, what: str, hint: str, reason: Reason = Reason.TARGET_INVALID
) -> None:
    """`reason` (TARGET_INVALID) when `real` (absolute, resolved; for one still to be made, its
    parent) is on a kernel interface (/proc, /sys, a cgroup tree: `_libc.PSEUDO_FS_MAGIC`), not
    a directory tree: the one test for a session's target, a checkout, an ingest's source and a
    store being made.
    A session mounts its own /proc after the projection (one under /proc showed the kernel's
    files, and `mount` there hid them from the host); mkdir there fails as if the parent were
    missing; an ingest kept the source's contents out, as a pseudo filesystem's inside a tree.
    A path still to be made is judged by the nearest directory above it that exists (/proc/a/b:
    /proc)."""
    where = real
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        fs = _libc.PSEUDO_FS_MAGIC.get(_libc.statfs_type(where))
    except OSError:
        return  # gone or unreadable: the caller's own checks say so
    if fs is not None:
        raise VeloError(
            f"{what} {real} is on {fs}, a kernel interface, not a directory tree",
            reason=reason,
            hint=hint,
            path=real,
        )


def rmtree_count(name: AnyPath, *, dir_fd: int | None = None) -> int:
    """Remove a stage directory (flat: staged files) named `name` in `dir_fd`; returns the files
    removed. Everything is reached through directory descriptors opened without following a
    symbolic link: a link planted at a stage's name is removed itself, never the tree it names."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return 0
    if st.st_uid == os.geteuid() and st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
        os.chmod(name, 0o700, dir_fd=dir_fd)  # a stage left 0000: only its owner's (a directory)
    fd = os.open(name, DIRFLAGS, dir_fd=dir_fd)
    try:
        count = _clear_dir(fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
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


def reclaim_stages(tmp_fd: int, *, no_writer: bool = False) -> int:
    """Remove the stages in the store's `tmp/` (the directory `tmp_fd`) left by dead writers
    (their flock is free). `no_writer`: the caller holds the store lock exclusively (gc), so no
    stage is live (every writer holds it shared while its stage lasts), and a stage directory
    whose `.lock` is gone (removed by hand, a cleaner of tmp files) goes too: nothing else could
    ever remove it, its lock being what says that its writer is dead."""
    removed = 0
    names = os.listdir(tmp_fd)
    if no_writer:
        present = set(names)
        for name in names:
            if name.endswith(".lock") or f"{name}.lock" in present:
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=tmp_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):  # (files in tmp/ are not stages: a probe's)
                    removed += rmtree_count(name, dir_fd=tmp_fd)
    for name in names:
        if not name.endswith(".lock"):
            continue
        try:
            fd = open_nofollow(name, os.O_RDWR, dir_fd=tmp_fd)
        except (FileNotFoundError, VeloError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            removed += rmtree_count(name[: -len(".lock")], dir_fd=tmp_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=tmp_fd)
        finally:
            os.close(fd)
    return removed
