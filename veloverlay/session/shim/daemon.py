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
dropped after a second. A `--discard` session gets no live commits: nothing it writes is staged
or published into the store (a shared store's readers could read it). The daemon is never on a
program's path: if it dies the journal keeps growing and the final stat-diff loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

from veloverlay.files import write_json_atomic
from veloverlay.session import state as session_state
from veloverlay.session.shim.library import JournalReader, JournalRecord, RecType
from veloverlay.session.shim.materialize import Baseline
from veloverlay.session.shim.treesync import SELF, SUBTREE, TreeSync
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.tiers import Rules

__all__ = ["TreeSync", "SELF", "dirty_paths", "serve", "main", "request_sync", "TICK"]
TICK = 0.15
HOT_SECONDS = 10.0
FRAME_MAX = 4096
_CHECKIN_MAGIC = 0x314B4356  # "VCK1"
_SYNC = b"VSY1"  # a sync request: fold the journal now, then answer with the live view's head
_CHECKIN = struct.Struct("<IIiiII")


# --- the server ---------------------------------------------------------------------------------
class _Conn:
    __slots__ = ("sock", "pid", "uid", "buf", "since")

    def __init__(self, sock: socket.socket, pid: int, uid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.buf = b""
        self.since = time.monotonic()


_O_CREAT = os.O_CREAT


def dirty_paths(
    recs: Iterable[JournalRecord], sync: TreeSync, out: dict[bytes, int]
) -> list[bytes]:
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
        if t in (RecType.UNLINK, RecType.RMDIR, RecType.MKDIR, RecType.MKNOD, RecType.SYMLINK) or (
            t is RecType.OPEN and r.arg & _O_CREAT
        ):
            mark(r.path1.rsplit(b"/", 1)[0], SELF, tr1)
        if t in (RecType.OPEN, RecType.INHERIT):
            rel = sync.rel(r.path1)
            if rel is not None:
                opened.append(rel)
    return opened


class Daemon:
    def __init__(self, store: Store, session_id: str) -> None:
        self.store = store
        self.sid = session_id
        self.sdir = store.sessions / session_id
        self.state = session_state.load(self.store, session_id)
        self.m = Manifests(store)
        self.uid = int(self.state.uid)
        # --discard: nothing of the session is kept, so nothing is staged or published live
        # either (objects a live commit published stayed in the store after the session, and
        # in a shared store every local user could read them: a 0600 file written under umask
        # 077). Check-ins are still read: they say which processes ran shimmed.
        self.discard = bool(self.state.discard)
        self.sref = self.state.session_ref
        with self.m.read() as txn:
            ref = self.m.require_ref(txn, self.sref)
            self.head = ref.head
            self.root = bytes.fromhex(self.m.get_commit(txn, ref.head).root)
        self.sync = TreeSync(
            store,
            self.m,
            os.fsencode(self.state.target_real),
            Baseline.load(self.sdir / "baseline"),
            Rules.from_json(self.state.tiers),
            link=bool(self.state.link),
            racy_ns=50_000_000,
            live=True,
            ident=(self.state.target_id[0], self.state.target_id[1])
            if len(self.state.target_id) == 2
            else None,
            uid=self.uid,
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
        addr = self.state.socket or ""
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
        if conn.buf == _SYNC:  # `status` / `diff --session`: the view as of now, not last tick
            self.tick()
            reply = json.dumps({"head": self.head, "offset": self.reader.offset}).encode()
            with contextlib.suppress(OSError):
                conn.sock.settimeout(1.0)
                conn.sock.sendall(reply)
            self._drop(conn)
            return
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
        now = time.monotonic()
        for recs in self.reader.chunks():  # (a restarted daemon reads the journal from its start)
            for r in recs:
                if r.type == RecType.CHECKIN:
                    self.checkins.setdefault(r.pid, os.fsdecode(r.path1))
            if self.discard:
                continue
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
        data = {
            "pid": os.getpid(),
            "head": self.head,
            "offset": self.reader.offset,
            "checkins": {str(k): v for k, v in self.checkins.items()},
            "rejected": self.rejected,
            "oversized": self.oversized,
            "commits": self.commits,
            "damaged": self.reader.damaged,
        }
        try:  # never makes the session directory (or the store's path) again
            write_json_atomic(self.sdir / "daemon.json", data, parents=False)
        except FileNotFoundError:
            self.stop = True  # the session directory was removed: nothing to report to

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


def request_sync(address: str, timeout: float = 2.0) -> bool:
    """Ask the daemon listening on `address` to fold the journal into the live view now (what
    `status` and `diff --session` read would otherwise lag by up to a tick). False when it
    cannot be reached or does not answer within `timeout` (then the view is as of its last
    tick). Another uid's request is refused by the daemon (SO_PEERCRED)."""
    addr = "\0" + address[1:] if address.startswith("@") else address
    deadline = time.monotonic() + timeout
    while True:  # a daemon still starting has not bound its socket yet: try again
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(addr)
            s.sendall(_SYNC)
            s.shutdown(socket.SHUT_WR)
            return bool(s.recv(FRAME_MAX))
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                return False
        except OSError:
            return False
        finally:
            s.close()
        time.sleep(0.02)


def serve(store_root: str | os.PathLike[str], session_id: str, *, parent: int = 0) -> None:
    """Run the daemon of a session until SIGTERM (or until `parent`, the manager, is gone)."""
    d = Daemon(Store.open(store_root), session_id)
    try:
        d.run(parent=parent)
    finally:
        d.close()


def main(store_root: str | os.PathLike[str], session_id: str, parent: int = 0) -> int:
    """Entry point for `veloverlay daemon STORE SESSION` (the session starts it as
    `python -m veloverlay.session.shim.daemon STORE SESSION MANAGER_PID`; by hand it runs in the
    foreground, e.g. to restart a session's live view)."""
    serve(store_root, session_id, parent=parent)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (3, 4):
        sys.stderr.write(
            "usage: python -m veloverlay.session.shim.daemon STORE SESSION [PARENT_PID]\n"
        )
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 0))
