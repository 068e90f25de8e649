"""Namespaces: the fork-and-report pattern, user namespaces as root and as an unprivileged uid."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.helpers.unpriv import UNPRIV_GID, UNPRIV_UID, mount_lines, run_unprivileged
from veloverlay import _libc, fsflags, ns
from veloverlay.errors import Reason, SysError, VeloError


@pytest.fixture(autouse=True)
def _no_leaked_mounts() -> Iterator[None]:
    before = mount_lines()
    yield
    assert mount_lines() == before


# --- run_in_child -----------------------------------------------------------------------------
def test_returns_the_childs_value() -> None:
    parent = os.getpid()
    pid, payload = ns.run_in_child(lambda n: (os.getpid(), b"x" * n), 3)
    assert pid != parent
    assert payload == b"xxx"


def test_large_results_pass_the_pipe() -> None:
    big = ns.run_in_child(os.urandom, 3 << 20)  # far above the 64 KiB pipe buffer
    assert len(big) == 3 << 20


def test_reraises_the_childs_exception_with_its_traceback() -> None:
    def boom() -> None:
        raise ValueError("from the child")

    with pytest.raises(ValueError, match="from the child") as info:
        ns.run_in_child(boom)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "raised in child pid" in notes and "boom" in notes


def test_syserror_and_veloerror_survive_the_trip() -> None:
    def sys_fail() -> None:
        _libc.umount2("/nonexistent-velo-dir")

    with pytest.raises(SysError) as sinfo:
        ns.run_in_child(sys_fail)
    assert sinfo.value.errno == errno.ENOENT
    assert sinfo.value.syscall == "umount2"
    assert sinfo.value.filename == "/nonexistent-velo-dir"

    def velo_fail() -> None:
        raise VeloError("nope", reason=Reason.TOO_MANY_LAYERS, hint="h", detail="d", path="/p")

    with pytest.raises(VeloError) as vinfo:
        ns.run_in_child(velo_fail)
    err = vinfo.value
    assert (err.message, err.reason, err.hint, err.detail, err.path) == (
        "nope",
        Reason.TOO_MANY_LAYERS,
        "h",
        "d",
        "/p",
    )


def test_a_killed_child_reports_the_signal() -> None:
    with pytest.raises(VeloError, match="SIGKILL") as info:
        ns.run_in_child(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert info.value.reason is Reason.SYSCALL


def test_a_child_exiting_without_result_reports_its_status() -> None:
    with pytest.raises(VeloError, match="status 3") as info:
        ns.run_in_child(os._exit, 3)
    assert info.value.reason is Reason.SYSCALL


def test_unpicklable_result_is_reported() -> None:
    with pytest.raises(VeloError, match="unpicklable"):
        ns.run_in_child(lambda: threading.Lock())


def test_a_lingering_grandchild_does_not_block_the_parent() -> None:
    def leave_grandchild() -> int:
        pid = os.fork()
        if pid == 0:  # grandchild keeps the result pipe open
            time.sleep(30)
            os._exit(0)
        return pid

    start = time.monotonic()
    grandchild = ns.run_in_child(leave_grandchild)
    try:
        assert time.monotonic() - start < 5
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_multithreaded_process_cannot_unshare_a_user_namespace() -> None:
    # Why every namespace lives in a fresh child: one extra thread makes CLONE_NEWUSER EINVAL.
    def with_a_thread() -> None:
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        try:
            _libc.unshare(_libc.CLONE_NEWUSER)
        finally:
            stop.set()
            t.join()

    with pytest.raises(SysError) as info:
        ns.run_in_child(with_a_thread)
    assert info.value.errno == errno.EINVAL
    assert info.value.hint and "multi-threaded" in info.value.hint


# --- user namespaces --------------------------------------------------------------------------
def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _ns_report(map_root: bool) -> dict[str, object]:
    maps = ns.enter_userns(map_root=map_root)
    return {
        "uid_map": _read("/proc/self/uid_map").split(),
        "gid_map": _read("/proc/self/gid_map").split(),
        "setgroups": _read("/proc/self/setgroups").strip(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "maps": maps,
    }


@pytest.mark.needs("root")
def test_root_gets_an_identity_map() -> None:
    got = ns.run_in_child(_ns_report, False)
    assert got["uid_map"] == ["0", "0", "4294967295"]
    assert got["gid_map"] == ["0", "0", "4294967295"]
    assert got["setgroups"] == "allow"
    assert got["uid"] == 0 and got["gid"] == 0
    maps = got["maps"]
    assert isinstance(maps, ns.IdMaps) and maps.privileged


@pytest.mark.needs("root", "chattr")
def test_root_in_its_namespace_holds_no_initial_namespace_capability(
    tmp_path: os.PathLike[str],
) -> None:
    target = os.path.join(os.fspath(tmp_path), "f")
    open(target, "w").close()

    def try_immutable() -> None:
        ns.enter_userns(map_root=True)
        fsflags.set_immutable(target, True)  # needs CAP_LINUX_IMMUTABLE in the initial ns

    with pytest.raises(SysError) as info:
        ns.run_in_child(try_immutable)
    assert info.value.errno == errno.EPERM
    assert not fsflags.is_immutable(target)


@pytest.mark.needs("userns")
@pytest.mark.parametrize("map_root", [True, False], ids=["map-root", "map-self"])
def test_unprivileged_gets_a_single_line_map(map_root: bool) -> None:
    got = run_unprivileged(_ns_report, map_root)
    inside = "0" if map_root else str(UNPRIV_UID)
    assert got["uid_map"] == [inside, str(UNPRIV_UID), "1"]
    assert got["gid_map"] == ["0" if map_root else str(UNPRIV_GID), str(UNPRIV_GID), "1"]
    assert got["setgroups"] == "deny"
    assert got["uid"] == (0 if map_root else UNPRIV_UID)


@pytest.mark.needs("userns")
def test_unprivileged_namespace_can_mount() -> None:
    def tmpfs_in_ns() -> int:
        ns.enter_userns(map_root=False)
        _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_PRIVATE, None)
        _libc.mount("tmpfs", "/dev/shm", "tmpfs", 0, "size=1m")
        return _libc.statfs_type("/dev/shm")

    assert run_unprivileged(tmpfs_in_ns) == _libc.TMPFS_MAGIC


@pytest.mark.needs("userns")
def test_new_pid_namespace_applies_to_children() -> None:
    def pid_of_next_child() -> tuple[int, int]:
        ns.enter_userns(map_root=True, pid=True)
        return os.getpid(), ns.run_in_child(os.getpid)

    own, child = run_unprivileged(pid_of_next_child)
    assert own != 1
    assert child == 1


def _child_mapped_by_parent(map_root: bool, spoil: bool = False) -> dict[str, object]:
    """As pid 1 of a session meets it: a child in a new pid namespace mounts its own /proc
    (which hides the parent's view of it), then enters a user namespace whose maps the parent
    writes through `ParentMaps`. Returns what the child saw, or the error it raised."""
    ns.enter_userns(map_root=map_root, pid=True) if os.getuid() != 0 else ns.enter_mountns(pid=True)
    _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_PRIVATE, None)
    maps = ns.ParentMaps()
    if spoil:
        maps._maps = ("not a map\n", "not a map\n")
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.close(rfd)
            from veloverlay import mount

            mount.mount_proc("/proc")
            try:
                ns.enter_userns(map_root=os.getuid() == 0, parent=maps)
                out = _read("/proc/self/uid_map").split() + [str(os.getuid())]
            except SysError as exc:
                out = ["error", str(exc.errno), str(exc.filename)]
            os.write(wfd, " ".join(out).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    maps.serve(child)
    got = os.read(rfd, 4096).decode().split()
    os.close(rfd)
    status = ns.wait_child(child)
    return {"got": got, "status": os.waitstatus_to_exitcode(status)}


@pytest.mark.needs("root")
def test_the_parent_writes_roots_identity_maps() -> None:
    got = ns.run_in_child(_child_mapped_by_parent, True)
    assert got == {"got": ["0", "0", "4294967295", "0"], "status": 0}


@pytest.mark.needs("root")
def test_a_map_the_parent_could_not_write_is_the_childs_error() -> None:
    got = ns.run_in_child(_child_mapped_by_parent, True, True)
    seen = got["got"]
    assert got["status"] == 0 and isinstance(seen, list)
    assert seen[:2] == ["error", str(errno.EINVAL)] and seen[2].endswith("/uid_map")


@pytest.mark.needs("userns")
@pytest.mark.parametrize("map_root", [True, False], ids=["root-inside", "user-inside"])
def test_parent_maps_root_free(map_root: bool) -> None:
    # Root inside a root-free namespace gets its one id mapped by the parent; a user inside
    # maps itself and the parent's serve returns without being asked.
    got = run_unprivileged(_child_mapped_by_parent, map_root)
    inside = "0" if map_root else str(UNPRIV_UID)
    assert got == {"got": [inside, inside, "1", inside], "status": 0}


@pytest.mark.needs("root")
def test_drop_to_user_is_for_good() -> None:
    def report() -> tuple[object, ...]:
        ns.drop_to_user(UNPRIV_UID, UNPRIV_GID)
        capeff = next(
            line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")
        )
        return os.getresuid(), os.getresgid(), os.getgroups(), int(capeff, 16)

    resuid, resgid, groups, capeff = ns.run_in_child(report)
    assert resuid == (UNPRIV_UID,) * 3
    assert resgid == (UNPRIV_GID,) * 3
    assert groups == []
    assert capeff == 0


# --- network ----------------------------------------------------------------------------------
def _tcp_over_lo() -> str:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        try:
            with socket.create_connection(srv.getsockname(), timeout=2):
                return "connected"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, "?")


@pytest.mark.needs("userns")
@pytest.mark.parametrize("use_pyroute2", [True, False], ids=["pyroute2", "ioctl"])
def test_loopback_up_in_a_new_net_namespace(use_pyroute2: bool) -> None:
    def net() -> tuple[str, str]:
        ns.enter_userns(map_root=True, net=True)
        before = _tcp_over_lo()
        ns.loopback_up(use_pyroute2=use_pyroute2)
        return before, _tcp_over_lo()

    before, after = run_unprivileged(net)
    assert before != "connected"  # lo starts down in a fresh net namespace
    assert after == "connected"


def _plain(kind: str) -> object:
    if kind == "data":
        return {"a": (True, "why"), "n": [1, 2.5, None]}
    if kind == "velo":
        raise VeloError("not there", reason=Reason.NOT_FOUND)
    if kind == "other":
        raise KeyError("k")
    return object()  # not JSON


def test_run_in_child_plain_brings_back_plain_data_only() -> None:
    assert ns.run_in_child_plain(_plain, "data") == {"a": [True, "why"], "n": [1, 2.5, None]}
    with pytest.raises(VeloError) as info:
        ns.run_in_child_plain(_plain, "velo")
    assert info.value.reason is Reason.NOT_FOUND and "VeloError: not there" in str(info.value)
    with pytest.raises(VeloError) as info:
        ns.run_in_child_plain(_plain, "other")
    assert info.value.reason is Reason.SYSCALL and "KeyError" in str(info.value)
    with pytest.raises(VeloError) as info:
        ns.run_in_child_plain(_plain, "object")
    assert "without a result" in str(info.value)


def test_run_in_child_plain_reads_no_more_than_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # A child that drops its privileges can be made (ptrace) to write anything: root reads at
    # most about 1 MiB of it, and the child, writing on, gets EPIPE and ends.
    read = os.read
    got = [0]

    def counting(fd: int, n: int) -> bytes:
        chunk = read(fd, n)
        got[0] += len(chunk)
        return chunk

    monkeypatch.setattr(ns.os, "read", counting)
    with pytest.raises(VeloError) as info:
        ns.run_in_child_plain(lambda: "x" * (64 << 20))
    assert "without a result" in str(info.value)
    assert got[0] <= ns._PLAIN_MAX + (1 << 17)
