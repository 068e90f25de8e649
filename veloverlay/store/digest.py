"""BLAKE3 digests: the only module that imports blake3.

A `Digest` is the 32 raw bytes; its hex form names objects on disk. Hashing starts no threads
(`max_threads` stays 1) unless the process said it may (`allow_threads`): a process that ever ran
threads cannot create a user namespace, and the session manager must be able to. Ingest's forked
workers, which never do, hash a large file on every core.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import NewType

import blake3

__all__ = [
    "Digest",
    "DIGEST_SIZE",
    "hash_bytes",
    "Hasher",
    "allow_threads",
    "hash_fd",
    "hash_own_file",
    "from_hex",
    "node_digest",
]

Digest = NewType("Digest", bytes)
DIGEST_SIZE = 32
_CHUNK = 1 << 20
_DIRECT_CHUNK = 8 << 20  # a direct read's size: aligned to any block size, and large
_threads = 1  # blake3's max_threads for the big updates of _hash_reads
# Domain separation: a directory node never hashes like a file with the same bytes.
_NODE_KEY = b"veloverlay-dir-node-v1\0"


def hash_bytes(data: bytes | memoryview) -> Digest:
    return Digest(blake3.blake3(data).digest())


def node_digest(encoding: bytes) -> Digest:
    h = blake3.blake3(_NODE_KEY)
    h.update(encoding)
    return Digest(h.digest())


class Hasher:
    """Incremental hasher for streamed content."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = blake3.blake3()

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> Digest:
        return Digest(self._h.digest())


def allow_threads() -> None:
    """This process never creates a namespace (an ingest worker): from now on a file hashed by
    `hash_fd`/`hash_own_file` is hashed on every core (blake3's thread pool, started on first use
    and kept for the process's life)."""
    global _threads
    _threads = blake3.blake3.AUTO


def hash_fd(fd: int) -> tuple[Digest, int]:
    """Hash everything readable from `fd` (from its current offset); return digest and length."""
    return _hash_reads(fd, None)


def hash_own_file(fd: int, *, direct: bool = False) -> tuple[Digest, int]:
    """Hash the whole of a file this process alone writes (a staged object; `fd` open for
    reading), from offset 0 whatever the descriptor's offset. Read into one reused buffer: from
    the page cache that is faster than hashing a mapping (about 6.4 against 4.4 GB/s for a
    256 MiB file here: a mapping pays a page fault per few pages), and a file truncated meanwhile
    only reads short (a mapping would end this process with SIGBUS).

    `direct`: the file is a new reflink, whose bytes are on disk and none in the page cache. It is
    read with O_DIRECT in 8 MiB requests (where the filesystem takes it, else as any file): a
    fresh clone read through the page cache ran at 0.3-3.8 GB/s on a loop-mounted XFS here, in
    direct requests at 3.3 GB/s every time, and the pages it fills would only crowd out others.
    O_DIRECT is set on `fd` and stays set."""
    if direct and _set_direct(fd):
        return _hash_reads(fd, 0, _DIRECT_CHUNK)
    return _hash_reads(fd, 0)


def _set_direct(fd: int) -> bool:
    """O_DIRECT on `fd`, if the filesystem takes it (EINVAL where it has no direct I/O): only a
    faster way to read, so any refusal means reading as usual."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:
        return False
    return True


def _hash_reads(fd: int, offset: int | None, chunk: int = _CHUNK) -> tuple[Digest, int]:
    """Hash `fd` to EOF in `chunk`-byte reads into one page-aligned buffer (direct I/O needs
    one): from `offset` with pread, or from the descriptor's offset (None). A direct read the
    kernel refuses (EINVAL: an unaligned short read before EOF) goes on without O_DIRECT."""
    import mmap  # here: a session's start-up hashes nothing

    h = blake3.blake3(max_threads=_threads)
    buf = mmap.mmap(-1, chunk)
    view = memoryview(buf)
    total = 0
    try:
        while True:
            try:
                if offset is None:
                    n = os.readv(fd, [buf])
                else:
                    n = os.preadv(fd, [buf], offset + total)
            except OSError as exc:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                if exc.errno != errno.EINVAL or not flags & os.O_DIRECT:
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                continue
            if not n:
                return Digest(h.digest()), total
            h.update(view[:n])
            total += n
    finally:
        view.release()
        buf.close()


def from_hex(text: str) -> Digest:
    raw = bytes.fromhex(text)
    if len(raw) != DIGEST_SIZE:
        raise ValueError(f"a digest has {DIGEST_SIZE * 2} hex digits, got {len(text)}")
    return Digest(raw)
