"""Absolute paths baked into a tree: what breaks when it is projected somewhere else.

A venv's `bin/` scripts carry `#!/orig/path/bin/python`, `pyvenv.cfg` names its home, `.pth`,
pkg-config and libtool files embed prefixes. Projected at its ingest path (the default) all of
that keeps working; projected elsewhere (`--at`), those files still point at the original path.
This module finds them, cheaply: only the top directory levels are searched, and only the file
kinds known to embed prefixes are read.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence

from veloverlay import paths
from veloverlay.errors import Reason, VeloError
from veloverlay.files import read_regular, write_json_atomic
from veloverlay.pathtrust import realpath_safe
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Kind, Op, OpKind

__all__ = [
    "alias_note",
    "carry_forward",
    "find_baked",
    "refuse_exposed_source",
    "relocation_warnings",
    "source_alias",
]

_MAX_READ = 256 * 1024
DEPTH = 3  # directory levels find_baked searches
_SUFFIXES = (b".pth", b".pc", b".la", b".cmake", b".cfg", b".sh")
_NAMES = (b"pyvenv.cfg", b"RECORD", b"direct_url.json", b"activate", b"activate.fish")


def _candidate(path: bytes) -> bool:
    parent, _, name = path.rpartition(b"/")
    return (
        name in _NAMES or name.endswith(_SUFFIXES) or parent == b"bin" or parent.endswith(b"/bin")
    )


def find_baked(
    store: Store,
    m: Manifests,
    txn: Txn,
    root: bytes,
    original: str,
    *,
    limit: int = 20,
    max_depth: int = DEPTH,
) -> tuple[int, list[str]]:
    """(count, up to `limit` paths) of files in `root` that embed the absolute path `original`
    (as a whole path component sequence: `/x/venv` matches `/x/venv/bin`, not `/x/venv2`).

    Only the top `max_depth` directory levels are searched (a venv's bin/ and pyvenv.cfg, a
    project's .venv/bin, node_modules/.bin): the check runs when a session starts, and must not
    cost a walk of a 100,000-file manifest. Well-known files are listed first."""
    needle = re.compile(re.escape(os.fsencode(original.rstrip("/"))) + rb"(?![\w.+-])")
    count = 0
    found: list[tuple[int, bytes]] = []
    stack: list[tuple[bytes, bytes, int]] = [(root, b"", 0)]
    while stack:
        digest, where, depth = stack.pop()
        for e in m.get_node(txn, digest).entries:
            path = paths.join(where, e.name)
            if e.kind is Kind.DIR:
                if depth + 1 < max_depth:
                    stack.append((e.digest, path, depth + 1))
            elif (
                e.kind is Kind.FILE
                and e.size <= _MAX_READ
                and _candidate(path)
                and needle.search(store.read_object(e.digest))
            ):
                count += 1
                found.append((0 if e.name in _NAMES else 1, path))
    found.sort()
    return count, [paths.display(p) for _rank, p in found[:limit]]


def _touches_scope(ops: list[Op], max_depth: int) -> bool:
    """Could these changes alter what find_baked sees (a candidate file or a directory within
    its depth)? Metadata-only changes never do: only contents are searched."""
    for op in ops:
        if not op.path or op.path.count(b"/") + 1 > max_depth or op.kind is OpKind.META:
            continue
        if op.kind is OpKind.DELETE or (op.entry is not None and op.entry.kind is Kind.DIR):
            return True
        if _candidate(op.path):
            return True
    return False


def cached_find_baked(
    store: Store,
    m: Manifests,
    root: bytes,
    original: str,
    *,
    ancestors: Sequence[bytes] = (),
    max_depth: int = DEPTH,
) -> tuple[int, list[str]]:
    """find_baked, computed once per (root, original path), like a lower layer; for a root
    whose ancestor's answer is cached and whose changes since touch nothing the search looks
    at, that answer is reused: a session after a commit must not pay a new search."""
    import json

    from veloverlay.store.digest import hash_bytes

    key = hash_bytes(os.fsencode(original)).hex()[:16]
    cache_dir = store.trees / "relocation"

    def load(r: bytes) -> tuple[int, list[str]] | None:
        try:
            data = json.loads(read_regular(cache_dir / f"{r.hex()}-{key}.json"))
            return int(data["count"]), [str(p) for p in data["found"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    answer = load(root)
    if answer is not None:
        return answer
    with m.read() as txn:
        for anc in ancestors:
            prior = load(anc)
            if prior is not None and not _touches_scope(m.diff(txn, anc, root), max_depth):
                answer = prior
                break
        if answer is None:
            answer = find_baked(store, m, txn, root, original, max_depth=max_depth)
    try:
        data = {"count": answer[0], "found": answer[1]}
        write_json_atomic(cache_dir / f"{root.hex()}-{key}.json", data)
    except (OSError, VeloError):
        pass  # a read-only or full store still works, it just searches again
    return answer


def carry_forward(store: Store, old: bytes, new: bytes, ops: list[Op]) -> None:
    """After a commit of `ops` (applied to root `old`, giving `new`): every answer cached for
    `old` holds for `new` when the change touches nothing find_baked looks at, so it is linked
    to `new`'s name — the next session needs neither a search nor the diff `cached_find_baked`
    would make to know that (two whole entry maps of a wide root). Best effort, like the cache."""
    if old == new or _touches_scope(ops, DEPTH):
        return
    cache_dir = store.trees / "relocation"
    prefix = f"{old.hex()}-"
    try:
        for n in os.listdir(cache_dir):
            if n.startswith(prefix):
                with contextlib.suppress(FileExistsError):
                    os.link(cache_dir / n, cache_dir / f"{new.hex()}-{n[len(prefix) :]}")
    except OSError:
        pass  # a read-only or full store still works: the next session diffs


def relocation_warnings(
    store: Store,
    m: Manifests,
    root: bytes,
    original: str | None,
    target: str,
    ancestors: list[bytes] | None = None,
) -> list[str]:
    """Projected away from where it was ingested, a tree's baked absolute paths (venv scripts,
    pyvenv.cfg, .pc files) still name the original place: say which (issue: real envs)."""
    if not original or os.path.realpath(original) == os.path.realpath(target):
        return []
    count, found = cached_find_baked(store, m, root, original, ancestors=ancestors or [])
    if not count:
        return []
    shown = ", ".join(found[:3]) + (", ..." if count > 3 else "")
    return [
        f"{count} files name the ingest path {original} ({shown}); projected at {target} "
        f"they still point there: project at {original} (the default) to keep them working"
    ]


def _inside(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/")


def source_alias(store: Store, original: str | None, target: str) -> str | None:
    """Where else an overlay session should show its projection: the ingest path, when the tree
    is projected elsewhere (`--at`) while its source is still there. Bound over the source inside
    the session's mount namespace, the paths baked into the tree (a venv's `#!` lines, its
    pyvenv.cfg) resolve to the projection, so nothing the session runs can change the source
    (issue 15). None: no source in the way, the two paths nest (one cannot hide the other), or
    the source holds the store (a store moved into it since: the projection would hide it)."""
    if not original:
        return None
    try:  # root never binds over where another user's link leads
        real = realpath_safe(original, Reason.TARGET_INVALID)
    except VeloError:
        return None
    target = os.path.realpath(target)
    sroot = os.path.realpath(store.root)
    if not os.path.isdir(real) or real == "/":
        return None
    if _inside(real, target) or _inside(target, real) or _inside(real, sroot):
        return None
    if _inside(sroot, real):
        return None
    return real


def refuse_exposed_source(
    store: Store, m: Manifests, root: bytes, original: str | None, target: str
) -> None:
    """The shim backend cannot hide a host directory: projected elsewhere while the source is
    still at its ingest path, a tree whose files name that path (a venv's scripts) would have
    programs write into the source. Refuse before anything runs, and say what to do."""
    if not original:
        return
    real = os.path.realpath(original)
    if real == os.path.realpath(target) or not os.path.isdir(real):
        return
    count, found = cached_find_baked(store, m, root, original)
    if not count:
        return
    shown = ", ".join(found[:3]) + (", ..." if count > 3 else "")
    raise VeloError(
        f"{count} files of this tree name its ingest path {original} ({shown}), where its "
        f"source still is: projected at {target} by the shim backend, programs following "
        "those paths would change the source, not the session",
        reason=Reason.BAKED_PATHS,
        hint="project at the ingest path after 'veloverlay ingest --adopt' moves the source "
        "aside, or use the overlay backend (it shows the projection at both paths)",
        path=original,
    )


def alias_note(
    store: Store,
    m: Manifests,
    root: bytes,
    original: str,
    target: str,
    ancestors: list[bytes] | None = None,
) -> list[str]:
    """What a session projected at `target` says when its ingest path `original` shows the
    projection too (source_alias): which files name that path, and that they reach the session."""
    count, found = cached_find_baked(store, m, root, original, ancestors=ancestors or [])
    if not count:
        return []
    shown = ", ".join(found[:3]) + (", ..." if count > 3 else "")
    return [
        f"{count} files name the ingest path {original} ({shown}); projected at {target}, this "
        f"session also shows the projection at {original}, so they reach it: the source there "
        "is not changed"
    ]
