"""Reading an object as what its name says it is: the size its manifest entry gives it, checked
before the first byte, and its BLAKE3, checked after the last (`checkout`, `cat`, `export`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from veloverlay import files
from veloverlay.errors import Reason, VeloError
from veloverlay.store.digest import Hasher

__all__ = ["object_corrupt", "open_regular", "verified_chunks"]

_CHUNK = 1 << 20


def object_corrupt(digest: bytes, why: str) -> VeloError:
    """The error for an object whose bytes are not what its name (or its entry) says."""
    return VeloError(
        f"object {digest.hex()} is damaged: {why}",
        reason=Reason.OBJECT_CORRUPT,
        hint="nothing was served from it; run 'veloverlay fsck' to see what else is affected",
    )


def open_regular(path: bytes, digest: bytes) -> int:
    """Open the object at `path` for reading, refusing what is not a regular file. A FIFO put
    in an object's place would block an open or a read for ever (checkout, export, fsck hung on
    one); with O_NONBLOCK the open returns and the type is checked before anything is read."""
    try:
        return files.open_regular(path)
    except files.NotRegular:
        raise object_corrupt(digest, "it is not a regular file") from None


def verified_chunks(fd: int, digest: bytes, size: int | None = None) -> Iterator[bytes]:
    """Read `fd` (an object opened by the caller) to its end, checking size and BLAKE3."""
    have = os.fstat(fd).st_size
    if size is not None and have != size:
        raise object_corrupt(digest, f"it is {have} bytes, its manifest entry says {size}")
    h = Hasher()
    n = 0
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
        n += len(chunk)
        if size is not None and n > size:
            raise object_corrupt(digest, f"it grew past the {size} bytes of its entry")
        yield chunk
    if h.digest() != digest:
        raise object_corrupt(digest, f"its bytes hash to {h.digest().hex()}")
