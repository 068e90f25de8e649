"""The shim session's daemon (the review's "Manifest Delta Server") and the tree sync it shares
with the end-of-session stat-diff.

`TreeSync` turns the materialised tree into path operations against a manifest root: for a set
of dirty paths (live) or for the whole tree (`b""` with SUBTREE: the final stat-diff). A file is
re-hashed only when its inode, size, mtime or ctime differ from what the cache knows (the baseline
written at materialisation; ctime catches a write whose mtime was put back); a directory is walked
only when it must be. Symlinks into this store's objects are Tier-1 files; fifos, sockets and
devices are skipped with a warning (not modelled in v1).

The daemon (`serve`, forked by the session, or `main` for `veloverlay daemon`): every TICK
seconds it reads what the shim appended to the journal, turns records into dirty paths, and
commits their current state to the session ref `REF@<session>` (stage, publish, then one LMDB
transaction: compare-and-swap on its own last head). Paths opened for writing stay "hot" for a
while and are re-stat-ed each tick, so a file written through an fd the kernel closed (exit) still
reaches the live view. A unix socket takes live check-ins: the peer's uid (SO_PEERCRED) must be
the session's, frames are at most 4 KiB (a longer one closes the connection), a silent peer is
dropped after a second. The daemon is never on a program's path: if it dies the journal keeps
growing and the final stat-diff loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import stat
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import paths, records, tree
from .cas import Stage, Store
from .digest import hash_fd
from .harvest import StoreLinks, leaf_op, other_leaf
from .manifest import Manifests, Txn
from .materialize import Baseline
from .projection import PROXY_MTIME_NS
from .records import field
from .shim import JournalReader, Record, RecType
from .tiers import Rules
from .tree import Entry, Kind, Node, Op, OpKind

__all__ = ["TreeSync", "SELF", "SUBTREE", "dirty_paths", "serve", "main", "TICK", "read_state"]

SELF = 1
SUBTREE = 2
TICK = 0.15
HOT_SECONDS = 10.0
FRAME_MAX = 4096
_CHECKIN_MAGIC = 0x314B4356  # "VCK1"
_CHECKIN = struct.Struct("<IIiiII")
_DIRFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_CREAT = os.O_CREAT


class Unstable(Exception):
    """A file kept changing while it was read (a writer is still at it): try next tick."""


class SyncResult(records.Record):
    ops: list[Op] = field(default_factory=list)
    nodes: dict[bytes, bytes] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    retry: set[bytes] = field(default_factory=set)  # dirty paths to look at again
    files_hashed: int = 0


class TreeSync:
    """Compare the materialised tree at `top` with manifest roots."""

    def __init__(
        self,
        store: Store,
        m: Manifests,
        top: bytes,
        baseline: Baseline,
        rules: Rules,
        *,
        link: bool,
        racy_ns: int = 0,
    ) -> None:
        self.store = store
        self.m = m
        self.top = top.rstrip(b"/") or b"/"
        self.cache = dict(baseline.by_ino)
        self.rules = rules
        self.link = link
        # Files hashed here are cached only when their ctime is older than this margin: a write
        # within the same coarse clock tick would not move ctime (git's "racy clean" rule).
        self.racy_ns = racy_ns
        self.links = StoreLinks(store)
        self._txn: Txn = None
        self._root = b""

    # -- paths
    def rel(self, path: bytes) -> bytes | None:
        """Manifest path of an absolute path, or None when it is outside the tree."""
        if path == self.top:
            return b""
        prefix = self.top + b"/" if self.top != b"/" else b"/"
        if not path.startswith(prefix):
            return None
        rel = path[len(prefix) :]
        try:
            paths.split(rel)
        except Exception:  # noqa: BLE001 - not a manifest path: the caller re-scans its parent
            return None
        return rel

    def _walk_to_parent(self, rel: bytes) -> tuple[int, bytes] | None:
        """An fd of rel's parent, reached without following any symlink; None if not there."""
        fd = os.open(self.top, _DIRFLAGS)
        names = paths.split(rel)
        try:
            for name in names[:-1]:
                nfd = os.open(name, _DIRFLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
                return None
            raise
        return fd, names[-1]

    # -- the comparison
    def sync(self, txn: Txn, root: bytes, dirty: dict[bytes, int], stage: Stage) -> SyncResult:
        res = SyncResult()
        self._txn = txn
        self._root = root
        done: list[bytes] = []  # paths replaced or deleted whole: skip what lies below
        subtrees = sorted(p for p, f in dirty.items() if f & SUBTREE)
        for p in sorted(dirty):
            if _below_any(p, subtrees, strict=True) or _below_any(p, done, strict=False):
                continue
            try:
                replaced = self._sync_path(txn, root, p, dirty[p], stage, res)
            except Unstable:
                res.retry.add(p)
                continue
            if replaced:
                done.append(p)
                done.sort()
        return res

    def _sync_path(
        self, txn: Txn, root: bytes, p: bytes, flags: int, stage: Stage, res: SyncResult
    ) -> bool:
        if p == b"":
            fd = os.open(self.top, _DIRFLAGS)
            try:
                st = os.fstat(fd)
                node = self.m.get_node(txn, root)
                self._dir_meta(b"", st, node, res)
                if flags & SUBTREE:
                    self._compare_dir(fd, b"", node, stage, res)
            finally:
                os.close(fd)
            return False
        low = self.m.lookup(txn, root, p)
        if low is not None and low.kind is Kind.MASK:
            low = None
        where = self._walk_to_parent(p)
        if where is None:
            if low is not None:
                res.ops.append(Op(OpKind.DELETE, p))
                return True
            return False
        dfd, name = where
        try:
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                if low is not None:
                    res.ops.append(Op(OpKind.DELETE, p))
                    return True
                return False
            return self._compare_one(dfd, name, st, p, low, flags, stage, res)
        finally:
            os.close(dfd)

    def _compare_one(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        p: bytes,
        low: Entry | None,
        flags: int,
        stage: Stage,
        res: SyncResult,
    ) -> bool:
        """Compare one existing name; True when the path was replaced whole (PUT/DELETE)."""
        if stat.S_ISDIR(st.st_mode):
            with _opened_dir(dfd, name, st) as cfd:
                if low is not None and low.kind is Kind.DIR:
                    child = self.m.get_node(self._txn, low.digest)
                    self._dir_meta(p, st, child, res)
                    if flags & SUBTREE:
                        self._compare_dir(cfd, p, child, stage, res)
                    return False
                res.ops.append(Op(OpKind.PUT, p, self._new_dir(cfd, name, st, p, stage, res)))
                return True
        entry = self._leaf(dfd, name, st, p, low, stage, res)
        if entry is None:
            if low is not None:
                res.ops.append(Op(OpKind.DELETE, p))
                return True
            return False
        op = leaf_op(p, low, entry)
        if op is not None:
            res.ops.append(op)
        return op is not None and op.kind is OpKind.PUT

    @staticmethod
    def _dir_meta(p: bytes, st: os.stat_result, node: Node, res: SyncResult) -> None:
        mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
        if (mode, mtime) != (node.mode, node.mtime_ns):
            res.ops.append(Op(OpKind.META, p, mode=mode, mtime_ns=mtime))

    def _compare_dir(self, dfd: int, rel: bytes, node: Node, stage: Stage, res: SyncResult) -> None:
        on_disk = {os.fsencode(n) for n in os.listdir(dfd)}
        known = {e.name: e for e in node.entries if e.kind is not Kind.MASK}
        for name in sorted(on_disk | known.keys()):
            p = paths.join(rel, name)
            low = known.get(name)
            if name not in on_disk:
                res.ops.append(Op(OpKind.DELETE, p))
                continue
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                if low is not None:
                    res.ops.append(Op(OpKind.DELETE, p))
                continue
            try:
                self._compare_one(dfd, name, st, p, low, SUBTREE, stage, res)
            except Unstable:
                res.retry.add(p)

    def _new_dir(
        self, dfd: int, name: bytes, st: os.stat_result, rel: bytes, stage: Stage, res: SyncResult
    ) -> Entry:
        entries: list[Entry] = []
        for child in sorted(os.fsencode(n) for n in os.listdir(dfd)):
            p = paths.join(rel, child)
            try:
                cst = os.lstat(child, dir_fd=dfd)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(cst.st_mode):
                with _opened_dir(dfd, child, cst) as cfd:
                    entries.append(self._new_dir(cfd, child, cst, p, stage, res))
                continue
            e = self._leaf(dfd, child, cst, p, None, stage, res)
            if e is not None:
                entries.append(e)
        digest, data = tree.encode(stat.S_IMODE(st.st_mode), st.st_mtime_ns, entries)
        res.nodes[digest] = data
        return Entry(name, Kind.DIR, digest=digest)

    def _leaf(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        p: bytes,
        low: Entry | None,
        stage: Stage,
        res: SyncResult,
    ) -> Entry | None:
        if stat.S_ISREG(st.st_mode):
            return self._file(dfd, name, st, p, low, stage, res)
        return other_leaf(
            self.links,
            self.m,
            self._txn,
            self._root,
            self.rules,
            dfd,
            name,
            st,
            p,
            low,
            res.warnings,
        )

    def _file(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        p: bytes,
        low: Entry | None,
        stage: Stage,
        res: SyncResult,
    ) -> Entry:
        mode = stat.S_IMODE(st.st_mode)
        low_file = low if low is not None and low.kind is Kind.FILE else None
        cached = self.cache.get(st.st_ino)
        if cached is not None and cached[:3] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            digest, size = cached[3], st.st_size
        else:
            digest, size, st = self._hash(dfd, name, st, low_file, stage, res)
        mtime = st.st_mtime_ns
        if low_file is not None and digest == low_file.digest:
            if self.link and mtime == PROXY_MTIME_NS:
                mtime = low_file.mtime_ns  # the proxy's normalised mtime is not the user's
            tier = low_file.tier
        else:
            tier = low_file.tier if low_file is not None else self.rules.classify(p)
        return Entry(name, Kind.FILE, mode, size, mtime, digest, b"", tier)

    def _hash(
        self,
        dfd: int,
        name: bytes,
        st: os.stat_result,
        low: Entry | None,
        stage: Stage,
        res: SyncResult,
    ) -> tuple[bytes, int, os.stat_result]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(3):
            try:
                fd = os.open(name, flags, dir_fd=dfd)
            except PermissionError:
                # mode 000 and the like: the owner may read it after a chmod it undoes at once
                os.chmod(name, stat.S_IMODE(st.st_mode) | 0o400, dir_fd=dfd, follow_symlinks=False)
                try:
                    fd = os.open(name, flags, dir_fd=dfd)
                finally:
                    os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dfd, follow_symlinks=False)
            try:
                before = os.fstat(fd)
                if low is not None and before.st_size == low.size:
                    digest, size = hash_fd(fd)
                    if digest != low.digest:
                        os.lseek(fd, 0, os.SEEK_SET)
                        digest, size, _new = stage.add_fd(fd)
                else:
                    digest, size, _new = stage.add_fd(fd)
                after = os.fstat(fd)
            finally:
                os.close(fd)
            res.files_hashed += 1
            sig = (after.st_size, after.st_mtime_ns, after.st_ctime_ns)
            if (
                sig == (before.st_size, before.st_mtime_ns, before.st_ctime_ns)
                and size == after.st_size
            ):
                if time.time_ns() - after.st_ctime_ns > self.racy_ns:
                    self.cache[after.st_ino] = (*sig, digest)
                return digest, size, after
            st = after
        raise Unstable()


