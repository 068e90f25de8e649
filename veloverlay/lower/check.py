"""fsck of cached lower layers: every stack (`stacks/<form>-<root>.json`, in the store and in this
user's per-boot cache) must show exactly the tree its manifest root names.

The layers of a stack are merged as overlayfs merges them (bottom first; a whiteout — a 0/0
character device, or a zero-size file with `user.overlay.whiteout` — removes a name and what was
below it; a directory marked `user.overlay.opaque=y` hides what was below it), and the result is
compared with the manifest: the same names, kinds, permission bits, file sizes and symlink
targets (a Tier-1 file is a symlink to its object). A file planted in a cached layer, or one
removed from it, is a `layer-mismatch` naming the stack and the path. Modification times are not
compared (the links form normalises them).

Names and sizes are not enough: what a file shows must be its object's bytes too. A metadata
file (metacopy) must redirect to its own object in the data-only layer (the same inode: an
`ids-v1/` name is a hard link of it), a file with its own bytes (a proxy of the links form, a copy
in a delta layer) must hash to its digest, and a Tier-1 link must lead to its object's inode.
Otherwise every later session of that version shows bytes no manifest holds (P0-b). What its
owner cannot read (a 000 file, root-free) is left unchecked, as unreadable directories are.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from veloverlay import _libc
from veloverlay.files import DIRFLAGS, read_regular
from veloverlay.lower.homes import ids_dir, layer_homes
from veloverlay.store.cas import Store
from veloverlay.store.digest import hash_fd
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind

__all__ = ["verify_layers"]

_PREFIXES = ("user", "trusted")  # userxattr layers, and root-native ones
View = dict[bytes, tuple[str, int, object]]  # path -> (kind, permission bits, size | target)


def _xattr(dfd: int, name: bytes, marker: str) -> bytes | None:
    """The overlay `marker` (e.g. "whiteout") of the entry `name` of `dfd`, under either
    prefix, None when absent or unreadable."""
    for prefix in _PREFIXES:
        try:
            return _libc.getxattr_at(dfd, name, f"{prefix}.overlay.{marker}")
        except OSError:
            continue
    return None


def _drop_below(view: View, rel: bytes) -> None:
    prefix = rel + b"/"
    for p in [p for p in view if p.startswith(prefix)]:
        del view[p]


class _Merge:
    """Merge layers into `view`, bottom first, walking each by directory descriptors (never
    by a full path: a layer's full paths reach past PATH_MAX, and xattrs are read relative to a
    directory's descriptor, `_libc.getxattr_at`). The directories whose entries cannot be read
    here (a tree's 000 or 0600 directories, to their root-free owner) go into `unseen`: they are
    never opened up (a session may use the layer meanwhile), and nothing below them can be
    checked. Each
    file and symlink with an object in `digests` gets in `why` what is wrong with what it shows
    (`_Contents`; None: nothing), from the layer that shows it."""

    def __init__(self, contents: _Contents, digests: dict[bytes, bytes]) -> None:
        self.contents, self.digests = contents, digests
        self.view: View = {}
        self.unseen: set[bytes] = set()
        self.why: dict[bytes, str | None] = {}

    def layer(self, layer: Path) -> None:
        try:
            top = os.open(os.fsencode(layer), DIRFLAGS)
        except OSError:
            self.unseen.add(b"")
            return
        try:
            self._dir(top, b"")
        finally:
            os.close(top)

    def _dir(self, dfd: int, rel_dir: bytes) -> None:  # (trees are at most DEPTH_MAX deep)
        try:
            names = [os.fsencode(n) for n in os.listdir(dfd)]
        except OSError:
            self.unseen.add(rel_dir)
            return
        view = self.view
        for name in names:
            rel = rel_dir + b"/" + name if rel_dir else name
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except PermissionError:  # listed, not searchable
                self.unseen.add(rel_dir)
                return
            m = st.st_mode
            whiteout = (stat.S_ISCHR(m) and st.st_rdev == 0) or (
                stat.S_ISREG(m) and st.st_size == 0 and _xattr(dfd, name, "whiteout") is not None
            )
            if whiteout:
                view.pop(rel, None)
                _drop_below(view, rel)
                continue
            if stat.S_ISDIR(m):
                old = view.get(rel)
                if (old is not None and old[0] != "dir") or _xattr(dfd, name, "opaque") == b"y":
                    _drop_below(view, rel)
                view[rel] = ("dir", stat.S_IMODE(m) & 0o777, None)
                try:
                    sub = os.open(name, DIRFLAGS, dir_fd=dfd)
                except OSError:
                    self.unseen.add(rel)
                    continue
                try:
                    self._dir(sub, rel)
                finally:
                    os.close(sub)
                continue
            _drop_below(view, rel)
            if stat.S_ISLNK(m):
                view[rel] = ("symlink", 0, os.readlink(name, dir_fd=dfd))
            else:
                view[rel] = ("file", stat.S_IMODE(m) & 0o777, st.st_size)
            digest = self.digests.get(rel)
            if digest is not None:
                self.why[rel] = self.contents.problem(dfd, name, digest, view[rel][0])


def _below(p: bytes, dirs: set[bytes]) -> bool:
    """Is `p` strictly below one of `dirs` (b"": the layer's top)?"""
    if not dirs:
        return False
    if b"" in dirs:
        return True
    parts = p.split(b"/")
    return any(b"/".join(parts[:i]) in dirs for i in range(1, len(parts)))


def _expected(store: Store, m: Manifests, root: bytes, digests: dict[bytes, bytes]) -> View:
    """The manifest's view of `root`; `digests` gets each file's object."""
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
                digests[p] = e.digest
            else:
                out[p] = ("file", e.mode & 0o777, e.size)
                digests[p] = e.digest
    return out


def _inode(path: bytes, dfd: int | None = None) -> tuple[int, int] | None:
    try:
        st = os.stat(path, dir_fd=dfd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Contents:
    """Does a layer file show its object's bytes? (None: yes, or it cannot be told here.)"""

    def __init__(self, store: Store, data_dir: bytes) -> None:
        self.store = store
        self.data_dir = data_dir  # the data-only layer the redirects are relative to
        self.hashed: dict[tuple[int, int], bytes | None] = {}  # a proxy serves many files

    def problem(self, dfd: int, name: bytes, digest: bytes, kind: str) -> str | None:
        """What is wrong with what the entry `name` of `dfd` shows for `digest`, or None."""
        obj = _inode(self.store.object_path_b(digest))
        if kind == "symlink":  # Tier-1: the link must lead to the object itself
            if obj is None or _inode(name, dfd) == obj:
                return None  # a missing object is fsck's object-missing
            return f"leads to '{os.fsdecode(os.readlink(name, dir_fd=dfd))}', not to its object"
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            names = _libc.listxattr_at(dfd, name)
        except OSError:
            return None  # unreadable (a 000 file to its root-free owner): not checkable
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file (a device or FIFO planted in its place)"
        prefix = next((p for p in _PREFIXES if f"{p}.overlay.metacopy" in names), None)
        if prefix is not None:
            try:
                redirect: bytes | None = _libc.getxattr_at(dfd, name, f"{prefix}.overlay.redirect")
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM):
                    return None  # user xattrs of a file its owner cannot read: not checkable
                redirect = None
            if redirect is None or not redirect.startswith(b"/"):
                return "a metadata file without a redirect to its object"
            if obj is None and st.st_size:
                return None
            if _inode(self.data_dir + redirect) != obj:
                return f"redirects to '{os.fsdecode(redirect)}', not to its object"
            return None
        if st.st_size == 0:
            return None  # an empty file shows no bytes
        key = (st.st_dev, st.st_ino)
        if key not in self.hashed:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, dir_fd=dfd)
            except OSError:
                return None
            try:
                self.hashed[key] = hash_fd(fd)[0]
            except OSError:
                self.hashed[key] = None
            finally:
                os.close(fd)
        got = self.hashed[key]
        if got is None or got == digest:
            return None
        return f"its bytes hash to {got.hex()[:16]}, not to its object"


def _same(want: tuple[str, int, object], got: tuple[str, int, object]) -> bool:
    if want[0] == "symlink" and got[0] == "symlink" and isinstance(got[2], bytes):
        target = want[2]
        assert isinstance(target, bytes)
        return got[2] == target or (len(target) == 64 and got[2].endswith(target))
    return want == got


def verify_layers(
    store: Store, m: Manifests, bad: set[Path] | None = None
) -> list[tuple[str, str, str]]:
    """(kind, what, detail) for every cached stack that does not show its manifest's tree;
    `bad` gets the path of each such stack record (for `fsck --repair` to drop)."""
    findings: list[tuple[str, str, str]] = []
    if bad is None:
        bad = set()
    for home in layer_homes(store):
        # Per-boot layers redirect to object paths, the store's to their short names.
        volatile = home != store.trees
        contents = _Contents(store, os.fsencode(store.objects if volatile else ids_dir(store)))
        stacks = home / "stacks"
        try:
            records = sorted(e.path for e in os.scandir(stacks) if e.name.endswith(".json"))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # none, or the owner's (a reader of a shared store cannot look)
        for f in map(Path, records):
            try:
                data = json.loads(read_regular(f))
                root = bytes.fromhex(data["root"])
                layers = [home / "layers" / str(n) for n in data["layers"]]
            except (OSError, ValueError, KeyError, TypeError):
                findings.append(("layer-stack-unreadable", os.fspath(f), "not a stack record"))
                bad.add(f)
                continue
            if f.name != f"{data.get('form')}-{root.hex()}.json":  # what a session looks up
                named = f"the record of root {root.hex()[:16]} is under another root's name"
                findings.append(("layer-mismatch", f.name, named))
                bad.add(f)
                continue
            if not all(layer.is_dir() for layer in layers):
                continue  # a stack whose layers were pruned is rebuilt on demand, never used
            with m.read() as txn:
                if not m.has_node(txn, root):
                    continue  # a stacked view of several refs (or gone by gc): not checkable
            digests: dict[bytes, bytes] = {}
            want = _expected(store, m, root, digests)
            merged = _Merge(contents, digests)
            for layer in reversed(layers):
                merged.layer(layer)
            view, unseen = merged.view, merged.unseen
            before = len(findings)
            for p in sorted(view.keys() | want.keys()):
                if _below(p, unseen):
                    continue
                a, b = want.get(p), view.get(p)
                shown = p.decode("utf-8", "backslashreplace")
                if a is None or b is None or not _same(a, b):
                    findings.append(
                        ("layer-mismatch", f"{f.name}: {shown}", f"manifest {a}, layer {b}")
                    )
                elif p in digests:
                    why = merged.why.get(p)
                    if why is not None:
                        findings.append(("layer-mismatch", f"{f.name}: {shown}", why))
            if len(findings) > before:
                bad.add(f)
    return findings
