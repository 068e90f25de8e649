"""Where a checkout writes: its destination claimed by descriptor, and the whole tree or nothing.

`claim_dir` makes (or finds) a directory through its pinned parent and checks it is still where
its path says (a directory on the way may be another user's, who can swap it for a symlink to one
of root's); `resolve_dest` resolves a destination's parent once. `Place`: the tree is written
into a partial directory beside the destination and renamed into place once complete; an
interrupted checkout leaves nothing at the destination, and the next checkout to that name
removes the partial directory it left (only in a parent directory no other user may rename
entries of: see `Place._reclaim`). The partial name carries a random part and is made
exclusively (mkdir), so another user of a shared parent (a sticky /tmp) can neither guess it in
advance nor make the checkout write into their entry. An existing destination that cannot be
replaced is written in place.

Used by checkout, the shim's materialisation and the session target. Imports leaves and
facilities and `store.partial`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from veloverlay import _libc, files, fsflags, pathtrust
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import DIRFLAGS
from veloverlay.mount import pin_dir
from veloverlay.store.partial import leftover_pid
from veloverlay.store.partial import partial_name as _partial_name

__all__ = ["InPlace", "Place", "claim_dir", "resolve_dest"]


def resolve_dest(path: str) -> str:
    """`path` made absolute, its parent resolved once (realpath); the last component is kept as
    given, never followed (a symbolic link there is not a directory to write into)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(pathtrust.realpath_safe(parent, Reason.TARGET_INVALID), name)


