"""Build directory trees from a spec and compare two trees the way the manifest models them.

Compared: the set of paths, kinds, file bytes, permission bits, mtimes (ns, for files, dirs and
symlinks), symlink targets, empty directories. Not compared — not modelled in v1, and excluded on
purpose: owners, xattrs, hard-link identity, atimes/ctimes, special files.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    kind: str  # file | dir | symlink
    mode: int
    mtime_ns: int | None
    data: bytes | None  # file content or symlink target


def snapshot(
    root: str | bytes, *, mtimes: bool = True, dir_mtimes: bool = True
) -> dict[bytes, Item]:
    root_b = os.fsencode(root)
    out: dict[bytes, Item] = {}
    st = os.lstat(root_b)
    out[b""] = Item("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns if dir_mtimes else None, None)
    for dirpath, dirnames, filenames in os.walk(root_b):
        rel_dir = os.path.relpath(dirpath, root_b)
        rel_dir = b"" if rel_dir == b"." else rel_dir
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.join(rel_dir, name) if rel_dir else name
            st = os.lstat(p)
            m = st.st_mode
            if stat.S_ISDIR(m):
                out[rel] = Item(
                    "dir", stat.S_IMODE(m), st.st_mtime_ns if dir_mtimes else None, None
                )
            elif stat.S_ISLNK(m):
                out[rel] = Item("symlink", 0, st.st_mtime_ns if mtimes else None, os.readlink(p))
            elif stat.S_ISREG(m):
                with open(p, "rb") as f:
                    data = f.read()
                out[rel] = Item("file", stat.S_IMODE(m), st.st_mtime_ns if mtimes else None, data)
        # os.walk lists symlinks to dirs in dirnames but does not descend: fine.
    return out


def diff_snapshots(a: dict[bytes, Item], b: dict[bytes, Item]) -> list[str]:
    problems = []
    for p in sorted(a.keys() | b.keys()):
        x, y = a.get(p), b.get(p)
        if x != y:
            problems.append(f"{p!r}: {x} != {y}")
    return problems


def leaf_changes(a: dict[bytes, Item], b: dict[bytes, Item]) -> set[tuple[str, str]]:
    """What turned snapshot `a` into `b`, as `veloverlay diff` and a session's end line tell it:
    (status, path) per file, symlink or empty directory added (A), deleted (D), changed in content
    or mode (M) or kind (T); a directory's mode change is M. Mtimes alone are no change."""

    def leaves(s: dict[bytes, Item]) -> set[bytes]:
        parents = {os.path.dirname(p) for p in s if p}
        return {p for p, it in s.items() if p and (it.kind != "dir" or p not in parents)}

    out: set[tuple[str, str]] = set()
    la, lb = leaves(a), leaves(b)
    for p in sorted(a.keys() | b.keys()):
        x, y = a.get(p), b.get(p)
        name = os.fsdecode(p)
        if x is not None and y is not None:
            if x.kind != y.kind and "dir" not in (x.kind, y.kind):
                out.add(("T", name))
            elif x.kind == y.kind and (x.mode, x.data) != (y.mode, y.data):
                out.add(("M", name))
            elif x.kind == y.kind or p not in la | lb:
                continue
        if x is not None and p in la and (y is None or y.kind != x.kind):
            out.add(("D", name))
        if y is not None and p in lb and (x is None or y.kind != x.kind):
            out.add(("A", name))
    return out


def assert_same_tree(a: str | bytes, b: str | bytes, **kw: bool) -> None:
    problems = diff_snapshots(snapshot(a, **kw), snapshot(b, **kw))
    assert not problems, "trees differ:\n" + "\n".join(problems[:20])


def make_tree(root: str, spec: dict[str, object]) -> None:
    """spec: path -> bytes (file), None (dir), ("link", target) (symlink)."""
    os.makedirs(root, exist_ok=True)
    for path, what in spec.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if what is None:
            os.makedirs(full, exist_ok=True)
        elif isinstance(what, tuple):
            os.symlink(what[1], full)
        else:
            assert isinstance(what, bytes)
            with open(full, "wb") as f:
                f.write(what)


def force_rmtree(path: str | bytes) -> None:
    """Remove `path` whatever its modes (the product's files.force_rmtree: 0555 dirs, 0000
    files, overlay's work/work) and immutable flags (stores under test set +i), as root or as the
    tree's owner. Symlinks are never followed."""
    from veloverlay import files, fsflags

    files.force_rmtree(os.fsdecode(path), unflag=fsflags.make_mutable)


def has_immutable(path: str | os.PathLike[str]) -> bool:
    """Whether `path` carries +i; False where its filesystem has no inode flags (ENOTTY or
    EOPNOTSUPP: tmpfs before Linux 6.0), which holds no flag to clear either."""
    import errno

    from veloverlay import fsflags

    try:
        return fsflags.is_immutable(os.fspath(path))
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            return False
        raise


def unprotect(path: str | os.PathLike[str]) -> None:
    """Clear +i (root's objects carry it where the filesystem has inode flags) so that a test
    may damage an object as an attacker with root would."""
    from veloverlay import fsflags

    if has_immutable(path):
        fsflags.set_immutable(os.fspath(path), False)


def inode_flags_at(path: str | os.PathLike[str]) -> bool:
    """Whether the filesystem holding `path` has inode flags (chattr)."""
    import errno

    from veloverlay import _libc

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _libc.ioctl_getflags(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        os.close(fd)
    return True


def settle_ctimes(root: str | bytes) -> None:
    """Wait until every change below `root` is older than ingest's racy window, where that
    window counts ctime: on a filesystem whose ctime is as coarse as the clock's tick
    (`dirfd.coarse_ctime`: ramfs, and every filesystem before Linux 6.13's multigrain
    timestamps), a file whose mtime a test set back still has a ctime of now, and the stat
    cache rightly does not trust it for RACY_NS. Elsewhere it returns at once. The wait is for
    the clock to pass a known instant, not for something to happen."""
    import time
    from pathlib import Path

    from veloverlay import _libc
    from veloverlay.ingest.dirfd import coarse_ctime
    from veloverlay.ingest.source import RACY_NS

    if not coarse_ctime(_libc.statfs_type(Path(os.fsdecode(root)))):
        return
    newest = os.lstat(root).st_ctime_ns
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_ctime_ns)
    while (left := newest + RACY_NS - time.time_ns()) > 0:
        time.sleep(left / 1e9 + 0.01)
