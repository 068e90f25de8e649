"""Shared machinery for the session tests: modes, a base tree, and a tree comparator.

Every scenario runs in a forked child: as root (mode "root") or, for mode "rootfree", in a child
that really dropped to UNPRIV_UID (tests/helpers/unpriv.py) before any namespace is made. The
store lives under an `unpriv_tmpdir()` on /dev/shm, which both identities can use.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest

from tests.helpers.trees import Item
from tests.helpers.unpriv import run_unprivileged
from veloverlay import ns, session
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.checkout import checkout
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Entry
from veloverlay.verbs.fsck import fsck

T = TypeVar("T")

OLD_NS = 1_600_000_000 * 10**9  # every base entry's mtime (2020-09-13)

# "root": real root in a user namespace (userxattr; VELO_OVERLAY_MODE=userns), "native": real
# root, root-native (trusted.overlay.*, redirect_dir=on), "rootfree": the unprivileged uid.
MODE_MARKS = {
    "root": ("root", "overlay_root"),
    "native": ("root", "overlay_native"),
    "rootfree": ("userns", "overlay_userns"),
}
FORM_MARKS = {
    ("root", "data-only"): ("data_only_root",),
    ("native", "data-only"): ("data_only_native",),
    ("rootfree", "data-only"): ("data_only_userns",),
    ("root", "links"): (),
    ("native", "links"): (),
    ("rootfree", "links"): (),
}
# The overlay mode a session of each test mode reports.
OVERLAY_MODE = {"root": "userns", "native": "native", "rootfree": "userns"}


def mode_params(*modes: str) -> list[Any]:
    return [pytest.param(m, marks=pytest.mark.needs(*MODE_MARKS[m]), id=m) for m in modes]


def mode_form_params(*, store_layers: bool = False, native: bool = False) -> list[Any]:
    """(mode, form) for root and root-free x data-only and links; with `store_layers` also
    "data-only-store": data-only layers kept in the store (short names) instead of the per-boot
    cache (`use_form` sets that up); with `native` also root's root-native overlay mode."""
    out = []
    forms = ("data-only", "links", "data-only-store") if store_layers else ("data-only", "links")
    for m in ("root", "native", "rootfree") if native else ("root", "rootfree"):
        for f in forms:
            marks = (*MODE_MARKS[m], *FORM_MARKS[(m, f.removesuffix("-store"))])
            out.append(pytest.param(m, f, marks=pytest.mark.needs(*marks), id=f"{m}-{f}"))
    return out


def use_form(form: str, *, fresh_cache: str | None = None) -> str:
    """Set this (child) process up for `form` of mode_form_params; return the lower form the
    session reports for it. `fresh_cache`: a new directory for the per-boot layer cache (as
    after a reboot: every layer is built whole)."""
    if form == "data-only-store":
        os.environ["VELO_RUNTIME_DIR"] = "off"
        form = "data-only"
    elif fresh_cache is not None:
        os.makedirs(fresh_cache, 0o700)
        os.environ["VELO_RUNTIME_DIR"] = fresh_cache
    os.environ["VELO_FORCE_LOWER"] = form
    return form


