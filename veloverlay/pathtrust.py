"""Whose paths root may follow: a directory on the way that another user can change (owns it,
or may write it without the sticky bit) could swap a symbolic link in at any moment, and root
would then act on what it leads to. `untrusted_on_path` judges each directory of a path,
`realpath_safe` resolves a path only where no such directory lies on the way.

A leaf: imports only the standard library and `errors`.
"""

from __future__ import annotations

import os
import stat

from veloverlay.errors import Reason, VeloError

__all__ = [
    "real_root",
    "others_can_rename",
    "untrusted_on_path",
    "realpath_safe",
    "owner_words",
    "not_yours",
]


def real_root() -> bool:
    """Whether this process acts as root outside any user namespace: its effective uid maps to
    uid 0 of the initial namespace (root of a user namespace made by another user does not)."""
    uid = os.geteuid()
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            for line in f:
                inside, outside, count = (int(x) for x in line.split())
                if inside <= uid < inside + count:
                    return outside + uid - inside == 0
    except (OSError, ValueError):
        pass
    return uid == 0  # no /proc: this process's own word


_MAX_LINKS = 40  # as the kernel's path walk


def _writable_by_others(path: str, st: os.stat_result) -> bool:
    """Whether users other than the owner (and root) may add, remove or rename entries of the
    directory `path`: world-writable, or group-writable by a group other than root's, or by
    whoever an access ACL names (the group bits are then the ACL's mask)."""
    if st.st_mode & stat.S_IWOTH:
        return True
    if not st.st_mode & stat.S_IWGRP:
        return False
    if st.st_gid != 0:
        return True
    try:
        os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    except OSError:
        return False  # no ACL (ENODATA), or a filesystem without them
    return True


def _judge_dir(path: str, st: os.stat_result, trusted: set[int]) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in trusted:
        return f"{path} belongs to uid {st.st_uid}"
    if not st.st_mode & stat.S_ISVTX and _writable_by_others(path, st):
        mode = stat.S_IMODE(st.st_mode)
        return f"{path} is writable by others than its owner (mode {mode:04o}, group {st.st_gid})"
    return None


def others_can_rename(path: str, st: os.stat_result) -> bool:
    """Whether a user other than this one and root may rename entries of the directory `path`
    (`st`: its stat): its owner is another user, or others may write it without the sticky bit.
    Such a user can give any directory in it (one of ours they cannot empty) any name there."""
    return _judge_dir(path, st, {os.geteuid(), 0}) is not None


def untrusted_on_path(path: str | os.PathLike[str], trusted: set[int]) -> tuple[str, str | None]:
    """Walk the absolute `path` one component at a time, as the kernel resolves it (symbolic
    links followed), and say whether anyone but the users `trusted` could change where it
    leads: (its real path, None), or (the component at fault, why).

    Every directory looked into must belong to a trusted user and be writable by nobody else
    (group-writable only by root's group, with no ACL), except a sticky one (/tmp, /dev/shm),
    whose entry the walk takes must then belong to a trusted user (its owner alone may rename
    or remove it). Every symbolic link followed must belong to a trusted user. The last
    component itself is not judged (only its link, if it is one, and its owner in a sticky
    directory): its caller knows what it needs of it. The walk stops at the first component
    that does not exist (nothing below it can be judged yet)."""
    text = os.fspath(path)
    if not text.startswith("/"):
        raise ValueError(f"not an absolute path: {text}")
    todo = [c for c in reversed(text.split("/")) if c not in ("", ".")]
    cur = "/"
    st = os.lstat(cur)
    why = _judge_dir(cur, st, trusted) if todo else None
    if why is not None:
        return cur, why
    sticky = [bool(st.st_mode & stat.S_ISVTX)]  # per directory of `cur`, from / down
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            if cur != "/":
                cur = os.path.dirname(cur)
                sticky.pop()
            continue
        child = os.path.join(cur, name)
        try:
            st = os.lstat(child)
        except FileNotFoundError:
            return child, None
        if sticky[-1] and st.st_uid not in trusted:
            return child, (
                f"{child} belongs to uid {st.st_uid}, in the sticky directory {cur} "
                "(its owner may rename or replace it)"
            )
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in trusted:
                return child, f"{child} is a symbolic link that belongs to uid {st.st_uid}"
            links += 1
            if links > _MAX_LINKS:
                return child, f"{text}: too many levels of symbolic links"
            target = os.readlink(child)
            todo.extend(c for c in reversed(target.split("/")) if c not in ("", "."))
            if target.startswith("/"):
                cur, sticky = "/", sticky[:1]
            continue
        cur = child
        if not todo:
            break
        why = _judge_dir(cur, st, trusted)
        if why is not None:
            return cur, why
        sticky.append(bool(st.st_mode & stat.S_ISVTX))
    return cur, None


