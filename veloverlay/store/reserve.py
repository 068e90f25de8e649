"""The store's space reserve: `<store>/space-reserve`, a file of `SIZE` allocated bytes that only
the store's own space-freeing commits give up.

Why: LMDB copies every page it changes (copy-on-write), so even a commit that only deletes
(`refs --delete`, `tag --delete`, gc forgetting what it sweeps) needs a few free pages. On a full
disk it has none: the commit fails with store-full, and the documented way out of a full disk
(delete refs, then gc) was closed to the user who filled it. gc could delete its victims first;
a ref delete cannot free anything before it commits.

So the store keeps this reserve. `freeing(store, attempt)` runs a space-freeing commit; when it
meets a full disk (STORE_FULL, nothing committed), the reserve is truncated to nothing and the
commit tried once more, with `SIZE` bytes free. `ensure` makes the reserve whole again: when a
store is made, whenever a writer takes the store lock, and after gc; on a full disk it leaves it
as it is and says so by its answer (the reserve is a safety margin, never a reason to fail).

The reserve is not part of the store's format: an older veloverlay ignores it (its name has no
`-vN`, so it is not taken for a newer format), a store without it works as before, `fsck` does
not look at it, `doctor` reports it (`status`), gc never deletes it, `remove-store` removes it
with the rest. It is reached by the store's descriptor, never followed if it is a symbolic link,
and its content is never read (fallocated space; zeros wherever the filesystem cannot allocate
without writing).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from veloverlay import files
from veloverlay.errors import Reason, VeloError

if TYPE_CHECKING:
    from veloverlay.store.cas import Store

__all__ = ["NAME", "SIZE", "FULL_HINT", "ensure", "release", "freeing", "held", "status"]

NAME = "space-reserve"
# Enough for a ref delete with its ingest stat cache (measured: 8 KiB for a small ref, one page
# per few dozen cached directories) and gc's commit of what it forgets; small beside any store.
SIZE = 256 << 10

# posix_fallocate's answers that say this filesystem (or file) cannot allocate space ahead at all
_CANNOT = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EBADF)
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_TMPFILE = (-errno.EOPNOTSUPP, -errno.EISDIR, -errno.EINVAL)  # (negated: see _try_allocate)

# What a store-full error tells the user to do: what frees the store's own space works on a full
# disk (thanks to the reserve); gc alone frees nothing a ref still names.
FULL_HINT = (
    "free space on the store's filesystem and retry: 'veloverlay refs --delete REF' and then "
    "'veloverlay gc' free the store's own, and work on a full disk"
)

_T = TypeVar("_T")


def held(store: Store) -> int:
    """The bytes the reserve holds now (allocated), 0 when there is none."""
    try:
        st = os.stat(NAME, dir_fd=store.fd, follow_symlinks=False)
    except OSError:
        return 0
    return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0


def ensure(store: Store) -> bool:
    """Make the reserve whole (`SIZE` bytes allocated). True when it is; False when it cannot
    be now (a full disk, a read-only or another user's store, something else under its name):
    nothing is changed then, and a later writer or gc tries again."""
    if held(store) >= SIZE:
        return True
    fd = _open(store, os.O_CREAT)
    if fd < 0:
        return False
    try:
        try:
            os.posix_fallocate(fd, 0, SIZE)
        except OSError as exc:
            # all or nothing: a part allocated on a disk that filled meanwhile is given back
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            # (a filesystem that cannot allocate ahead: the store works without a reserve, as
            # any older store; raising here failed every writer's store lock)
            if exc.errno in (*_NO_ROOM, *_CANNOT, errno.EROFS, errno.EIO):
                return False
            raise
        return True
    finally:
        os.close(fd)


def release(store: Store) -> bool:
    """Give the reserve's space back to the filesystem (truncate it: no directory is changed,
    which a full disk may not allow). True when that freed anything."""
    if held(store) == 0:
        return False
    fd = _open(store)
    if fd < 0:
        return False
    try:
        os.ftruncate(fd, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _open(store: Store, create: int = 0) -> int:
    """The reserve opened for writing (made with `create`=O_CREAT), or -1 where it cannot be:
    EROFS (a session, a read-only mount), EACCES (a shared store), or anything but a regular
    file under its name (a link is not followed, a FIFO not waited on)."""
    try:
        return files.open_regular(NAME, os.O_WRONLY | create, 0o600, dir_fd=store.fd)
    except (OSError, files.NotRegular):
        return -1


def freeing(store: Store, attempt: Callable[[], _T]) -> _T:
    """Run `attempt`, a commit that frees space in the store or lets gc free it. When it meets
    a full disk (STORE_FULL, nothing committed), give the reserve up and run it once more; then
    make the reserve whole again if there is room (else the next writer or gc does)."""
    try:
        return attempt()
    except VeloError as exc:
        if exc.reason is not Reason.STORE_FULL or not release(store):
            raise
    try:
        return attempt()
    finally:
        ensure(store)


def status(store: Store) -> dict[str, object]:
    """What `doctor` says of the reserve: `state` "present" (whole), "missing" (none, or given
    up and not yet made again: why in `reason`) or "unsupported" (this filesystem cannot
    allocate space ahead: a full disk cannot be freed by `refs --delete` then), the `bytes` it
    holds, and a `hint` (None when present). Nothing in the store is changed: whether it could
    be made is tried on an unnamed file in the store's tmp/, gone when closed."""
    have = held(store)
    out: dict[str, object] = {"state": "present", "bytes": have, "reason": "", "hint": None}
    if have >= SIZE:
        out["reason"] = f"{SIZE >> 10} KiB kept for commits that free space on a full disk"
        return out
    out["state"] = "missing"
    err = _try_allocate(store)
    if err is None or err in _NO_TMPFILE:
        out["reason"] = "not made yet (a store made by an older veloverlay, or given up)"
        out["hint"] = "the next writer makes it: 'veloverlay gc' does"
    elif err in _NO_ROOM:
        out["reason"] = f"cannot be made: the disk is full ({errno.errorcode.get(err, err)})"
        out["hint"] = (
            "free space on the store's filesystem outside the store; until then, "
            "'veloverlay refs --delete REF' may fail with store-full"
        )
    elif err in _CANNOT:
        out["state"] = "unsupported"
        out["reason"] = (
            "cannot be made: this filesystem cannot allocate space ahead "
            f"(fallocate: {errno.errorcode.get(err, err)})"
        )
        out["hint"] = (
            "keep room free on the store's filesystem: on a full disk here, "
            "'veloverlay refs --delete REF' may fail with store-full"
        )
    else:
        out["reason"] = f"cannot be made here: {os.strerror(err)}"
        out["hint"] = "a writer who may write the store makes it (its owner)"
    return out


def _try_allocate(store: Store) -> int | None:
    """None if `SIZE` bytes can be allocated in the store now, else the errno that says why."""
    try:
        fd = os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=store.tmp_fd())
    except OSError as exc:  # (no O_TMPFILE here: not tried, never a "cannot")
        err = exc.errno or 0
        return -err if -err in _NO_TMPFILE else err
    try:
        os.posix_fallocate(fd, 0, SIZE)
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
    return None