def claim_dir(real: str, mode: int) -> tuple[int, bool]:
    """(descriptor, created) of the directory at `real` (absolute, resolved: `resolve_dest`),
    made with `mode` if missing. Everything goes by descriptor from the parent on: the parent is
    pinned (`mount.pin_dir`: a symlink on the way since the resolution is refused), the last
    component made and opened relative to it, never followed (DIRFLAGS). A user who owns a
    directory on the way can rename it, or swap it for a symlink to one of root's, at any
    moment; root then never writes into, nor takes the identity of, what the path leads to
    instead. The directory opened must still be at `real` (else TARGET_INVALID; one made here
    is removed again): a tree written where its parent was moved is not where it was asked.

    FileNotFoundError: the parent is missing; NotADirectoryError: the entry exists and is no
    directory (a symlink included); TARGET_INVALID: the path changed on the way."""
    parent, name = os.path.split(real)
    if not name or name in (".", ".."):
        raise NotADirectoryError(errno.EISDIR, "not a name to make", real)
    try:
        pfd = pin_dir(parent or "/")
    except VeloError as exc:
        if exc.reason is Reason.NOT_FOUND:
            raise FileNotFoundError(errno.ENOENT, "no such directory", parent) from None
        raise
    try:
        try:
            os.mkdir(name, mode, dir_fd=pfd)
            created = True
        except FileExistsError:
            created = False
        except OSError as exc:
            raise _unmade(exc, "mkdir", real) from None
        try:
            fd = os.open(name, DIRFLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise _unmade(exc, "open", real) from None
            if created:  # ours, and since replaced or moved by whoever owns the parent
                raise _moved(real, "the directory made there was replaced") from None
            if exc.errno == errno.ENOENT:
                raise
            raise NotADirectoryError(exc.errno, "not a directory", real) from None
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")  # as `pin_dir`: where the kernel says
        except OSError:
            where = "?"
        if where != real:
            st = os.fstat(fd)
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    files.rmdir_at(pfd, name, expect=(st.st_dev, st.st_ino))
            what = "made" if created else "found"
            raise _moved(real, f"the directory {what} there is now at {where}")
    finally:
        os.close(pfd)
    return fd, created


def _unmade(exc: OSError, syscall: str, real: str) -> Exception:
    """The failure to make or open the directory `real`, naming all of it (the OSError names
    only its last component): a name too long is the user's path (BAD_PATH), not a syscall's
    fault. FileNotFoundError stays as it is (callers: the parent is missing)."""
    if isinstance(exc, FileNotFoundError):
        return exc
    if exc.errno == errno.ENAMETOOLONG:
        msg = f"{real}: a name on the way is longer than 255 bytes"
        return VeloError(msg, reason=Reason.BAD_PATH, path=real)
    return SysError(exc.errno or errno.EIO, syscall, real)


def _moved(real: str, what: str) -> VeloError:
    return VeloError(
        f"{real} changed while it was opened: {what}",
        reason=Reason.TARGET_INVALID,
        path=real,
        hint="a directory on the way was replaced (by a symlink, or renamed); use a path "
        "that no other user can change",
    )


def _refuse_existing(dest: str, st: os.stat_result) -> VeloError:
    if stat.S_ISLNK(st.st_mode):
        return VeloError(
            f"{dest} is a symbolic link: checkout never writes through one",
            reason=Reason.EXISTS,
            path=dest,
            hint="give the directory it leads to (or a new name)",
        )
    return VeloError(f"{dest} exists and is not a directory", reason=Reason.EXISTS, path=dest)


def _not_empty(dest: str) -> VeloError:
    hint = "check out into a new or empty directory"
    return VeloError(f"{dest} is not empty", reason=Reason.EXISTS, path=dest, hint=hint)


def _keeps(fd: int, pfd: int) -> bool:
    """Whether the empty directory `fd` carries what a new directory beside it (in `pfd`) would
    not: extended attributes (a default ACL its new files are to inherit, a label, the user's
    own) or inode flags and a project id other than the parent's (`chattr +C`, a quota project).
    The finished tree renamed over it would take them away."""
    try:
        if os.listxattr(fd):
            return True
    except OSError:
        pass  # a filesystem without them
    try:
        parent = os.open(".", DIRFLAGS, dir_fd=pfd)
    except OSError:  # a parent we may not read (0711): any flag or project id may be lost
        return fsflags.dir_attrs(fd) != (0, 0)
    try:
        return fsflags.dir_attrs(fd) != fsflags.dir_attrs(parent)
    finally:
        os.close(parent)


class InPlace(Exception):
    """The existing empty destination cannot be replaced by the finished tree (a mount point:
    EBUSY): the tree is written into it instead."""


class Place:
    """Where a checkout writes, and how the tree gets to the destination whole or not at all.

    The tree is written into a new directory beside the destination
    (`.NAME.velo-partial-PID-RANDOM`, made by `claim_dir`, flock-ed while in use) and renamed
    into place once complete: no destination, or an existing empty one of ours (replaced by the
    rename, which the kernel does only while it is empty), never a half-written tree that a
    rerun refuses as "not empty". A checkout killed midway leaves only the hidden partial
    directory, which the next checkout to that name removes (unlocked, ours, named as we name
    them, in a parent only we or root may change: `_reclaim`). An existing empty destination
    that is another user's, a mount point, or one with extended attributes (a default ACL, a
    label), inode flags or a project id its parent lacks (`chattr +C`) is written into directly
    (owner, mount and attributes are the user's to keep), and so is the working directory of
    any process we can see (`cd DEST && checkout REF .`, or another shell of the user's), which
    a rename over it would leave in a deleted, empty directory."""

    def __init__(self, dest: str, real: str) -> None:
        self.dest, self.real = dest, real
        self.parent, self.name = os.path.split(real)
        self.temp: str | None = None  # the partial directory's name, None: in place
        self.old: os.stat_result | None = None  # the empty destination the tree replaces
        self.before: int | None = None  # written in place: DEST's mode before (closed meanwhile)
        self.pfd = self.lock = self.here = -1
        # the entries written at the top, by name and (dev, ino): what a failure in place undoes
        self.made: list[tuple[str, tuple[int, int]]] = []
        self.top = self._open()

    def _open(self) -> int:
        try:
            pfd = pin_dir(self.parent or "/")
        except VeloError as exc:
            if exc.reason is Reason.NOT_FOUND:
                raise VeloError(
                    f"the parent of {self.dest} does not exist",
                    reason=Reason.NOT_FOUND,
                    path=self.dest,
                ) from None
            raise
        try:
            st: os.stat_result | None = os.stat(self.name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            os.close(pfd)
            raise _unmade(exc, "stat", self.real) from None
        try:
            if st is not None:
                if not stat.S_ISDIR(st.st_mode):
                    raise _refuse_existing(self.dest, st)
                ident = (st.st_dev, st.st_ino)
                theirs = st.st_uid != os.geteuid() or st.st_dev != os.fstat(pfd).st_dev
                if theirs or files.is_a_cwd(ident):
                    return self._in_place()
                fd, st = files.open_dir_at(pfd, self.name, expect=ident)
                try:
                    full = bool(os.listdir(fd))
                    kept = not full and _keeps(fd, pfd)
                    if not kept:  # refused, or replaced only once the tree is whole: its mode
                        with contextlib.suppress(OSError):  # as it was (opened up: u+rwx)
                            os.fchmod(fd, stat.S_IMODE(st.st_mode))
                finally:
                    os.close(fd)
                if full:
                    raise _not_empty(self.dest)
                if kept:
                    return self._in_place()
                self.old = st
            self._reclaim(pfd)
        finally:
            os.close(pfd)
        return self._partial()

    def _in_place(self) -> int:
        try:
            fd, created = claim_dir(self.real, 0o700)
        except NotADirectoryError:
            st = os.lstat(self.real)
            raise _refuse_existing(self.dest, st) from None
        except FileNotFoundError:
            raise VeloError(
                f"the parent of {self.dest} does not exist", reason=Reason.NOT_FOUND, path=self.dest
            ) from None
        try:
            if not created and os.listdir(fd):
                raise _not_empty(self.dest)
            self.before = None if created else files.close_to_others(fd, self.dest)
        except BaseException:
            os.close(fd)
            raise
        self.temp = None
        self.here, self.made = os.dup(fd), []
        return fd

    def _partial(self) -> int:
        for _ in range(100):  # another entry by a random name is no accident: a few tries
            temp = _partial_name(self.name)
            try:
                fd, created = claim_dir(os.path.join(self.parent, temp), 0o700)
            except FileNotFoundError:
                raise VeloError(
                    f"the parent of {self.dest} does not exist",
                    reason=Reason.NOT_FOUND,
                    path=self.dest,
                ) from None
            except SysError as exc:
                if self.old is not None and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return self._in_place()  # an empty directory of ours where we may not make one
                # the user's destination, not our partial name
                raise SysError(exc.errno or errno.EIO, exc.syscall, self.real) from None
            except NotADirectoryError:
                continue  # something else by that name: another one
            if created:  # made by this mkdir: ours alone (an existing one is never used)
                break
            os.close(fd)
        else:
            raise VeloError(f"no free partial name beside {self.dest}", reason=Reason.EXISTS)
        self.temp = temp
        try:
            # the directory the partial one is in, whatever its path says now: the rename goes there
            self.pfd = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            self.lock = os.dup(fd)
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self.old is not None and os.fstat(fd).st_gid != self.old.st_gid:
                with contextlib.suppress(OSError):  # the empty destination's group, if we may
                    os.fchown(fd, -1, self.old.st_gid)
        except BaseException:
            os.close(fd)
            self.abort()
            raise
        return fd

    def _reclaim(self, pfd: int) -> None:
        """Remove the partial directories a killed checkout to this name left: ours, unlocked,
        their process gone, and only in a parent nobody else may rename entries of: there,
        whoever may could give one of our directories they cannot empty (another checkout)
        the partial name, and have it emptied for them. Elsewhere the leftovers stay."""
        if pathtrust.others_can_rename(self.parent or "/", os.fstat(pfd)):
            return
        try:
            rfd = os.open(".", DIRFLAGS, dir_fd=pfd)
            try:
                names = os.listdir(rfd)
            finally:
                os.close(rfd)
        except OSError:
            return  # a parent we may not list (0711): nothing we could find
        for entry in names:
            pid = leftover_pid(self.name, entry)
            if pid is None or os.path.exists(f"/proc/{pid}"):
                continue  # not a name we make, or its checkout may still be starting (unlocked)
            try:
                fd, st = files.open_dir_at(pfd, entry)
            except OSError:
                continue
            try:
                if st.st_uid != os.geteuid() or st.st_dev != os.fstat(pfd).st_dev:
                    continue  # not made by us, or something mounted there
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a checkout still writing it
                with contextlib.suppress(OSError):
                    files.empty_dir(fd)
                    files.rmdir_at(pfd, entry, expect=(st.st_dev, st.st_ino))
            finally:
                os.close(fd)

    def commit(self) -> None:
        """Put the finished tree at the destination (nothing to do when written in place).

        No destination: rename without replacing (RENAME_NOREPLACE; where the filesystem
        refuses that flag, EINVAL or ENOSYS, a plain rename, which replaces at most an empty
        directory made meanwhile). An empty destination: a plain rename over it, which the
        kernel does only while it is still empty (ENOTEMPTY once anyone wrote into it: nothing
        of theirs is moved or removed)."""
        if self.temp is None:
            return
        temp, name = os.fsencode(self.temp), os.fsencode(self.name)
        try:
            if self.old is None:
                try:
                    _libc.renameat2(self.pfd, temp, self.pfd, name, _libc.RENAME_NOREPLACE)
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                        raise
                    os.rename(temp, name, src_dir_fd=self.pfd, dst_dir_fd=self.pfd)
            else:
                os.rename(temp, name, src_dir_fd=self.pfd, dst_dir_fd=self.pfd)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise VeloError(
                    f"{self.dest} was made or written by someone else while the tree was "
                    "written; the tree was not put there",
                    reason=Reason.EXISTS,
                    path=self.dest,
                    hint="check out into a new or empty directory",
                ) from None
            if exc.errno == errno.EBUSY:
                raise InPlace() from None
            raise SysError(exc.errno or errno.EIO, "rename", self.dest) from None
        self.temp = None  # the tree is in place: never removed now

    def abort(self) -> None:
        """Remove the partial tree (a failed or interrupted checkout leaves no trace); written in
        place, what it made there (only that: the names it created at the top, each with what
        it wrote below), so that the destination is empty again and the next checkout works."""
        if self.temp is not None and self.pfd >= 0 and self.lock >= 0:
            st = os.fstat(self.lock)
            with contextlib.suppress(OSError):
                files.remove_at(self.pfd, self.temp, expect=(st.st_dev, st.st_ino))
        elif self.temp is None and self.here >= 0:
            for name, ident in reversed(self.made):
                with contextlib.suppress(OSError):  # another entry by that name now: it stays
                    files.remove_at(self.here, name, expect=ident)
            if self.before is not None:  # its mode back (closed to others while written)
                with contextlib.suppress(OSError):
                    os.fchmod(self.here, self.before)
        self.temp = None

    def close(self) -> None:
        for fd in (self.lock, self.pfd, self.here):
            if fd >= 0:
                os.close(fd)
        self.lock = self.pfd = self.here = -1