def realpath_safe(path: str | os.PathLike[str], reason: Reason) -> str:
    """`os.path.realpath(path)`, except that root refuses (VeloError with `reason`) to follow a
    symbolic link that belongs to another user into a directory that user does not own: a link
    of alice's in her home that leads to /etc would have root mount, write, bind or rename
    there (systemd's CHASE_SAFE rule; a link of root's, or one to its owner's own files, is
    followed). A change made after this resolution is for the caller to catch (it works on
    descriptors from here: `mount.pin_dir`); this judges what is on the path now."""
    text = os.path.abspath(os.fspath(path))
    real = os.path.realpath(text)
    if os.geteuid() != 0:
        return real
    todo = [c for c in reversed(text.split("/")) if c not in ("", ".")]
    cur, hops = "/", 0
    while todo:
        name = todo.pop()
        if name == "..":
            cur = os.path.dirname(cur)
            continue
        child = os.path.join(cur, name)
        try:
            st = os.lstat(child)
        except OSError:
            break  # nothing below a missing component is followed
        if not stat.S_ISLNK(st.st_mode):
            cur = child
            continue
        hops += 1
        dest = os.path.realpath(child)
        owner = _owner_of_nearest(dest)
        if st.st_uid != 0 and st.st_uid != owner:
            raise VeloError(
                f"{child} is a symbolic link of uid {st.st_uid} to {dest}, which belongs to "
                f"uid {owner}: root does not follow another user's link there",
                reason=reason,
                hint=f"name the place itself ({dest}) if that is what you mean",
                path=child,
            )
        if hops > 40:  # a loop: realpath gave up on it too, and opening it will say so
            break
        cur = dest
    return real


def _owner_of_nearest(path: str) -> int:
    """The owner of `path`, or of its nearest existing ancestor."""
    while True:
        try:
            return os.lstat(path).st_uid
        except OSError:
            if path == "/":
                return 0
            path = os.path.dirname(path)


def owner_words(uid: int) -> str:
    """A user as messages name one: 'uid 1501 (bob)', or 'uid 1501' without a name."""
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, OSError):
        return f"uid {uid}"


def not_yours(path: str | os.PathLike[str]) -> str | None:
    """When `path` (or, when it does not exist, the nearest directory above it that does) is
    another user's and this user may not write it: why, naming it and its owner, for an error
    that must say more than "Operation not permitted". None otherwise."""
    if os.geteuid() == 0:
        return None
    want = os.path.abspath(path)
    here = want
    while True:  # up to the nearest place this user can see (one it cannot enter hides more)
        try:
            st = os.lstat(here)
            break
        except (FileNotFoundError, PermissionError):
            parent = os.path.dirname(here)
            if parent == here:
                return None
            here = parent
        except OSError:
            return None
    if st.st_uid == os.geteuid():
        return None
    whose = owner_words(st.st_uid)
    if here == want:
        if stat.S_ISDIR(st.st_mode):
            return f"{here} is a directory of {whose}"
        return f"{here} belongs to {whose}"
    if not os.access(here, os.X_OK):
        return f"{here} is a directory of {whose} that you cannot enter"
    if os.access(here, os.W_OK):
        return None
    return f"{here}, where it would be made, is a directory of {whose} that you cannot write"
