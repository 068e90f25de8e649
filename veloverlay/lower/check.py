"""fsck of cached lower layers: every stack (`stacks/<form>-<root>.json`, in the store and in this
user's per-boot cache) must show exactly the tree its manifest root names.

The layers of a stack are merged as overlayfs merges them (bottom first; a whiteout — a 0/0
character device, or a zero-size file with `user.overlay.whiteout` — removes a name and what was
below it; a directory marked `user.overlay.opaque=y` hides what was below it), and the result is
compared with the manifest: the same names, kinds, permission bits, file sizes and symlink
targets (a Tier-1 file is a symlink to its object). A file planted in a cached layer, or one
removed from it, is a `layer-mismatch` naming the stack and the path. Modification times are not
compared (the links form normalises them).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from veloverlay.lower.homes import layer_homes
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind

__all__ = ["verify_layers"]

_WHITEOUT = "user.overlay.whiteout"
_OPAQUE = "user.overlay.opaque"
View = dict[bytes, tuple[str, int, object]]  # path -> (kind, permission bits, size | target)


def _xattr(path: bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _drop_below(view: View, rel: bytes) -> None:
    prefix = rel + b"/"
    for p in [p for p in view if p.startswith(prefix)]:
        del view[p]


def _merge_layer(view: View, layer: Path, unseen: set[bytes]) -> None:
    """Merge `layer` into `view`; the directories whose entries cannot be read here (a tree's
    000 or 0600 directories, to their root-free owner) go into `unseen`: they are never opened
    up (a session may use the layer meanwhile), and nothing below them can be checked."""
    top = os.fsencode(layer)

    def unlisted(exc: OSError) -> None:
        base = os.path.relpath(os.fsencode(exc.filename), top)
        unseen.add(b"" if base == b"." else base)

    for dirpath, dirnames, filenames in os.walk(top, onerror=unlisted):
        base = os.path.relpath(dirpath, top)
        rel_dir = b"" if base == b"." else base
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.join(rel_dir, name) if rel_dir else name
            try:
                st = os.lstat(full)
            except PermissionError:  # listed, not searchable
                unseen.add(rel_dir)
                dirnames[:] = []
                break
            m = st.st_mode
            whiteout = (stat.S_ISCHR(m) and st.st_rdev == 0) or (
                stat.S_ISREG(m) and st.st_size == 0 and _xattr(full, _WHITEOUT) is not None
            )
            if whiteout:
                view.pop(rel, None)
                _drop_below(view, rel)
                continue
            if stat.S_ISDIR(m):
                old = view.get(rel)
                if (old is not None and old[0] != "dir") or _xattr(full, _OPAQUE) == b"y":
                    _drop_below(view, rel)
                view[rel] = ("dir", stat.S_IMODE(m) & 0o777, None)
            elif stat.S_ISLNK(m):
                _drop_below(view, rel)
                view[rel] = ("symlink", 0, os.readlink(full))
            else:
                _drop_below(view, rel)
                view[rel] = ("file", stat.S_IMODE(m) & 0o777, st.st_size)


def _below(p: bytes, dirs: set[bytes]) -> bool:
    """Is `p` strictly below one of `dirs` (b"": the layer's top)?"""
    if not dirs:
        return False
    if b"" in dirs:
        return True
    parts = p.split(b"/")
    return any(b"/".join(parts[:i]) in dirs for i in range(1, len(parts)))


def _expected(store: Store, m: Manifests, root: bytes) -> View:
    out: View = {}
    with m.read() as txn:
        for p, e, _node in m.walk(txn, root):
            if not p or e.kind is Kind.MASK:
                continue
            if e.kind is Kind.DIR:
                out[p] = ("dir", e.mode & 0o777, None)
            elif e.kind is Kind.SYMLINK:
                out[p] = ("symlink", 0, e.target)
            elif e.tier == 1:
                out[p] = ("symlink", 0, e.digest.hex().encode())  # a link to its object
            else:
                out[p] = ("file", e.mode & 0o777, e.size)
    return out


def _same(want: tuple[str, int, object], got: tuple[str, int, object]) -> bool:
    if want[0] == "symlink" and got[0] == "symlink" and isinstance(got[2], bytes):
        target = want[2]
        assert isinstance(target, bytes)
        return got[2] == target or (len(target) == 64 and got[2].endswith(target))
    return want == got


def verify_layers(store: Store, m: Manifests) -> list[tuple[str, str, str]]:
    """(kind, what, detail) for every cached stack that does not show its manifest's tree."""
    findings: list[tuple[str, str, str]] = []
    for home in layer_homes(store):
        stacks = home / "stacks"
        try:
            records = sorted(e.path for e in os.scandir(stacks) if e.name.endswith(".json"))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # none, or the owner's (a reader of a shared store cannot look)
        for f in map(Path, records):
            try:
                data = json.loads(f.read_text())
                root = bytes.fromhex(data["root"])
                layers = [home / "layers" / str(n) for n in data["layers"]]
            except (OSError, ValueError, KeyError, TypeError):
                findings.append(("layer-stack-unreadable", os.fspath(f), "not a stack record"))
                continue
            if not all(layer.is_dir() for layer in layers):
                continue  # a stack whose layers were pruned is rebuilt on demand, never used
            with m.read() as txn:
                if not m.has_node(txn, root):
                    continue  # a stacked view of several refs (or gone by gc): not checkable
            view: View = {}
            unseen: set[bytes] = set()
            for layer in reversed(layers):
                _merge_layer(view, layer, unseen)
            want = _expected(store, m, root)
            for p in sorted(view.keys() | want.keys()):
                if _below(p, unseen):
                    continue
                a, b = want.get(p), view.get(p)
                if a is None or b is None or not _same(a, b):
                    shown = p.decode("utf-8", "backslashreplace")
                    findings.append(
                        ("layer-mismatch", f"{f.name}: {shown}", f"manifest {a}, layer {b}")
                    )
    return findings