@contextlib.contextmanager
def _opened_dir(dfd: int, name: bytes, st: os.stat_result) -> Iterator[int]:
    """A directory fd; a directory its owner made unreadable (000, 0300) is opened up for the
    walk and given its mode back afterwards (chmod leaves its mtime alone)."""
    mode = stat.S_IMODE(st.st_mode)
    try:
        fd = os.open(name, _DIRFLAGS, dir_fd=dfd)
        opened_up = False
    except PermissionError:
        os.chmod(name, mode | 0o700, dir_fd=dfd, follow_symlinks=False)
        fd = os.open(name, _DIRFLAGS, dir_fd=dfd)
        opened_up = True
    try:
        yield fd
    finally:
        os.close(fd)
        if opened_up:
            with contextlib.suppress(OSError):
                os.chmod(name, mode, dir_fd=dfd, follow_symlinks=False)


def _below_any(p: bytes, sorted_paths: list[bytes], *, strict: bool) -> bool:
    """Is p equal to (unless strict) or below one of the (sorted) paths?"""
    for q in sorted_paths:
        if q == p:
            if not strict:
                return True
            continue
        if q == b"" or p.startswith(q + b"/"):
            return True
    return False


def _parent(rel: bytes) -> bytes:
    i = rel.rfind(b"/")
    return rel[:i] if i >= 0 else b""


