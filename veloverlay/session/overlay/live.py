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

from veloverlay import paths
from veloverlay.session.overlay.harvest import is_whiteout
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind

__all__ = ["upper_changes", "upper_changes_raw"]


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

        def walk(dirpath: bytes, rel: bytes, new: bool) -> None:
            try:
                names = sorted(os.listdir(dirpath))
            except OSError:  # gone meanwhile (the session ended), or unreadable
                return
            dfd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for name in names:
                    p = paths.join(rel, name)
                    try:
                        st = os.lstat(os.path.join(dirpath, name))
                    except OSError:
                        continue
                    if is_whiteout(st, dfd, name, prefix):
                        out.append(("D", p))
                        continue
                    low = None if new else m.lookup(txn, view_root, p)
                    if low is not None and low.kind is Kind.MASK:
                        low = None
                    if stat.S_ISDIR(st.st_mode):
                        here = os.path.join(dirpath, name)
                        if prefix == "trusted" and _xattr(here, "trusted.overlay.redirect"):
                            out.append(("T" if low is not None else "A", p))
                            continue
                        opaque = _xattr(here, f"{prefix}.overlay.opaque") == b"y"
                        if low is None or low.kind is not Kind.DIR or opaque:
                            if low is not None:
                                out.append(("D" if low.kind is Kind.DIR else "T", p))
                            walk(os.path.join(dirpath, name), p, True)
                            if not _has_entries(os.path.join(dirpath, name)):
                                out.append(("A", p))
                        else:
                            walk(os.path.join(dirpath, name), p, False)
                    elif low is None:
                        out.append(("A", p))
                    elif low.kind is Kind.DIR or (low.kind is Kind.SYMLINK) != stat.S_ISLNK(
                        st.st_mode
                    ):
                        out.append(("T", p))
                    else:
                        out.append(("M", p))
            finally:
                os.close(dfd)

        walk(os.fsencode(upper), b"", False)
    out.sort(key=lambda c: c[1])
    return out


def _xattr(path: bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _has_entries(path: bytes) -> bool:
    try:
        return bool(os.listdir(path))
    except OSError:
        return False
