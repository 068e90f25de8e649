"""The transfer side of a pull: fetch packs and lone blobs, verify every object, stage and
publish them.

A pack's wanted entries are read in one stream (or a few HTTP ranges), each object hashed
(BLAKE3) and compared with the name the pack's index gives it — a small one before it is written
(unnamed, O_TMPFILE, held open while a `HoldBudget` allows), others as they are written — and the
blob must match its descriptor's sha256 and size, or the whole blob is dropped: nothing from it
gets a name. Blobs that pass collect in a `Batch`, published together (syncfs, names, syncfs)
every `every` bytes, sooner when the unnamed files held exhaust the budget, and at the end.

The transfers run on `jobs` threads of the pulling process. (Worker processes, each with its own
connections, budget and batch, were tried and measured no faster on a 2-core machine of this
kind: there, creating small files on one ext4 did not get faster past one process, and that is
most of a pull's time.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any

from veloverlay import faults
from veloverlay.errors import Reason, VeloError
from veloverlay.remote.client import Registry
from veloverlay.remote.pack import PACK_HEADER, Entry
from veloverlay.remote.progress import Meter
from veloverlay.remote.state import ShaMap
from veloverlay.remote.version import Descriptor, PackRef
from veloverlay.store.cas import Stage, Store
from veloverlay.store.digest import hash_bytes
from veloverlay.store.stage import HoldBudget

__all__ = [
    "Batch",
    "BlobReader",
    "Task",
    "fetch_large",
    "fetch_pack",
    "invalid",
    "ranges",
    "run_threads",
    "task_bytes",
]

_GAP = 64 << 10  # wanted entries closer than this are read in one range
_MAX_RANGES = 32  # more ranges than this: read the whole pack
# Pack entries below this are read whole, hashed, then written unnamed (O_TMPFILE, `Stage.hold`);
# larger ones, which an honest pack never holds (push sends objects from 1 MiB up alone), stream.
_WHOLE = 1 << 20

# A transfer: ("pack", the pack, its wanted entries) or ("large", the object, its blob).
Task = tuple[str, Any, Any]


def invalid(msg: str) -> VeloError:
    return VeloError(
        msg,
        reason=Reason.REMOTE_INVALID,
        hint="the registry served content that does not match its names; nothing from that blob "
        "was stored (run the pull again if it was a transfer error)",
    )


class BlobReader:
    """Sequential reads from a response stream, hashing (sha256) and counting everything."""

    def __init__(self, chunks: Iterator[bytes], meter: Meter) -> None:
        self.it = chunks
        self.buf = b""
        self.off = 0  # read position inside buf
        self.pos = 0  # bytes consumed from the blob
        self.sha = hashlib.sha256()
        self.meter = meter

    def _fill(self) -> bool:
        for chunk in self.it:
            if chunk:
                self.sha.update(chunk)
                self.meter.add(len(chunk))
                self.buf, self.off = chunk, 0
                return True
        return False

    def take(self, n: int) -> Iterator[bytes]:
        while n:
            if self.off >= len(self.buf) and not self._fill():
                raise invalid("a blob ended before its last entry")
            k = min(n, len(self.buf) - self.off)
            piece = self.buf[self.off : self.off + k]
            self.off += k
            self.pos += k
            n -= k
            yield piece

    def exact(self, n: int) -> bytes:
        if self.off + n <= len(self.buf):  # the usual case: inside the chunk at hand
            piece = self.buf[self.off : self.off + n]
            self.off += n
            self.pos += n
            return piece
        return b"".join(self.take(n))

    def skip(self, n: int) -> None:
        while n:
            if self.off >= len(self.buf) and not self._fill():
                raise invalid("a blob ended before its last entry")
            k = min(n, len(self.buf) - self.off)
            self.off += k
            self.pos += k
            n -= k

    def drain(self, limit: int) -> None:
        """Read the rest of the stream; more than `limit` bytes in all is an error (a server
        that sends more than it named is not followed forever)."""
        self.pos += len(self.buf) - self.off
        self.off = len(self.buf)
        while self.pos <= limit and self._fill():
            self.pos += len(self.buf)
            self.off = len(self.buf)
        if self.pos > limit:
            raise invalid(f"a blob is longer than the {limit} bytes its descriptor names")


class Batch:
    """Verified stages waiting to be published together: each `every` bytes (one syncfs pair for
    the batch, the renames on two threads), sooner when they hold half of `budget`'s unnamed
    objects (publishing gives them back for the transfers still running), and at `flush`."""

    def __init__(self, every: int, budget: HoldBudget | None = None) -> None:
        self.every = every
        self.budget = budget
        self.pending: list[Stage] = []
        self.size = self.held = 0

    def add(self, stage: Stage, nbytes: int) -> None:
        self.pending.append(stage)
        self.size += nbytes
        self.held += stage.held()
        if self.size >= self.every or (
            self.budget is not None and self.budget.wants_back(self.held)
        ):
            self.flush()

    def flush(self) -> None:
        """Publish the pending stages now."""
        pending = self.pending
        if not pending:
            return
        try:
            first = pending[0]
            for other in pending[1:]:
                first.adopt(other.staged)
                other.staged = {}
            with ThreadPoolExecutor(2) as renamers:  # mkdir/rename release the GIL
                # the stages' unnamed objects are named between the two syncfs, as renamed ones
                first.publish(
                    renamers.map, others=lambda: sum(len(st.name_held()) for st in pending)
                )
        finally:
            self.drop()
        faults.point("remote.pull.published")

    def drop(self) -> None:
        """Close every pending stage: what is not published vanishes."""
        for st in self.pending:
            st.close()
        self.pending = []
        self.size = self.held = 0


def open_stage(store: Store, budget: HoldBudget | None = None) -> Stage:
    """A new stage; with `budget`, holding small objects unnamed while it lasts."""
    stage = Stage(store)
    stage.open()
    stage.ask_store = False  # a pull fetches only what the store lacked
    if budget is not None:
        stage.hold(budget)
    return stage


def ranges(entries: list[Entry], pack_size: int) -> list[tuple[int, int]] | None:
    """The byte ranges to read for `entries` (sorted by offset), entries less than `_GAP` apart
    merged; None when the whole pack is the better read (half of it or more is wanted, or the
    ranges would be too many requests)."""
    if sum(e.length for e in entries) * 2 >= pack_size:
        return None
    spans: list[tuple[int, int]] = []
    for e in entries:
        if spans and e.offset - spans[-1][1] <= _GAP:
            spans[-1] = (spans[-1][0], max(spans[-1][1], e.offset + e.length))
        else:
            spans.append((e.offset, e.offset + e.length))
    return spans if len(spans) <= _MAX_RANGES else None


def _read_bytes(spans: list[tuple[int, int]] | None, pack_size: int) -> int:
    """What reading a pack by `spans` (None: whole) transfers."""
    return pack_size if spans is None else sum(end - start for start, end in spans)


def task_bytes(task: Task) -> int:
    """The bytes a transfer reads (ranges where they are the better read)."""
    kind, a, b = task
    if kind == "large":
        return int(b.size)
    return _read_bytes(ranges(b, a.pack.size), a.pack.size)


def fetch_pack(
    reg: Registry,
    store: Store,
    p: PackRef,
    entries: list[Entry],
    meter: Meter,
    budget: HoldBudget,
) -> tuple[Stage, int]:
    """Fetch the wanted entries of one pack into a new stage, each verified; the caller
    publishes. Few entries of a big pack are read with HTTP range requests where the registry
    serves them (206); otherwise, or when it answers a range with the whole blob or refuses it
    (416), the pack is read whole and must match its sha256."""
    entries = sorted(entries, key=lambda e: e.offset)
    # Empty objects have no bytes to read: a range ends before one at its end (and one of its
    # own would be an empty range), so they are staged without a transfer.
    empty = [e for e in entries if not e.length]
    reads = [e for e in entries if e.length]
    spans = ranges(reads, p.pack.size)

    def add(stage: Stage, rd: BlobReader, e: Entry, base: int) -> None:
        rd.skip(e.offset - base - rd.pos)
        if e.length < _WHOLE:
            data = rd.exact(e.length)
            got = hash_bytes(data)
            if got == e.digest:
                stage.add_bytes(data, got)
        else:
            got, _size, _new = stage.add_stream(rd.take(e.length))
        if got != e.digest:
            raise invalid(
                f"object {e.digest.hex()} in pack {p.pack.digest} does not hash to its name"
            )

    def by_ranges(stage: Stage) -> bool:
        assert spans is not None
        todo = iter(reads)
        e = next(todo, None)
        for start, end in spans:
            with reg.blob_range(p.pack.digest, start, end - 1) as resp:
                if resp.status_code != 206:
                    return False  # no ranges here (200: the whole blob; 416): read it whole
                if not resp.headers.get("content-range", "").startswith(
                    f"bytes {start}-{end - 1}/"
                ):
                    raise invalid(f"the registry sent another range of pack {p.pack.digest}")
                rd = BlobReader(reg.body(resp), meter)
                while e is not None and e.offset < end:
                    add(stage, rd, e, start)
                    e = next(todo, None)
                rd.drain(end - start)
                if rd.pos != end - start:
                    raise invalid(f"a range of pack {p.pack.digest} has the wrong length")
        return True

    def whole(stage: Stage) -> None:
        with reg.blob_stream(p.pack.digest) as resp:
            rd = BlobReader(reg.body(resp), meter)
            if rd.exact(len(PACK_HEADER)) != PACK_HEADER:
                raise invalid(f"pack {p.pack.digest} has a bad header")
            for e in reads:
                add(stage, rd, e, 0)
            rd.drain(p.pack.size)
        if rd.pos != p.pack.size or "sha256:" + rd.sha.hexdigest() != p.pack.digest:
            raise invalid(f"pack {p.pack.digest} does not match its digest or size")

    def once() -> Stage:
        stage = open_stage(store, budget)
        try:
            if spans is None or not by_ranges(stage):
                stage.close()
                stage = open_stage(store, budget)
                whole(stage)
            for e in empty:
                nothing = hash_bytes(b"")
                if nothing != e.digest:
                    raise invalid(f"empty object {e.digest.hex()} in pack {p.pack.digest}")
                stage.add_bytes(b"", nothing)
        except BaseException:
            stage.close()
            raise
        meter.add(0, len(entries))
        return stage

    return reg.retrying(once), _read_bytes(spans, p.pack.size)


def fetch_large(
    reg: Registry, store: Store, d: bytes, x: Descriptor, meter: Meter, shamap: ShaMap
) -> tuple[Stage, int]:
    """Fetch one object that travels alone into a new stage, verified (BLAKE3 and the blob's
    sha256 and size)."""

    def once() -> Stage:
        stage = open_stage(store)
        try:
            with reg.blob_stream(x.digest) as resp:
                rd = BlobReader(reg.body(resp), meter)
                got, _size, _new = stage.add_stream(rd.take(x.size))
                rd.drain(x.size)
            if got != d:
                raise invalid(f"object {d.hex()} (blob {x.digest}) does not hash to its name")
            if rd.pos != x.size or "sha256:" + rd.sha.hexdigest() != x.digest:
                raise invalid(f"blob {x.digest} does not match its digest or size")
        except BaseException:
            stage.close()
            raise
        shamap.add({d: x.digest})
        meter.add(0, 1)
        return stage

    return reg.retrying(once), x.size


def run_threads(
    reg: Registry,
    store: Store,
    tasks: list[Task],
    jobs: int,
    meter: Meter,
    budget: HoldBudget,
    every: int,
) -> None:
    """Every transfer on `jobs` threads of this process, published as they complete."""
    shamap = ShaMap(store)
    batch = Batch(every, budget)
    with ThreadPoolExecutor(jobs) as pool:
        futs: list[Future[tuple[Stage, int]]] = [
            pool.submit(fetch_pack, reg, store, a, b, meter, budget)
            if kind == "pack"
            else pool.submit(fetch_large, reg, store, a, b, meter, shamap)
            for kind, a, b in tasks
        ]
        try:
            for f in as_completed(futs):
                batch.add(*f.result())
            batch.flush()
        except BaseException:
            for f in futs:
                f.cancel()
            for f in futs:
                if not f.cancelled() and f.exception() is None:
                    batch.pending.append(f.result()[0])
            batch.drop()
            raise