def dirty_paths(recs: Iterable[Record], sync: TreeSync, out: dict[bytes, int]) -> list[bytes]:
    """Fold journal records into `out` (path -> SELF|SUBTREE); return paths opened for writing."""
    opened: list[bytes] = []

    def mark(raw: bytes, flag: int, truncated: bool) -> None:
        if truncated:
            # the record holds only the start of the path: re-scan the directory it names
            raw = raw.rsplit(b"/", 1)[0]
            flag = SUBTREE
        rel = sync.rel(raw)
        while rel is None and raw.startswith(sync.top + b"/"):
            raw = raw.rsplit(b"/", 1)[0]  # not a valid manifest path: its parent, whole
            flag = SUBTREE
            rel = sync.rel(raw)
        if rel is None:
            return
        out[rel] = out.get(rel, 0) | flag

    for r in recs:
        t = r.type
        if t in (RecType.CHECKIN, RecType.EXEC, RecType.SPAWN, RecType.DENIED):
            continue
        if r.phase == 2 and r.ret < 0:
            continue  # a failed call changed nothing (its intent marked the path already)
        tr1, tr2 = bool(r.flags & 1), bool(r.flags & 2)
        if t in (RecType.RENAME, RecType.LINK):
            for raw, tr in ((r.path1, tr1), (r.path2, tr2)):
                if raw:
                    mark(raw, SUBTREE if t is RecType.RENAME else SELF, tr)
                    mark(raw.rsplit(b"/", 1)[0], SELF, tr)
            continue
        if not r.path1:
            continue
        mark(r.path1, SELF, tr1)
        if t in (RecType.UNLINK, RecType.RMDIR, RecType.MKDIR, RecType.SYMLINK) or (
            t is RecType.OPEN and r.arg & _O_CREAT
        ):
            mark(r.path1.rsplit(b"/", 1)[0], SELF, tr1)
        if t in (RecType.OPEN, RecType.INHERIT):
            rel = sync.rel(r.path1)
            if rel is not None:
                opened.append(rel)
    return opened