def _in_overlay_mode(overlay_mode: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    os.environ["VELO_OVERLAY_MODE"] = overlay_mode  # in the forked child only
    return fn(*args, **kw)


def as_mode(mode: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """fn in a forked child: root (userns or root-native overlay mode), or a child that dropped
    to the unprivileged uid for good."""
    if mode in ("root", "native"):
        return ns.run_in_child(_in_overlay_mode, OVERLAY_MODE[mode], fn, *args, **kw)
    return run_unprivileged(fn, *args, **kw)


BASE_FILES: dict[str, bytes] = {
    "f1": b"one\n",
    "f2": b"two\n",
    "f3": b"three three three\n",
    "f4": b"four\n",
    "f5": b"five\n",
    "f6": b"six\n",
    "f7": b"seven\n",
    "f8": b"eight\n",
    "exec.sh": b"#!/bin/sh\necho hi\n",
    "d/b": b"bee\n",
    "d/c": b"sea\n",
    "dir1/x": b"ex\n",
    "dir1/sub/y": b"why\n",
    "dir2/z": b"zed\n",
    "dir3/w": b"double-u\n",
    "model.gguf": b"GGUF weights, Tier-1 by the default rules\n",
}


# Modes as real trees have them (issue 15): every git repository has 0444 files; read-only and
# setgid directories, private files and directories. path -> (mode, content; None: a directory)
REAL_MODE_FILES: dict[str, tuple[int, bytes | None]] = {
    "ro.h": (0o444, b"#define RO 1\n"),
    "secret": (0o600, b"s3cret\n"),
    "tool": (0o755, b"#!/bin/sh\n"),
    "private/run": (0o700, b"#!/bin/sh\n"),
    "private": (0o700, None),
    "vendor/lib.h": (0o444, b"/* lib */\n"),
    "vendor": (0o555, None),
    "shared/data": (0o664, b"d\n"),
    "shared": (0o2775, None),
}


def make_base(root: str, *, real_modes: bool = False) -> None:
    os.makedirs(root)
    files = dict(BASE_FILES)
    if real_modes:
        files.update({k: v[1] for k, v in REAL_MODE_FILES.items() if v[1] is not None})
    for rel, data in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    if real_modes:  # (dict order: files before their directories)
        for rel, (mode, _data) in REAL_MODE_FILES.items():
            os.chmod(os.path.join(root, rel), mode)
    os.chmod(os.path.join(root, "exec.sh"), 0o755)
    os.chmod(os.path.join(root, "f6"), 0o640)
    os.mkdir(os.path.join(root, "emptydir"))
    os.symlink("f1", os.path.join(root, "link"))
    os.symlink("/usr/bin/env", os.path.join(root, "abs-link"))
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    os.utime(root, ns=(OLD_NS, OLD_NS))


def new_store(
    base: str,
    name: str = "t",
    *,
    real_modes: bool = False,
    modes: dict[str, int] | None = None,
    keep_setid: bool = False,
) -> tuple[Store, str]:
    """A store at base/store with ref `name` ingested from base/src (path recorded); with
    `real_modes` the tree also has REAL_MODE_FILES; `modes`: files of the tree chmod-ed so
    before the ingest (setid bits stored only with `keep_setid`)."""
    src = os.path.join(base, "src")
    make_base(src, real_modes=real_modes)
    for rel, mode in (modes or {}).items():
        os.chmod(os.path.join(src, rel), mode)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, name, jobs=1, keep_setid=keep_setid)
    finally:
        m.close()
    return store, src


def ref_entries(store: Store, name: str, paths: Iterable[str]) -> dict[str, Entry | None]:
    """The entries at `paths` (None: none there) in the head of ref `name`."""
    m = Manifests(store)
    try:
        with m.read() as txn:
            root = bytes.fromhex(m.resolve(txn, name)[1].root)
            return {p: m.lookup(txn, root, p.encode()) for p in paths}
    finally:
        m.close()


def ref_modes(store: Store, name: str, paths: Iterable[str]) -> dict[str, int]:
    """The modes of the entries at `paths` in the head of ref `name` (each must be there)."""
    got = ref_entries(store, name, paths)
    assert all(e is not None for e in got.values()), got
    return {p: e.mode for p, e in got.items() if e is not None}


def head_root(store: Store, name: str) -> bytes:
    m = Manifests(store)
    try:
        with m.read() as txn:
            _ref, c = m.resolve(txn, name)
            return bytes.fromhex(c.root)
    finally:
        m.close()


def checkout_ref(store: Store, name: str, dest: str) -> None:
    m = Manifests(store)
    try:
        with m.read() as txn:
            _ref, c = m.resolve(txn, name)
            checkout(store, m, txn, bytes.fromhex(c.root), dest)
    finally:
        m.close()


def fsck_ok(store: Store) -> list[str]:
    m = Manifests(store)
    try:
        rep = fsck(store, m, jobs=1)
        return [f"{f.kind} {f.what} {f.detail}" for f in rep.findings]
    finally:
        m.close()


def snapshot(root: str) -> dict[bytes, Item]:
    """Like tests.helpers.trees.snapshot, but reads what the owner made unreadable (mode 000
    files, 0555/000 dirs) by opening it up after recording the real mode and mtime."""
    root_b = os.fsencode(root)
    out: dict[bytes, Item] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            out[rel] = Item("dir", mode, st.st_mtime_ns, None)
            if mode & 0o500 != 0o500:
                os.chmod(path, mode | 0o700)
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), os.path.join(rel, name) if rel else name)
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = Item("symlink", 0, st.st_mtime_ns, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            if not mode & 0o400:
                os.chmod(path, mode | 0o400)
            with open(path, "rb") as f:
                out[rel] = Item("file", mode, st.st_mtime_ns, f.read())

    visit(root_b, b"")
    return out


def compare_trees(got: str, want: str, *, since_ns: int, file_mtimes: bool = True) -> list[str]:
    """Differences between two trees; mtimes must be equal unless both are recent (set 'now'
    by the operation in each tree: the two runs happen at different times)."""
    a, b = snapshot(got), snapshot(want)
    problems = []
    for p in sorted(a.keys() | b.keys()):
        x, y = a.get(p), b.get(p)
        if x is None or y is None:
            problems.append(f"{p!r}: {x} != {y}")
            continue
        if (x.kind, x.mode, x.data) != (y.kind, y.mode, y.data):
            problems.append(f"{p!r}: {x} != {y}")
            continue
        if x.kind == "file" and not file_mtimes:
            continue
        assert x.mtime_ns is not None and y.mtime_ns is not None
        both_recent = x.mtime_ns >= since_ns and y.mtime_ns >= since_ns
        if x.mtime_ns != y.mtime_ns and not both_recent:
            problems.append(f"{p!r}: mtime {x.mtime_ns} != {y.mtime_ns}")
    return problems


def hash_tree(root: str) -> dict[str, tuple[int, str, bytes]]:
    """(mode, content hash or link target, xattrs) of everything under root, for before/after."""
    out: dict[str, tuple[int, str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            try:
                xattrs = b"|".join(
                    k.encode() + b"=" + os.getxattr(p, k, follow_symlinks=False)
                    for k in sorted(os.listxattr(p, follow_symlinks=False))
                )
            except OSError:
                xattrs = b""
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            else:
                digest = ""
            out[os.path.relpath(p, root)] = (st.st_mode, digest + f"@{st.st_mtime_ns}", xattrs)
    return out


def sh(script: str, cwd: str) -> None:
    subprocess.run(["sh", "-euc", script], cwd=cwd, check=True)


def run_session(store: Store, refs: list[str], argv: list[str], **kw: Any) -> session.SessionResult:
    opts = session.SessionOptions(refs=refs, grace=kw.pop("grace", 2.0), **kw)
    return session.run(store, opts, argv)


def while_running(
    store: Store, base: str, at: str, reads: str, action: Callable[[], None]
) -> tuple[session.SessionResult | Exception, bytes, str | None]:
    """Run a session of ref `t` at `at` whose command, once its projection is up, waits for
    `action()` (run in a thread meanwhile: another session, a move, a gc), then reads `reads`
    (paths in the projection, e.g. "f1 d/b") into a file. Returns the session's result (or the
    VeloError its end raised), what the command read (its errors too), and the repr of what
    `action` raised (None). The command goes on when `action` ends, whatever it did."""
    from veloverlay.errors import VeloError

    ready, go, out = (os.path.join(base, n) for n in ("ready", "go", "out"))
    os.mkfifo(ready)
    os.mkfifo(go)
    files = " ".join(os.path.join(at, r) for r in reads.split())
    script = f"echo up > {ready}; cat {go} > /dev/null; cat {files} > {out} 2>&1"
    error: list[str] = []
    ended = threading.Event()

    def meanwhile() -> None:
        try:
            fd = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
            try:
                while not os.read(fd, 16):
                    if ended.wait(0.02):  # the session ended before its command was up
                        return
            finally:
                os.close(fd)
            action()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            error.append(repr(exc))
        finally:
            with open(go, "wb") as f:  # the command reads its projection now
                f.write(b"go\n")

    t = threading.Thread(target=meanwhile)
    t.start()
    result: session.SessionResult | Exception
    try:
        result = run_session(store, ["t"], ["sh", "-c", script], at=at)
    except VeloError as exc:
        result = exc
    finally:
        ended.set()
        t.join()
    with open(out, "rb") as f:
        seen = f.read()
    return result, seen, error[0] if error else None
