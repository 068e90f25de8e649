"""Namespaces: run work in a forked child, enter a user namespace, become a user, bring `lo` up.
The process-level calls around them (prctl, start times, reaping, the terminal's foreground) are
`process.py`'s.

Owns process-level namespace work. Imports only the standard library, `veloverlay.errors` and
`veloverlay._libc`; pyroute2 is imported lazily inside `loopback_up` (its import costs 110-160 ms,
measured) and the stdlib ioctl is used when it is missing.

Rule: nothing here unshares the calling process behind its back. `enter_userns` unshares the
*current* process, so call it only inside `run_in_child` (or another fresh fork): a process that
ever ran threads (blake3's pool, an executor) gets EINVAL from unshare(CLONE_NEWUSER) (measured),
and a forked child has exactly one thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from veloverlay import _libc
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.records import Record

__all__ = [
    "IdMaps",
    "ParentMaps",
    "run_in_child",
    "run_in_child_plain",
    "enter_userns",
    "drop_to_user",
    "loopback_up",
    "wait_child",
]

T = TypeVar("T")


# --- run_in_child -----------------------------------------------------------------------------
def _rebuild_velo(cls: type[VeloError], message: str, state: dict[str, Any]) -> VeloError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


def _rebuild_oserror(cls: type[OSError], args: tuple[Any, ...], state: dict[str, Any]) -> OSError:
    exc = cls.__new__(cls, *args)
    OSError.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


def _reduce_error(obj: Any) -> Any:
    """Pickles VeloError and SysError by state: their constructors take keyword-only or renamed
    arguments, so the default `Exception.__reduce__` (which replays `args`) cannot rebuild them."""
    if isinstance(obj, VeloError):
        return _rebuild_velo, (type(obj), obj.message, dict(obj.__dict__))
    if isinstance(obj, SysError):
        args = (obj.errno, obj.strerror, obj.filename, None, obj.filename2)
        return _rebuild_oserror, (type(obj), args, dict(obj.__dict__))
    return NotImplemented


def _dumps(obj: object) -> bytes:
    import io
    import pickle  # here, not at import: sessions start faster without it

    class _Pickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            return _reduce_error(obj)

    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _child_payload(fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> bytes:
    answer: tuple[str, Any]
    try:
        answer = ("ok", fn(*args, **kw))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        import traceback

        exc.add_note(f"(raised in child pid {os.getpid()}:)\n" + traceback.format_exc().rstrip())
        answer = ("err", exc)
    try:
        return _dumps(answer)
    except Exception as pickle_exc:  # noqa: BLE001
        kind, value = answer
        what = f"{'raised' if kind == 'err' else 'returned'} an unpicklable {type(value).__name__}"
        what += f": {value}" if kind == "err" else ""
        err = VeloError(
            f"child {what}", reason=Reason.SYSCALL, detail=f"pickling failed: {pickle_exc!r}"
        )
        return _dumps(("err", err))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_until_exit(rfd: int, pid: int, limit: int | None = None) -> bytes:
    """Read a child's pipe until EOF, or until the child has exited and the pipe is drained;
    with `limit`, stop once more than `limit` bytes came (the answer is then longer than that).

    A grandchild that `fn` forked and left running keeps the write end open; watching a pidfd
    of the child (Linux >= 5.3) stops us from waiting for that grandchild.
    """
    chunks: list[bytes] = []
    got = 0
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        poller = select.poll()
        poller.register(rfd, select.POLLIN)
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if events.get(rfd):
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
                if limit is not None and got > limit:
                    break
                continue
            if pidfd >= 0 and events.get(pidfd):
                # Exited: whatever it wrote is in the pipe now; drain without blocking.
                os.set_blocking(rfd, False)
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(rfd, 1 << 16):
                        chunks.append(chunk)  # no more than the pipe holds
                break
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return b"".join(chunks)


def wait_child(pid: int) -> int:
    """waitpid(pid, 0), retried on EINTR: the raw wait status."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return status
        except InterruptedError:
            continue


