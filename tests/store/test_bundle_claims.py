"""A bundle's record lengths are claims. A node record may be up to `MAX_NODE` (1 GiB: wide
directories are real), and import read one with `read(length)`, which allocates the whole
claimed length before it reads a byte: a crafted header of a few dozen bytes naming 1 GiB cost
1 GiB of memory (or a MemoryError under a memory limit) before "truncated". A node record is now
allocated only as its bytes arrive: a regular file says at once that they are not there, a pipe
after the bytes it did carry."""

from __future__ import annotations

import json
import os
import struct
import threading
import tracemalloc
from collections.abc import Callable
from typing import IO

import pytest

from veloverlay.errors import Reason, VeloError
from veloverlay.store.bundle import MAGIC, MAX_NODE, import_bundle
from veloverlay.verbs.repo import Repo

_META, _NODE = 1, 2
LIMIT = 32 << 20  # far below the claim, far above what reading the real bytes takes


def _crafted() -> bytes:
    m = json.dumps({"ref": "hand", "root": "00" * 32, "path": None, "message": "m"}).encode()
    head = MAGIC + struct.pack("<I", 1) + struct.pack("<BQ", _META, len(m)) + m
    return head + struct.pack("<BQ", _NODE, MAX_NODE) + b"\x11" * 32 + b"VNOD" + b"\0" * 60


def _peak_of(run: Callable[[], object]) -> tuple[int, VeloError]:
    tracemalloc.start()
    try:
        with pytest.raises(VeloError) as ei:
            run()
        return tracemalloc.get_traced_memory()[1], ei.value
    finally:
        tracemalloc.stop()


def _state(r: Repo) -> object:
    with r.m.read() as txn:
        refs = [x.name for x in r.m.refs(txn)]
    return refs, [sorted(os.walk(os.path.join(r.store.root, d))) for d in ("objects-v2", "tmp")]


def test_a_crafted_node_length_from_a_file(repo: Repo, shm_tmp: str) -> None:
    path = os.path.join(shm_tmp, "crafted.velo")
    with open(path, "wb") as f:
        f.write(_crafted())
    before = _state(repo)
    with open(path, "rb") as f:
        peak, err = _peak_of(lambda: import_bundle(repo.store, repo.m, f))
    assert err.reason is Reason.BUNDLE_INVALID and "truncated" in err.message, err
    assert peak < LIMIT, f"{peak:,} bytes allocated for a {len(_crafted())}-byte bundle"
    assert _state(repo) == before


def test_a_crafted_node_length_from_a_pipe(repo: Repo) -> None:
    rfd, wfd = os.pipe()
    data = _crafted()

    def feed() -> None:
        with os.fdopen(wfd, "wb") as w:
            w.write(data)

    t = threading.Thread(target=feed)
    t.start()
    before = _state(repo)
    try:
        f: IO[bytes]
        with os.fdopen(rfd, "rb") as f:
            peak, err = _peak_of(lambda: import_bundle(repo.store, repo.m, f))
    finally:
        t.join()
    assert err.reason is Reason.BUNDLE_INVALID and "truncated" in err.message, err
    assert peak < LIMIT, f"{peak:,} bytes allocated for a {len(data)}-byte bundle"
    assert _state(repo) == before
