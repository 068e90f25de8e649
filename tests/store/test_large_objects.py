"""Large files: reflinked into the store where the filesystem shares extents, hashed from the
clone with direct I/O, on every core in ingest's workers (never in the process that coordinates).

The digests are checked against the source's own bytes, the objects against their names (P0-a),
and a write to the source after the ingest against the stored object (a reflink is copy-on-write).
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess

import blake3
import pytest

from tests.helpers.fixtures import sbin_which
from tests.helpers.trees import assert_same_tree
from veloverlay.ingest import ingest
from veloverlay.store import digest as digest_mod
from veloverlay.store.digest import hash_bytes, hash_own_file
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.repo import Repo

MIB = 1 << 20
SIZES = [0, 1, 4095, 4096, 8 * MIB - 1, 8 * MIB, 8 * MIB + 1, 17 * MIB + 3]


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_direct_hash_equals_the_bytes_hash(tmp_path: str, shm_tmp: str, where: str) -> None:
    """Every size around the 8 MiB request and the block size: the same digest and length as
    hashing the bytes, whether the filesystem takes O_DIRECT (ext4) or not."""
    base = str(tmp_path) if where == "tmp" else shm_tmp
    for size in SIZES:
        data = os.urandom(size)
        path = os.path.join(base, f"f{size}")
        _write(path, data)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.lseek(fd, 5, os.SEEK_SET)  # the whole file, whatever the offset
            assert hash_own_file(fd, direct=True) == (hash_bytes(data), size)
        finally:
            os.close(fd)


def test_direct_read_refused_midway_goes_on_buffered(
    tmp_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short direct read leaves the next offset unaligned; the kernel's EINVAL for it (a real
    one: the test only makes the first read short) turns direct I/O off, and the hash goes on."""
    data = os.urandom(3 * MIB + 7)
    path = os.path.join(tmp_path, "f")
    _write(path, data)
    real = os.preadv
    calls: list[int] = []

    def short_first(fd: int, bufs: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) == 1:
            bufs[0][:1000] = data[:1000]
            return 1000
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", short_first)
    fd = os.open(path, os.O_RDONLY)
    try:
        if not digest_mod._set_direct(fd):
            pytest.skip("no O_DIRECT on the temp dir's filesystem")
        with pytest.raises(OSError) as info:  # what the fallback answers: the kernel refuses
            real(fd, [bytearray(4096)], 1000)
        assert info.value.errno == errno.EINVAL
        assert hash_own_file(fd, direct=True) == (hash_bytes(data), len(data))
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert calls[:2] == [0, 1000]


def _shared(path: str) -> bool:
    """FIEMAP (filefrag) says the file's extents are shared with another file."""
    exe = sbin_which("filefrag")  # e2fsprogs: on every Debian
    assert exe is not None, "filefrag not found"
    out = subprocess.run([exe, "-v", path], capture_output=True, text=True, check=True)
    return "shared" in out.stdout


def _object_files(repo: Repo) -> dict[str, bytes]:
    found = {}
    for name, path in repo.store.iter_objects():
        with open(path, "rb") as f:
            found[name] = f.read()
    return found


@pytest.mark.parametrize("jobs", [1, 2])
def test_ingest_reflinks_large_files_and_names_them_by_their_bytes(
    reflink_dir: str, jobs: int
) -> None:
    src = os.path.join(reflink_dir, "src")
    os.makedirs(os.path.join(src, "weights"))
    sizes = (MIB + 1, 9 * MIB + 5)  # above source.py's whole-read size: stage.add_fd
    big = {f"weights/part{i}.bin": os.urandom(n) for i, n in enumerate(sizes)}
    small = {"config.json": b'{"layers": 2}\n', "empty": b""}
    for rel, data in {**big, **small}.items():
        _write(os.path.join(src, rel), data)
    os.chmod(os.path.join(src, "weights", "part0.bin"), 0o444)
    old = 1_600_000_000
    for rel in big:  # not racy: read once
        os.utime(os.path.join(src, rel), (old, old))
    repo = Repo.open(os.path.join(reflink_dir, "store"), create=True)
    try:
        ingest(repo.store, repo.m, src, "model", jobs=jobs)
        objects = _object_files(repo)
        for name, body in objects.items():  # P0-a, read as any reader would
            assert blake3.blake3(body).hexdigest() == name
        for rel, data in big.items():
            name = hash_bytes(data).hex()
            assert objects[name] == data
            assert _shared(str(repo.store.object_path(bytes.fromhex(name)))), (rel, len(data))
        out = os.path.join(reflink_dir, "out")
        repo.checkout("model", out)
        assert_same_tree(src, out)
        # Copy-on-write: the source written in place after the ingest leaves the object alone.
        with open(os.path.join(src, "weights", "part1.bin"), "r+b") as f:
            f.write(b"\0" * 4096)
        assert _object_files(repo) == objects
        assert fsck(repo.store, repo.m, jobs=1).ok
    finally:
        repo.close()


@pytest.mark.parametrize("jobs", [1, 2])
def test_the_coordinating_process_starts_no_threads(shm_tmp: str, jobs: int) -> None:
    """Workers hash large files on every core; the ingesting process itself must stay
    single-threaded (a threaded process can never create a user namespace again)."""
    src = os.path.join(shm_tmp, "src")
    os.mkdir(src)
    for i in range(3):
        _write(os.path.join(src, f"big{i}"), os.urandom(9 * MIB))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            os.close(r)
            repo = Repo.open(os.path.join(shm_tmp, "store"), create=True)
            ingest(repo.store, repo.m, src, "big", jobs=jobs)
            report = f"{len(os.listdir('/proc/self/task'))} {digest_mod._threads}"
            os.write(w, report.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == "1 1", f"threads in the coordinator, blake3 max_threads: {report}"