def _no_result(pid: int, status: int) -> VeloError:
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return VeloError(f"child process {pid} was killed by signal {name}", reason=Reason.SYSCALL)
    code = os.waitstatus_to_exitcode(status)
    return VeloError(
        f"child process {pid} exited with status {code} without a result", reason=Reason.SYSCALL
    )


def _run_forked(payload: Callable[[], bytes], limit: int | None = None) -> tuple[bytes, int, int]:
    """Fork; the child writes `payload()` to a pipe and exits. Returns (what it wrote, at most
    a little over `limit` bytes of it, its pid, its wait status); a child still writing when the
    limit is passed gets EPIPE."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 0
        try:
            os.close(rfd)
            _write_all(wfd, payload())
        except BaseException:  # noqa: BLE001 - never return into the parent's stack
            status = 70
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    os.close(wfd)
    try:
        data = read_until_exit(rfd, pid, limit)
    finally:
        os.close(rfd)
        status = wait_child(pid)
    return data, pid, status


def run_in_child(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run `fn(*args, **kw)` in a forked child; return its result or re-raise its exception.

    The child is single-threaded, so it may unshare a user namespace; its namespaces, mounts and
    credentials die with it. The result and exceptions must be picklable. Never for a child that
    gives up privileges: `run_in_child_plain`.
    """
    data, pid, status = _run_forked(lambda: _child_payload(fn, args, kw))
    kind: str = ""
    value: Any = None
    if data:
        import pickle

        try:
            kind, value = pickle.loads(data)
        except Exception:  # noqa: BLE001 - a child killed while writing leaves a torn pickle
            kind = ""
    if kind == "err" and isinstance(value, BaseException):
        raise value
    if kind != "ok":
        raise _no_result(pid, status)
    result: T = value
    return result


_PLAIN_MAX = 1 << 20  # a plain answer larger than this is no answer


