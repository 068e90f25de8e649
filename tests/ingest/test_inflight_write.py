"""A write(2) still copying when the ingest reads the file, whose mtime stamp is old.

write(2) stamps mtime/ctime when it starts and then copies, holding the inode lock. A writer
descheduled mid-copy on a loaded machine can leave a stamp older than RACY_NS while its copy is
still in flight: a read then sees half the new bytes and identical stats before and after. The
ingest must wait for the write (its barrier), never stage that mix.

The shim's live sync (treesync) hashes a session's files the same way, and must wait too.

The stall is made exact with userfaultfd: the writer's source buffer has its second half
unpopulated, so pwrite() copies the first half and blocks on the fault, inode lock held, until
this test supplies the pages. RACY_NS is set to 0 so the fresh stamp counts as old (the loaded
machine's case, without waiting for it). The buffer is kept out of transparent huge pages: where
THP is "always" (Debian's 5.10), populating the first half could map a huge page reaching into
the second, and supplying pages there fails (EEXIST) — the writer would then wait forever, and
the reader behind it. Should supplying fail anyway, the userfaultfd is closed (the kernel then
fills the pages itself) and the test fails instead of hanging.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
from collections.abc import Callable

import pytest

from veloverlay.ingest import source as ingest_mod
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

_NR_USERFAULTFD = 323  # x86_64
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFDIO_COPY = 0xC028AA03
_MISSING = 1
_PAGEFAULT = 0x12

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def _ioctl(fd: int, req: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    if _libc.ioctl(fd, req, ctypes.addressof(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _userfaultfd() -> int:
    if os.uname().machine != "x86_64":
        pytest.skip("the userfaultfd syscall number here is x86_64's")
    fd = _libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        pytest.skip(f"userfaultfd: {os.strerror(err)} (unprivileged use off, or no kernel support)")
    api = ctypes.create_string_buffer(struct.pack("QQQ", 0xAA, 0, 0), 24)
    _ioctl(fd, _UFFDIO_API, api)
    return int(fd)


def _supply(uffd: int, dst: int, src: int, end: int) -> None:
    """UFFDIO_COPY `src` to the pages [dst, end): one call, or page by page past any page
    already present (EEXIST), which the kernel may have mapped meanwhile."""
    copy = ctypes.create_string_buffer(struct.pack("QQQQq", dst, src, end - dst, 0, 0), 40)
    try:
        _ioctl(uffd, _UFFDIO_COPY, copy)
        return
    except FileExistsError:
        pass
    for off in range(0, end - dst, mmap.PAGESIZE):
        one = ctypes.create_string_buffer(
            struct.pack("QQQQq", dst + off, src + off, mmap.PAGESIZE, 0, 0), 40
        )
        try:
            _ioctl(uffd, _UFFDIO_COPY, one)
        except FileExistsError:
            continue


def _state(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def _ingest_read(repo: Repo, path: str) -> bytes:
    where, name = os.path.split(os.fsencode(path))
    dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with repo.store.stage() as stage:
            return ingest_mod.read_stable(dfd, name, where, stage, repo.store)[0]
    finally:
        os.close(dfd)


def _shim_sync_read(repo: Repo, path: str) -> bytes:
    """The shim's live sync hashes a session's changed file the same way (treesync)."""
    from veloverlay.session.shim.materialize import Baseline
    from veloverlay.session.shim.treesync import SyncResult, TreeSync
    from veloverlay.tiers import Rules

    sync = TreeSync(
        repo.store,
        repo.m,
        os.fsencode(os.path.dirname(path)),
        Baseline(),
        Rules.default(),
        link=False,
    )
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        with repo.store.stage() as stage:
            name = os.fsencode(os.path.basename(path))
            return sync._hash(dfd, name, os.stat(path), None, stage, SyncResult())[0]
    finally:
        os.close(dfd)


@pytest.mark.parametrize("read", [_ingest_read, _shim_sync_read], ids=["ingest", "shim-sync"])
def test_a_write_in_flight_with_an_old_stamp_is_waited_for(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch, read: Callable[[Repo, str], bytes]
) -> None:
    size = 4 << 20
    old, new = b"o" * size, b"n" * size
    path = os.path.join(shm_tmp, "f")
    with open(path, "wb") as f:
        f.write(old)
    uffd = _userfaultfd()
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_NOHUGEPAGE)  # before any page is touched (the module's docstring)
    half = size // 2
    assert half % mmap.PAGESIZE == 0  # userfaultfd registers whole pages
    buf[:half] = new[:half]  # populated: copied at once; the second half faults
    anchor = ctypes.c_char.from_buffer(buf)
    base = ctypes.addressof(anchor)
    reg = ctypes.create_string_buffer(struct.pack("QQQQ", base + half, size - half, _MISSING, 0))
    _ioctl(uffd, _UFFDIO_REGISTER, reg)
    wfd = os.open(path, os.O_WRONLY)
    wrote: list[int] = []
    writer = threading.Thread(target=lambda: wrote.append(os.pwrite(wfd, buf, 0)))
    writer.start()
    fill = ctypes.create_string_buffer(new[half:], size - half)
    reader_tid = threading.get_native_id()
    done = threading.Event()
    failed: list[BaseException] = []
    fault = [base + half]

    def supply_pages() -> None:
        # Until the reader blocks (in the barrier, state D) or is done: the write stays
        # stalled exactly as long as the reader could see it half made.
        try:
            while not done.is_set() and _state(reader_tid) != "D":
                done.wait(0.001)
            _supply(uffd, fault[0], ctypes.addressof(fill) + fault[0] - base - half, base + size)
        except BaseException as exc:  # release the writer (and the reader behind it)
            failed.append(exc)
            os.close(uffd)

    resolver = threading.Thread(target=supply_pages)
    try:
        msg = os.read(uffd, 32)  # the writer is in the fault now, its stamp already set
        assert msg[0] == _PAGEFAULT
        page = struct.unpack_from("Q", msg, 16)[0] & ~(mmap.PAGESIZE - 1)
        assert base + half <= page < base + size, "the write faulted outside the second half"
        fault[0] = page
        monkeypatch.setattr(ingest_mod, "RACY_NS", 0)
        resolver.start()
        digest = read(repo, path)
    finally:
        done.set()
        if resolver.ident is not None:
            resolver.join(30)
        else:  # never started: let the writer finish
            supply_pages()
        writer.join(30)
        os.close(wfd)
        if not failed:
            os.close(uffd)
        del anchor
        buf.close()
    assert not failed, f"supplying the stalled write's pages failed: {failed[0]!r}"
    assert wrote == [size]
    assert digest in (hash_bytes(old), hash_bytes(new)), "a half-written version was staged"
