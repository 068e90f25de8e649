"""What a running overlay session has changed so far, read from its upper directory.

A peek for `veloverlay status` and `diff --session`: nothing is staged or committed and the
session goes on. Whiteouts are deletions; an entry the view does not have is added; any other
file or symlink in the upper dir was copied up: modified (a chmod, or an open for writing that
wrote nothing yet, counts too: the content is compared only when the session ends). A directory
counts only when it is new or replaces the view's (opaque), and then with its whole subtree; a
directory renamed in a root-native session (a redirect) counts as added, as itself. Markers are
read with the session's xattr prefix (`user`, or `trusted` root-native), as the harvester does.
"""

from __future__ import annotations

import os
import stat

from veloverlay import files, paths
from veloverlay.session.overlay.harvest import is_whiteout
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind

__all__ = ["upper_changes", "upper_changes_raw", "open_beneath"]

_DIR = files.DIRFLAGS


def open_beneath(top: bytes, parts: list[bytes]) -> int:
    """The directory `top`/`parts...`, no symlink followed below `top` (OSError ELOOP/ENOTDIR
    then, `files.open_below`): the session may swap one in while it is read."""
    fd = os.open(top, _DIR)
    if not parts:
        return fd
    try:
        return files.open_below(fd, parts)
    finally:
        os.close(fd)


def upper_changes(
    m: Manifests, upper: str, view_root: bytes, prefix: str = "user"
) -> list[tuple[str, str]]:
    """(status letter, path) for what the upper dir `upper` changes in the tree `view_root`."""
    return [(c, paths.display(p)) for c, p in upper_changes_raw(m, upper, view_root, prefix)]


def upper_changes_raw(
    m: Manifests, upper: str, view_root: bytes, prefix: str = "user"
) -> list[tuple[str, bytes]]:
    """`upper_changes` with each path as bytes, relative to the tree's root."""
    out: list[tuple[str, bytes]] = []
    with m.read() as txn:

        def walk(dfd: int, rel: bytes, new: bool) -> None:
            # By descriptors: the session writes this directory while it is read, and a name
            # listed as a directory may be a symlink by the time it is opened (never followed).
            try:
                names = sorted(os.fsencode(n) for n in os.listdir(dfd))
            except OSError:  # gone meanwhile (the session ended), or unreadable
                return
            for name in names:
                p = paths.join(rel, name)
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                if is_whiteout(st, dfd, name, prefix):
                    out.append(("D", p))
                    continue
                low = None if new else m.lookup(txn, view_root, p)
                if low is not None and low.kind is Kind.MASK:
                    low = None
                if not stat.S_ISDIR(st.st_mode):
                    if low is None:
                        out.append(("A", p))
                    elif low.kind is Kind.DIR or (low.kind is Kind.SYMLINK) != stat.S_ISLNK(
                        st.st_mode
                    ):
                        out.append(("T", p))
                    else:
                        out.append(("M", p))
                    continue
                try:
                    sub = os.open(name, _DIR, dir_fd=dfd)
                except OSError:  # replaced or removed since the listing
                    continue
                try:
                    if prefix == "trusted" and _xattr(sub, "trusted.overlay.redirect"):
                        out.append(("T" if low is not None else "A", p))
                        continue
                    opaque = _xattr(sub, f"{prefix}.overlay.opaque") == b"y"
                    if low is None or low.kind is not Kind.DIR or opaque:
                        if low is not None:
                            out.append(("D" if low.kind is Kind.DIR else "T", p))
                        walk(sub, p, True)
                        if not _has_entries(sub):
                            out.append(("A", p))
                    else:
                        walk(sub, p, False)
                finally:
                    os.close(sub)

        try:
            top = os.open(os.fsencode(upper), _DIR)
        except OSError:
            return out
        try:
            walk(top, b"", False)
        finally:
            os.close(top)
    out.sort(key=lambda c: c[1])
    return out


def _xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def _has_entries(fd: int) -> bool:
    try:
        return bool(os.listdir(fd))
    except OSError:
        return False