def run_in_child_plain(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """`run_in_child` for a child that gives up its privileges (`drop_to_user`): its answer
    comes back as JSON, never as a pickle. Such a child is dumpable (it must be, to write its
    own uid_map), so any process of the uid it became may ptrace it and have it write anything
    to the pipe; unpickled by root, that would be code run as root. Only plain data crosses
    (dicts with string keys, lists, strings, numbers, booleans, None; a tuple comes back as a
    list); an exception in the child comes back as a VeloError carrying its message and reason.
    Anything else is the child's failure (VeloError, SYSCALL)."""
    import json

    def payload() -> bytes:
        try:
            answer: dict[str, Any] = {"ok": fn(*args, **kw)}
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            reason = exc.reason.value if isinstance(exc, VeloError) else Reason.SYSCALL.value
            answer = {"err": f"{type(exc).__name__}: {exc}", "reason": reason}
        return json.dumps(answer).encode()

    data, pid, status = _run_forked(payload, _PLAIN_MAX)
    try:
        answer = json.loads(data) if 0 < len(data) <= _PLAIN_MAX else None
    except ValueError:
        answer = None
    if isinstance(answer, dict) and "ok" in answer:
        return answer["ok"]
    if isinstance(answer, dict) and isinstance(answer.get("err"), str):
        try:
            reason = Reason(answer.get("reason"))
        except ValueError:
            reason = Reason.SYSCALL
        raise VeloError(f"in child process {pid}: {answer['err']}", reason=reason)
    raise _no_result(pid, status)


# --- user namespaces --------------------------------------------------------------------------
class IdMaps(Record, frozen=True):
    """What `enter_userns` wrote: the uid_map and gid_map lines, and whether it was root."""

    uid_map: str
    gid_map: str
    privileged: bool


def _current_map(kind: str) -> list[tuple[int, int, int]]:
    with open(f"/proc/self/{kind}_map", encoding="ascii") as f:
        lines = [line.split() for line in f if line.strip()]
    return [(int(a), int(b), int(c)) for a, b, c in lines]


def _identity_of(ranges: list[tuple[int, int, int]]) -> str:
    # Map every id that exists in the current namespace to itself; in the initial namespace this
    # is "0 0 4294967295". Root inside a container only owns its container's ranges.
    return "".join(f"{inside} {inside} {count}\n" for inside, _outside, count in ranges)


def _write_proc(pid: int | str, name: str, text: str) -> None:
    path = f"/proc/{pid}/{name}"
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(text)
    except OSError as exc:
        raise SysError(exc.errno or errno.EIO, "write", path) from None


def _map_helper(target: int, go_fd: int, uid_map: str, gid_map: str) -> None:
    """Body of the forked helper that writes a privileged process's maps from outside.

    The kernel accepts a map other than "own id -> itself" only from a writer that holds
    CAP_SETUID/CAP_SETGID in the *parent* namespace, checked on the writing task too, so a root
    process that has just unshared cannot write its own identity map (measured: EPERM). A helper
    forked before the unshare still lives in the parent namespace. Exit status = errno.
    """
    status = 0
    try:
        if os.read(go_fd, 1) != b"1":
            status = errno.ECANCELED
        else:
            _write_proc(target, "uid_map", uid_map)
            _write_proc(target, "gid_map", gid_map)
    except OSError as exc:
        status = exc.errno or errno.EIO
    except BaseException:  # noqa: BLE001
        status = errno.EIO
    finally:
        os._exit(status)


def _unshare_with_helper(flags: int, uid_map: str, gid_map: str) -> None:
    target = os.getpid()
    go_r, go_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # pragma: no cover - runs in the helper process
        os.close(go_w)
        _map_helper(target, go_r, uid_map, gid_map)
    os.close(go_r)
    try:
        _libc.unshare(flags)
    except BaseException:
        os.close(go_w)  # the helper reads EOF and exits
        wait_child(helper)
        raise
    os.write(go_w, b"1")
    os.close(go_w)
    status = wait_child(helper)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        err = code if code > 0 else errno.EIO
        raise SysError(err, "write", f"/proc/{target}/uid_map")


class ParentMaps:
    """Root's identity maps for a child's new user namespace, written by the child's parent
    instead of a helper forked for it (`_map_helper` says why someone outside must write them):
    a fork of a session's Python process costs ~1.3 ms (measured), a pipe round trip does not.

    Make it before the fork, in the namespace the child will leave (the maps and /proc are
    read here: the child may mount another /proc over it later); then the child passes it to
    `enter_userns` and the parent calls `serve` (the child waits for it)."""

    def __init__(self) -> None:
        self._maps = (_identity_of(_current_map("uid")), _identity_of(_current_map("gid")))
        self._proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._ask = os.pipe2(os.O_CLOEXEC)
        self._done = os.pipe2(os.O_CLOEXEC)

    def serve(self, child: int) -> None:
        """In the parent: wait until `child` has unshared, write its maps, tell it how it went.
        Returns at once when the child does not ask (it failed first, or needs no help)."""
        os.close(self._ask[1])
        os.close(self._done[0])
        try:
            if os.read(self._ask[0], 1) != b"1":
                return
            status = 0
            try:
                for kind, text in zip(("uid_map", "gid_map"), self._maps, strict=True):
                    fd = os.open(f"{child}/{kind}", os.O_WRONLY | os.O_CLOEXEC, dir_fd=self._proc)
                    try:
                        os.write(fd, text.encode())
                    finally:
                        os.close(fd)
            except OSError as exc:
                status = exc.errno or errno.EIO
            os.write(self._done[1], str(status).encode())
        finally:
            os.close(self._ask[0])
            os.close(self._done[1])
            os.close(self._proc)

    def _unshare(self, flags: int) -> None:
        """In the child: unshare, have the parent write the maps; raise what it could not do."""
        self.close_parent_ends()
        try:
            _libc.unshare(flags)  # if this fails, the parent reads EOF and goes on
            os.write(self._ask[1], b"1")
            reply = os.read(self._done[0], 16)
        finally:
            os.close(self._ask[1])
            os.close(self._done[0])
        status = int(reply) if reply.isdigit() else errno.EIO  # EOF: the parent is gone
        if status != 0:
            raise SysError(status, "write", f"/proc/{os.getpid()}/uid_map")

    def close_parent_ends(self) -> None:
        """In the child: what only the parent uses."""
        os.close(self._ask[0])
        os.close(self._done[1])
        os.close(self._proc)

    def close_child(self) -> None:
        """In the child, when it will not ask: the parent's `serve` returns at once."""
        self.close_parent_ends()
        os.close(self._ask[1])
        os.close(self._done[0])


def enter_userns(
    *, map_root: bool, net: bool = False, pid: bool = False, parent: ParentMaps | None = None
) -> IdMaps:
    """Unshare a user and mount namespace (plus net/pid) in the current process and map ids.

    Root maps every id to itself, so a root session holds no capability in the initial
    namespace yet files keep their owners. Anyone else gets one line: own uid -> 0 with
    `map_root`, else own uid -> itself (a single self-mapping is all the kernel allows without
    setuid newuidmap, measured). With `pid`, only children forked afterwards are in the new pid
    namespace. Call this only in a fresh child (see `run_in_child`). Root's maps are written by
    a forked helper, or by the parent through `parent` (see `ParentMaps`); anyone else's need
    neither, and then `parent` is closed unused.
    """
    # Read ids before unshare: afterwards they read as the overflow id 65534 until mapped.
    uid, gid = os.getuid(), os.getgid()
    privileged = uid == 0
    flags = _libc.CLONE_NEWUSER | _libc.CLONE_NEWNS
    if net:
        flags |= _libc.CLONE_NEWNET
    if pid:
        flags |= _libc.CLONE_NEWPID
    if privileged:
        # Root keeps setgroups allowed: with an identity map nothing is gained by denying it, and
        # programs that drop privileges inside a session (apt, su) need it.
        if parent is not None:  # the maps it read before the fork are what it writes
            uid_map, gid_map = parent._maps
            parent._unshare(flags)
        else:
            uid_map = _identity_of(_current_map("uid"))
            gid_map = _identity_of(_current_map("gid"))
            _unshare_with_helper(flags, uid_map, gid_map)
    else:
        if parent is not None:
            parent.close_child()
        inside_uid, inside_gid = (0, 0) if map_root else (uid, gid)
        uid_map, gid_map = f"{inside_uid} {uid} 1\n", f"{inside_gid} {gid} 1\n"
        _libc.unshare(flags)  # EPERM/ENOSPC carry errors.syscall_hint's canned advice
        # An unprivileged writer must give up setgroups before it may write gid_map.
        _write_proc("self", "setgroups", "deny")
        _write_proc("self", "uid_map", uid_map)
        _write_proc("self", "gid_map", gid_map)
    return IdMaps(uid_map=uid_map, gid_map=gid_map, privileged=privileged)


def enter_mountns(*, net: bool = False, pid: bool = False) -> None:
    """Unshare a mount namespace (plus net/pid) in the current user namespace — for real root,
    whose mounts there may use trusted.* xattrs (root-native overlay sessions). Mounts made in it
    are not locked against the process's own later umount/remount: `enter_userns` afterwards (a
    less privileged owner) locks them. With `pid`, only children forked afterwards are in the
    new pid namespace."""
    flags = _libc.CLONE_NEWNS
    if net:
        flags |= _libc.CLONE_NEWNET
    if pid:
        flags |= _libc.CLONE_NEWPID
    _libc.unshare(flags)


def drop_to_user(uid: int, gid: int) -> None:
    """Become `uid`/`gid` for good (no supplementary groups), e.g. in a forked test child.

    After the uid change the process is made dumpable again: otherwise its /proc/self files
    belong to root and it could not write its own uid_map after unsharing (measured: EACCES).
    """
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _libc.set_dumpable(on=True)


# --- network ----------------------------------------------------------------------------------
_SIOCGIFFLAGS = 0x8913  # <linux/sockios.h>
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1  # <net/if.h>
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name[IFNAMSIZ], short ifr_flags, padding


def _loopback_up_ioctl() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            req = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
            _name, flags = _IFREQ.unpack(req)
            fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))
        except OSError as exc:
            raise SysError(exc.errno or errno.EIO, "ioctl(SIOCSIFFLAGS)", "lo") from None


def loopback_up(*, use_pyroute2: bool = True) -> None:
    """Bring `lo` up in the current (fresh) network namespace."""
    if use_pyroute2:
        try:
            from pyroute2 import IPRoute
        except ImportError:
            pass
        else:
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=index, state="up")
            return
    _loopback_up_ioctl()