# --- session state --------------------------------------------------------------------------
def read_state(sdir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((sdir / "state.json").read_text())
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.rename(tmp, path)


# --- the server ---------------------------------------------------------------------------------
class _Conn:
    __slots__ = ("sock", "pid", "uid", "buf", "since")

    def __init__(self, sock: socket.socket, pid: int, uid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.buf = b""
        self.since = time.monotonic()


class Daemon:
    def __init__(self, store: Store, session_id: str) -> None:
        self.store = store
        self.sid = session_id
        self.sdir = store.sessions / session_id
        self.state = read_state(self.sdir)
        self.m = Manifests(store)
        self.uid = int(self.state["uid"])
        self.sref = self.state["session_ref"]
        with self.m.read() as txn:
            ref = self.m.require_ref(txn, self.sref)
            self.head = ref.head
            self.root = bytes.fromhex(self.m.get_commit(txn, ref.head).root)
        self.sync = TreeSync(
            store,
            self.m,
            os.fsencode(self.state["target_real"]),
            Baseline.load(self.sdir / "baseline"),
            Rules.from_json(self.state.get("tiers")),
            link=bool(self.state.get("link")),
            racy_ns=50_000_000,
        )
        self.reader = JournalReader(self.sdir / "journal")
        self.dirty: dict[bytes, int] = {}
        self.hot: dict[bytes, tuple[float, tuple[int, int, int, int] | None]] = {}
        self.checkins: dict[int, str] = {}
        self.rejected = 0
        self.oversized = 0
        self.commits = 0
        self.stop = False
        self.conns: dict[int, _Conn] = {}
        self.listener = self._listen()

    def _listen(self) -> socket.socket | None:
        addr = self.state.get("socket") or ""
        if not addr:
            return None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        if addr.startswith("@"):
            s.bind("\0" + addr[1:])
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr)
            s.bind(addr)
        s.listen(128)
        return s

    # -- socket
    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                c, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            c.setblocking(False)
            cred = c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", cred)
            if uid != self.uid:
                self.rejected += 1
                c.close()
                continue
            self.conns[c.fileno()] = _Conn(c, pid, uid)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(FRAME_MAX + 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            conn.buf += data
            if len(conn.buf) > FRAME_MAX:
                self.oversized += 1
                self._drop(conn)
            return
        # EOF: one frame
        if len(conn.buf) >= _CHECKIN.size:
            magic, version, _pid, _ppid, exe_len, _r = _CHECKIN.unpack_from(conn.buf)
            if magic == _CHECKIN_MAGIC and version == 1 and exe_len <= FRAME_MAX:
                exe = conn.buf[_CHECKIN.size : _CHECKIN.size + exe_len]
                # the kernel's pid (SO_PEERCRED), not the frame's claim
                self.checkins[conn.pid] = exe.decode(errors="replace")
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        conn.sock.close()

    # -- ticks
    def tick(self) -> None:
        recs = self.reader.read()
        for r in recs:
            if r.type == RecType.CHECKIN:
                self.checkins.setdefault(r.pid, os.fsdecode(r.path1))
        now = time.monotonic()
        for rel in dirty_paths(recs, self.sync, self.dirty):
            self.hot[rel] = (now + HOT_SECONDS, None)
        for rel, (until, sig) in list(self.hot.items()):
            if until < now:
                del self.hot[rel]
                continue
            try:
                st = os.lstat(os.path.join(self.sync.top, rel) if rel else self.sync.top)
                cur: tuple[int, int, int, int] | None = (
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                )
            except OSError:
                cur = None
            if sig is not None and cur != sig:
                self.dirty[rel] = self.dirty.get(rel, 0) | SELF
            self.hot[rel] = (until, cur)
        if self.dirty:
            self.commit()

    def commit(self) -> None:
        dirty, self.dirty = self.dirty, {}
        with self.store.lock(), self.store.stage() as stage:
            with self.m.read() as txn:
                res = self.sync.sync(txn, self.root, dirty, stage)
            for p in res.retry:
                self.dirty[p] = self.dirty.get(p, 0) | SELF
            if not res.ops:
                return
            stage.publish()
            with self.m.write() as txn:
                for digest, data in res.nodes.items():
                    self.m.put_raw_node(txn, digest, data)
                new_root = self.m.apply(txn, self.root, res.ops)
                if new_root == self.root:
                    return
                c = self.m.commit(
                    txn,
                    self.sref,
                    new_root,
                    expect_head=self.head,
                    message="live (shim daemon)",
                    session=self.sid,
                    delta=res.ops,
                )
            self.head, self.root = c.id, new_root
            self.commits += 1

    def report(self) -> None:
        _write_json(
            self.sdir / "daemon.json",
            {
                "pid": os.getpid(),
                "head": self.head,
                "offset": self.reader.offset,
                "checkins": {str(k): v for k, v in self.checkins.items()},
                "rejected": self.rejected,
                "oversized": self.oversized,
                "commits": self.commits,
                "damaged": self.reader.damaged,
            },
        )

    def run(self, tick: float = TICK, parent: int = 0) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        next_tick = time.monotonic()
        last_report = ""
        while not self.stop:
            timeout = max(0.0, next_tick - time.monotonic())
            rlist: list[Any] = [c.sock for c in self.conns.values()]
            if self.listener is not None:
                rlist.append(self.listener)
            try:
                ready, _w, _x = select.select(rlist, [], [], timeout)
            except InterruptedError:
                continue
            for s in ready:
                if s is self.listener:
                    self._accept()
                else:
                    conn = self.conns.get(s.fileno())
                    if conn is not None:
                        self._read(conn)
            now = time.monotonic()
            for conn in list(self.conns.values()):
                if now - conn.since > 1.0:
                    self._drop(conn)
            if now >= next_tick:
                if parent and os.getppid() != parent:
                    break  # the session manager died: resume finishes from the journal
                self.tick()
                next_tick = now + tick
                snapshot = json.dumps(
                    [self.head, len(self.checkins), self.rejected, self.oversized]
                )
                if snapshot != last_report:
                    self.report()
                    last_report = snapshot
        self.report()

    def _on_term(self, _sig: int, _frame: object) -> None:
        self.stop = True

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        if self.listener is not None:
            self.listener.close()
        self.m.close()


def serve(store_root: str | os.PathLike[str], session_id: str, *, parent: int = 0) -> None:
    """Run the daemon of a session until SIGTERM (or until `parent`, the manager, is gone)."""
    d = Daemon(Store.open(store_root), session_id)
    try:
        d.run(parent=parent)
    finally:
        d.close()


def main(store_root: str | os.PathLike[str], session_id: str, parent: int = 0) -> int:
    """Entry point for `veloverlay daemon STORE SESSION` (the session starts it as
    `python -m veloverlay.daemon STORE SESSION MANAGER_PID`; by hand it runs in the foreground,
    e.g. to restart a session's live view)."""
    serve(store_root, session_id, parent=parent)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (3, 4):
        sys.stderr.write("usage: python -m veloverlay.daemon STORE SESSION [PARENT_PID]\n")
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 0))
