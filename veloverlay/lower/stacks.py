"""Lower layers: turn a manifest root into directories an overlay can stack, cached per root.

Two forms (DESIGN.md "Projection"), chosen by the probe (`probe.lower_form`), never by version:

* **data-only** — a *metadata layer*: per Tier-2 file a sparse file of the real size with the
  manifest's mode and mtime and the xattrs `user.overlay.metacopy` (empty) and
  `user.overlay.redirect` = `/<ab>/<id>`, a path in the *data-only layer* `<store>/ids-v1/`, which
  holds a second hard link of each object under a short name (`ab` + 18 more hex digits of the
  digest = 80 bits). Redirect values stay at 22 bytes: on ext4 a value above ~24 bytes no longer
  fits in the inode and costs a 4 KiB xattr block per file (measured: 80 MB per 20,000 files with
  the 71-byte object path, 0.5 MB with the short id; the short-name hard link costs ~10 µs per
  object on first use, ~98,000/s, and a symlink in the data-only layer is not followed by
  overlayfs: ENOENT, measured). Mounted as `lowerdir=<meta>` + data-only lower `ids-v1` with
  `userxattr`. That is the form kept in the store; where a per-boot tmpfs directory is usable
  (`volatile.py`) metadata layers are built there instead — an inode on tmpfs costs a fraction
  of an ext4 one and xattr size only memory — with redirects to the full object path
  `/<ab>/<hex>` and `objects-v2` itself as the data-only lower: no short names to make.
* **links** — a tree of hard links to per-(digest, mode) *proxy* inodes in `trees-v1/proxies/`:
  copies (reflinks where the filesystem can) of the object with the entry's mode, never the 0444
  object itself (a non-root owner could not write the merged file). A proxy is shared by every
  path with that content and mode, so its mtime cannot be each path's: it is normalised to
  `PROXY_MTIME_NS` (1 s after the epoch, as Nix does), and harvest ignores that value on
  copied-up files whose content did not change. EMLINK (65,000 links on ext4) opens another proxy.

Both forms project Tier-1 entries as symlinks to their objects (absolute paths) and skip MASK
entries. When `protect` is set (real root with a working FS_IOC_SETFLAGS), every object a lower
references gets `chattr +i` after its short-name link exists (link() to a +i inode is EPERM,
measured); what was reached is returned, never assumed (P0-d).

Cost follows the change: a layer set ("stack") is cached per (form, root) in `trees-v1/stacks/`.
For a new root whose ancestor (a hint) has a cached stack, only the delta is built, as a small
extra layer on top (puts as entries, deletions as whiteouts — a 0/0 char device where mknod works,
else a zero-size file with `user.overlay.whiteout` inside a directory marked `user.overlay.opaque=x`
— replaced directories as `user.overlay.opaque=y`); after `FLATTEN_AFTER` layers the root is built
whole again. Builds run under a per-(form, root) flock, into a temp dir renamed into place
(beside a layer of that name already there, never onto it: `layers.publish_layer`).

Layout under the store (a per-boot cache has the same layers/ stacks/ locks/ tmp/):
    ids-v1/<ab>/<18 hex>                       short names of objects (data-only layer)
    trees-v1/layers/<name>/                    one layer (immutable once renamed into place)
    trees-v1/stacks/<form>-<root hex>.json     the layers (top first) that project that root
                                               (<form>-trusted-...: root-native layers, whose
                                               markers are trusted.overlay.*, see layers.py),
                                               and their STACK_FORMAT: another is built again;
                                               each layer's stamp (`_stamp`): one that no longer
                                               matches is built again
    trees-v1/proxies/<ab>/<hex>-<mode>[-<n>]   proxy inodes (links form)
    trees-v1/locks/  trees-v1/tmp/
A stack is looked up in the per-boot cache, then in the store; a delta layer is only stacked on
a base in the same place; a build that fills the cache (ENOSPC) is redone in the store.

Imports the kernel modules (`fsflags`, `linking`) and the manifest layer; nothing here mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from veloverlay.errors import Reason, VeloError
from veloverlay.files import (
    flock,
    force_rmtree,
    read_regular,
    write_bytes_atomic,
    write_json_atomic,
)
from veloverlay.lower.homes import (
    FULL_ERRNOS,
    Home,
    TooBig,
    boot_home,
    data_layers,
    disk_home,
    fallback_note,
    holds_xattrs,
    ids_dir,
    planted_note,
    reap_orphans,
)
from veloverlay.lower.layers import (
    DELTA_MAX_COPY,
    DELTA_MAX_OPS,
    FORMS,
    XATTR_PREFIXES,
    clean_tmp,
    copy_bytes,
    delta_layer,
    full_layer,
    publish_layer,
)
from veloverlay.lower.objects import Objects, protect_all
from veloverlay.progress import Progress
from veloverlay.records import Record
from veloverlay.store import quarantine
from veloverlay.store.access import mkdir_nofollow
from veloverlay.store.cas import Store, object_missing
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind, Op

__all__ = ["FORMS", "FLATTEN_AFTER", "Lowers", "ensure_lowers", "ids_dir"]

FLATTEN_AFTER = 20
# The format of the layers a stack file names (its "format"; none: 1). Raised whenever a layer
# built by this code differs from what older code built for the same root: a stack of another
# format is never reused, its root is built again (beside the old layers, `publish_layer`), and
# the old layers go with the next gc that finds no unfinished session naming them (`prune`).
STACK_FORMAT = 2


class Lowers(Record, frozen=True):
    """The layers that project `root`: pass `layers` (topmost first) and `data_layers` to mount."""

    form: str
    root: bytes
    layers: tuple[str, ...]
    data_layers: tuple[str, ...]
    built: str  # "cached" | "delta" | "full"
    seconds: float
    immutable: bool  # every object these layers reference carries +i
    protection_note: str
    home: str = ""  # the directory holding layers/ and stacks/ (store or per-boot cache)
    warning: str = ""  # e.g. the per-boot cache was full and the layers went to the store


# --- stacks ------------------------------------------------------------------------------------
def _stack_path(home: Home, form: str, root: bytes) -> Path:
    return home.sub("stacks", f"{form}-{root.hex()}.json")


def _read_stack(home: Home, form: str, root: bytes) -> tuple[list[str], bool] | None:
    """(layer names top first, whether every object they reference is +i) or None."""
    try:
        data = json.loads(read_regular(_stack_path(home, form, root)))
    except (OSError, ValueError):  # (a FIFO, a directory, a link in its place: built again)
        return None
    if not isinstance(data, dict) or data.get("format", 1) != STACK_FORMAT:
        return None  # built by other code: its layers may not show this code's tree
    if data.get("root") != root.hex() or data.get("form") != form:
        return None  # another root's record under this one's name (copied, restored): its
        # layers, stamps and all, would project that other tree
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        return None
    stamps = data.get("stamps")
    if not isinstance(stamps, list) or len(stamps) != len(layers):
        return None
    base = home.sub("layers")
    for n, stamp in zip(layers, stamps, strict=True):
        if not isinstance(n, str) or _stamp(base / n) != stamp:
            return None  # gone, or replaced or changed at its top since the stack was written
    return [str(n) for n in layers], data.get("immutable") is True


def _stamp(layer: Path) -> list[int] | None:
    """What a stack records of each of its layers: the inode number and ctime of its top
    directory. A layer replaced (another directory renamed to its name, a copy restored) or
    changed at its top (an entry added, removed or renamed there; its mode or owner changed) no
    longer matches, and its stack is built again rather than mounted. A file changed in place
    further down is not seen here (`fsck` compares the layers with their manifests). Neither the
    device number, which may change at a reboot, nor anything that needs more than this one
    stat, which the warm path paid already to see that the layer is there."""
    try:
        st = os.stat(layer, follow_symlinks=False)
    except (OSError, ValueError):
        return None
    return [st.st_ino, st.st_ctime_ns] if stat.S_ISDIR(st.st_mode) else None


def _write_stack(
    home: Home, form: str, root: bytes, layers: list[str], built: str, immutable: bool
) -> None:
    path = _stack_path(home, form, root)
    with contextlib.suppress(OSError):  # a directory in the record's place (damage): no rename
        if stat.S_ISDIR(os.lstat(path).st_mode):  # can replace it; the cache is ours to mend
            force_rmtree(path)
    write_json_atomic(
        path,
        {
            "form": form,
            "format": STACK_FORMAT,
            "root": root.hex(),
            "layers": layers,
            "stamps": [_stamp(home.sub("layers", n)) for n in layers],
            "built": built,
            "immutable": immutable,
        },
    )


def ensure_lowers(
    store: Store,
    m: Manifests,
    root: bytes,
    *,
    form: str,
    protect: bool,
    hints: Iterable[bytes] = (),
    progress: Progress | None = None,
    xattr: str = "user",
    in_use: Callable[[], Iterable[str]] = tuple,
) -> Lowers:
    """The layers projecting `root` in `form`, building what is missing (locked, crash-safe).

    `hints` are roots whose layers may already exist (e.g. the ref's earlier commits, newest
    first): the first one cached is used as the base of a delta layer. Data-only layers are
    built in the per-boot directory (`volatile.py`) when there is one that holds user xattrs,
    else in the store; a stack already in the store is used as it is. `in_use`: the layers
    (paths) unfinished sessions recorded, asked only when a moved store's layers are dropped
    (`_built_here`): those stay, mounted under the sessions that run.
    """
    if form not in FORMS:
        raise VeloError(f"unknown lower form '{form}'", reason=Reason.USAGE)
    if xattr not in XATTR_PREFIXES:
        raise VeloError(f"unknown overlay xattr prefix '{xattr}'", reason=Reason.USAGE)
    t0 = time.perf_counter()
    disk = disk_home(store)
    fast = boot_home(store) if form == "data-only" else None
    homes = [fast, disk] if fast is not None else [disk]
    warning = planted_note() if form == "data-only" and fast is None else ""
    try:
        _built_here(store, homes[0], in_use)
    except (OSError, VeloError) as exc:
        if not homes[0].volatile or not _full(exc):
            raise
        warning = fallback_note(homes[0], exc)  # full: it cannot even say whose it is
        homes = [disk]
    if homes[0].volatile:
        _built_here(store, disk, in_use)
    variant = _variant(form, xattr)
    failed: list[str] = []
    built = "cached"
    found = next(((h, c) for h in homes if (c := _read_stack(h, variant, root)) is not None), None)
    if found is None or (protect and not found[1][1]):
        home = found[0] if found is not None else homes[0]
        args = (store, m, root, form, xattr, protect, hints, progress)
        try:
            home, cached, built, failed = _ensure_in(home, disk, *args)
        except (TooBig, OSError, VeloError) as exc:
            if not home.volatile or not _full(exc):
                raise
            # the per-boot cache is full (another user may have filled /dev/shm): the store
            warning = fallback_note(home, exc)
            home, cached, built, failed = _ensure_in(disk, disk, *args)
        found = home, cached
    home, (names, immutable) = found
    if built != "full":  # a full build looked at every object; a delta only at its changes
        _refuse_set_aside(store, m, root)
    if form == "data-only" and not home.volatile:
        mkdir_nofollow(ids_dir(store))
    return Lowers(
        form,
        root,
        tuple(os.fspath(home.sub("layers", n)) for n in names),
        data_layers(store, home, form),
        built,
        time.perf_counter() - t0,
        protect and immutable,
        _note(protect, failed, form),
        os.fspath(home.root),
        warning,
    )


def _refuse_set_aside(store: Store, m: Manifests, root: bytes) -> None:
    """OBJECT_MISSING for a cached stack of `root` that names an object the store lacks now:
    `fsck --repair` sets a corrupt object aside but keeps the layers a live session has
    mounted, and a later session of that version would mount them and fail at its first
    read. The objects set aside are few and listed in one directory (none, nearly always):
    only then is the tree walked."""
    lacking = quarantine.wanted(store)
    if not lacking:
        return
    with m.read() as txn:
        for _path, e, _node in m.walk(txn, root):
            if e.kind is Kind.FILE and e.digest in lacking:
                raise object_missing(e.digest)


_BUILT_FOR = "built-for"  # in a home: the objects directory its layers' Tier-1 links name


def _names_objects(mark: Path, objects: os.stat_result) -> bool:
    """Does the home's mark name this store's objects directory (the same inode: another path
    to it, through a symbolic link, names it as well)?"""
    try:
        named = read_regular(mark, 4097)
        st = os.stat(named)
    except (OSError, ValueError):  # none yet, or its directory is gone
        return False
    return (st.st_dev, st.st_ino) == (objects.st_dev, objects.st_ino)


def _built_here(store: Store, home: Home, in_use: Callable[[], Iterable[str]]) -> None:
    """Empty `home` of the layers and stacks built for a store at another path. A Tier-1 file
    is a symbolic link to its object by absolute path, so the layers of a store moved (`mv`) or
    copied with its `trees-v1/` (`cp -a`) name the objects where the store was: dangling links,
    or another store's objects (one made at the old path, or the original of a copy), read by
    every session of that version. The per-boot cache follows a moved store too (it is keyed by
    the store root's inode). Layers are a cache: they are built again from this store.

    Except the layers `in_use` names (by name: a session's recorded path may be the store's
    old one): they are mounted under sessions running since before the move, and removing them
    emptied those sessions' trees under them. No stack names them any more; gc evicts them once
    their sessions are over (`prune`)."""
    try:
        objects = os.stat(store.objects)
    except OSError:
        return  # no objects directory: no layer can name one
    mark = home.sub(_BUILT_FOR)
    if _names_objects(mark, objects):
        return
    with flock(home.sub("locks", "built-for.lock")):
        if _names_objects(mark, objects):
            return  # another session's, just now
        with contextlib.suppress(FileNotFoundError):
            force_rmtree(home.sub("stacks"))
        keep = {os.path.basename(p.rstrip("/")) for p in in_use()}
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(home.sub("layers")):
                if name not in keep:
                    force_rmtree(home.sub("layers", name))
        write_bytes_atomic(mark, os.fsencode(store.objects), 0o600)


def _full(exc: BaseException) -> bool:
    """Whether `exc` says the per-boot cache cannot take the layer (full, or too big for it)."""
    if isinstance(exc, VeloError):
        return exc.reason is Reason.STORE_FULL
    return isinstance(exc, TooBig) or (isinstance(exc, OSError) and exc.errno in FULL_ERRNOS)


def _ensure_in(
    home: Home,
    disk: Home,
    store: Store,
    m: Manifests,
    root: bytes,
    form: str,
    xattr: str,
    protect: bool,
    hints: Iterable[bytes],
    progress: Progress | None,
) -> tuple[Home, tuple[list[str], bool], str, list[str]]:
    """Under `home`'s lock for `root`: its stack, built (or made immutable) if needed, and its
    stack file written — (home used, (layers, immutable), built, failed). A per-boot cache that
    cannot hold user xattrs hands the build to `disk`. A layer built in the per-boot cache whose
    stack file could not be written (the cache filled up) is removed again: nothing refers to it."""
    variant = _variant(form, xattr)
    built = "cached"
    failed: list[str] = []
    with flock(home.sub("locks", f"{variant}-{root.hex()}.lock")):
        cached = _read_stack(home, variant, root)  # another session may have built it
        if cached is None and home.volatile and not holds_xattrs(home):
            # e.g. tmpfs before Linux 6.6: keep the layers in the store
            return _ensure_in(disk, disk, store, m, root, form, xattr, protect, hints, progress)
        if cached is None:
            layers, built, immutable, failed = _build(
                store, home, m, root, form, xattr, protect, hints, progress
            )
            try:
                _write_stack(home, variant, root, layers, built, immutable)
            except BaseException:
                if home.volatile:
                    with contextlib.suppress(OSError):
                        force_rmtree(home.sub("layers", layers[0]))
                raise
            cached = layers, immutable
        elif protect and not cached[1]:
            failed = protect_all(store, m, root, form, home)
            cached = cached[0], not failed
            _write_stack(home, variant, root, cached[0], "upgraded", cached[1])
    return home, cached, built, failed


def _build(
    store: Store,
    home: Home,
    m: Manifests,
    root: bytes,
    form: str,
    xattr: str,
    protect: bool,
    hints: Iterable[bytes],
    progress: Progress | None = None,
) -> tuple[list[str], str, bool, list[str]]:
    """Build what projects `root` in `home` (caller holds its lock): (layers, built,
    immutable, failed). A delta is only stacked on a base in the same home."""
    variant = _variant(form, xattr)
    key = f"{variant}-{root.hex()}"
    clean_tmp(home, key)
    if home.volatile:  # at each build: drop the layers of stores deleted since
        reap_orphans(home.root)
    with m.read() as txn:
        objs = Objects(store, m, txn, protect=protect, form=form, volatile=home.volatile)
        base: tuple[list[str], bool] | None = None
        base_root = b""
        for h in hints:
            if h != root and (found := _read_stack(home, variant, h)) is not None:
                base, base_root = found, h
                break
        ops: list[Op] | None = None
        if base is not None and len(base[0]) < FLATTEN_AFTER:
            ops = m.diff(txn, base_root, root)
            if len(ops) > DELTA_MAX_OPS:
                ops = None
            elif form == "data-only" and copy_bytes(m, txn, root, ops) > DELTA_MAX_COPY:
                ops = None  # cheaper to write a new metadata layer than to copy the data
        if base is not None and ops is not None:
            name = f"{key}-on-{base_root.hex()[:16]}"
            clean_tmp(home, name)
            path = delta_layer(home, m, txn, objs, form, base_root, root, ops, name, xattr=xattr)
            name = publish_layer(home, path, name)
            immutable = protect and base[1] and not objs.protect_failed
            return [name, *base[0]], "delta", immutable, objs.protect_failed
        path = full_layer(home, m, txn, objs, form, root, key, progress, xattr=xattr)
        name = publish_layer(home, path, key)
        return [name], "full", protect and not objs.protect_failed, objs.protect_failed


def _variant(form: str, xattr: str) -> str:
    """The name layers and stacks of `form` carry: root-native ones (trusted.overlay.* markers)
    are kept apart from the userxattr ones — a layer read with the other prefix loses its opaque
    markers and metacopy redirects (resurrected files, sparse zeros)."""
    return form if xattr == "user" else f"{form}-{xattr}"


def _note(protect: bool, failed: list[str], form: str) -> str:
    if not protect:
        return "objects are not immutable (chattr +i needs real root)"
    if failed:
        return "chattr +i failed for some objects: " + "; ".join(failed)
    return "every object referenced is immutable (chattr +i)"
