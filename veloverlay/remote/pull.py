"""Pull a version from a registry into the store: fetch only what is missing, verify everything.

Order: the manifest (by tag or digest; by digest it must hash to it), its config, every pack index
(each checked against its sha256). Then the nodes the store lacks, from the node packs: each must
hash to its digest and decode strictly, and the root's closure must be complete — before any object
is fetched. Then the packs (and lone blobs) holding objects the store lacks, `jobs` at a time, each
streamed into its own stage: every object is hashed (BLAKE3) and must equal the name the index
gives it (a pack's small objects before they are written, unnamed and held open; others as they
are written), and the blob must match its descriptor's sha256 and size, or the whole blob is
dropped: nothing from it gets a name. Blobs that pass are published in batches (syncfs, renames,
syncfs; every `publish_bytes`, 64 MiB by default, sooner when the unnamed ones exhaust the
descriptors they may hold, and at the end), so a pull that is killed resumes where it stopped:
the next pull finds those objects present and fetches the rest.
The ref moves last, in one LMDB transaction with the nodes: a killed pull never leaves a ref that
points at a version the store does not fully hold. Pulled objects are ordinary objects: `fsck`
re-hashes them, `gc` keeps them when a ref reaches them.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any

from veloverlay import faults, workers
from veloverlay.errors import Reason, VeloError
from veloverlay.records import Record
from veloverlay.remote.client import Options, Registry
from veloverlay.remote.name import RemoteName, parse_remote
from veloverlay.remote.pack import KIND_NODE, PACK_HEADER, Entry, decode_index
from veloverlay.remote.progress import Meter, ProgressFn
from veloverlay.remote.state import BlobCache, ShaMap, Versions
from veloverlay.remote.version import Descriptor, PackRef, parse_config, parse_manifest
from veloverlay.store import incoming, quarantine
from veloverlay.store.cas import Stage, Store
from veloverlay.store.digest import hash_bytes, node_digest
from veloverlay.store.manifest import Manifests, check_ref_name
from veloverlay.store.stage import HOLD_FILES, HoldBudget
from veloverlay.store.tree import Kind, Node, decode

__all__ = ["pull", "PullResult", "PUBLISH_BYTES"]


_GAP = 64 << 10  # wanted entries closer than this are read in one range
_MAX_RANGES = 32  # more ranges than this: read the whole pack
PUBLISH_BYTES = 64 << 20  # publish verified blobs in batches this big (2 syncfs per batch)
# Pack entries below this are read whole, hashed, then written unnamed (O_TMPFILE, `Stage.hold`);
# larger ones, which an honest pack never holds (push sends objects from 1 MiB up alone), stream.
_WHOLE = 1 << 20


class PullResult(Record):
    remote: str
    digest: str
    ref: str
    root: str
    commit: str | None = None  # None: the ref already pointed at this version
    stripped_setid: int = 0  # files whose setuid/setgid bits were dropped (see keep_setid)
    objects: int = 0  # in the version's closure
    objects_fetched: int = 0
    blobs_fetched: int = 0
    bytes_fetched: int = 0  # every blob byte received
    requests: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return self.field_dict()


def _message(cfg: dict[str, Any]) -> str:
    """The pushed commit message, as text (what a registry serves is not trusted to be any)."""
    msg = cfg.get("message")
    return msg[:4096] if isinstance(msg, str) else ""


def _invalid(msg: str) -> VeloError:
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
                raise _invalid("a blob ended before its last entry")
            k = min(n, len(self.buf) - self.off)
            piece = self.buf[self.off : self.off + k]
            self.off += k
            self.pos += k
            n -= k
            yield piece

    def exact(self, n: int) -> bytes:
        return b"".join(self.take(n))

    def skip(self, n: int) -> None:
        while n:
            if self.off >= len(self.buf) and not self._fill():
                raise _invalid("a blob ended before its last entry")
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
            raise _invalid(f"a blob is longer than the {limit} bytes its descriptor names")


def pull(
    store: Store,
    m: Manifests,
    remote: str | RemoteName,
    *,
    name: str | None = None,
    path: str | None = None,
    options: Options | None = None,
    progress: ProgressFn | None = None,
    publish_bytes: int = PUBLISH_BYTES,
    keep_setid: bool = False,
) -> PullResult:
    """Pull `remote` (`HOST/REPO:TAG` or `@sha256:…`) into ref `name` (default: the ref name the
    version was pushed from). An existing ref gets the version as a new commit on top (its log
    keeps what it had). The version's recorded ingest path is not trusted: pass `path`.
    Verified blobs are published (made durable and named) each time `publish_bytes` of them have
    arrived, and at the end: what a killed pull published, the next one does not fetch again.
    The tree must pass what an imported bundle must (`store.incoming`: whole, honest sizes, no
    deeper than a checkout can make); setuid/setgid bits are dropped unless `keep_setid`."""
    t0 = time.monotonic()
    rn = parse_remote(remote) if isinstance(remote, str) else remote
    if rn.reference is None:
        raise VeloError(
            f"{rn} names no tag or digest",
            reason=Reason.USAGE,
            hint="append :TAG or @sha256:DIGEST",
        )
    if name is not None:
        check_ref_name(name)
    store.writable()
    with Registry(rn, options) as reg, store.lock():
        store.reclaim_tmp()
        body, digest, ctype = reg.get_manifest(rn.reference)
        v = parse_manifest(body, digest, ctype)
        cfg = parse_config(reg.get_blob(v.config.digest, v.config.size, limit=1 << 20))
        root = bytes.fromhex(cfg["root"])
        pushed_as = cfg.get("ref")
        if name is None and pushed_as is not None and not isinstance(pushed_as, str):
            raise _invalid("the version's ref name is not a string")
        if not (name or pushed_as or rn.tag):
            raise VeloError(
                f"the version {digest} does not say which ref it was pushed from",
                reason=Reason.USAGE,
                hint="name the ref to pull into with --name REF",
            )
        refname = check_ref_name(name or pushed_as or rn.tag or "")
        tiers = cfg.get("tiers")
        if tiers is not None and not incoming.valid_tiers(tiers):
            raise _invalid("the version's tier rules are invalid")
        res = PullResult(str(rn), digest, refname, root.hex())
        heal = bool(quarantine.wanted(store))  # fsck set objects aside: look for them here too
        with m.read() as txn:
            existing = m.get_ref(txn, refname)
            if (
                not heal
                and existing is not None
                and m.get_commit(txn, existing.head).root == root.hex()
            ):
                res.requests = reg.requests
                res.seconds = time.monotonic() - t0
                return res  # up to date (a ref's whole closure is stored)
        jobs = max(1, reg.opts.jobs)
        with workers.more_files(HOLD_FILES), ThreadPoolExecutor(jobs) as pool:
            cache = BlobCache(store)
            datas = list(
                pool.map(
                    lambda p: cache.fetch(
                        p.index.digest,
                        p.index.size,
                        lambda: reg.get_blob(p.index.digest, p.index.size),  # noqa: B023
                    ),
                    v.packs,
                )
            )
            where: dict[tuple[int, bytes], tuple[PackRef, Entry]] = {}
            for p, data in zip(v.packs, datas, strict=True):
                for e in decode_index(data, p.pack.size):
                    if (e.kind == KIND_NODE) != (p.kind == "nodes"):
                        raise _invalid(f"pack {p.pack.digest} mixes nodes and objects")
                    where.setdefault((e.kind, e.digest), (p, e))
            nodes, objects, decoded = _walk(reg, m, root, where, stored_too=heal)
            res.objects = len(objects)
            missing = sorted(d for d in objects if not store.has(d))
            by_pack: dict[str, tuple[PackRef, list[Entry]]] = {}
            alone: list[tuple[bytes, Descriptor]] = []
            sizes: dict[bytes, int] = {}  # what a fetched object is (its bytes are checked)
            for d in missing:
                hit = where.get((1, d))
                if hit is not None:
                    by_pack.setdefault(hit[0].pack.digest, (hit[0], []))[1].append(hit[1])
                    sizes[d] = hit[1].length
                elif d in v.large:
                    alone.append((d, v.large[d]))
                    sizes[d] = v.large[d].size
                else:
                    raise _invalid(f"the remote version lacks object {d.hex()}")
            total = sum(x.size for _, x in alone)
            for p, es in by_pack.values():
                es.sort(key=lambda e: e.offset)
                spans = ranges(es, p.pack.size)
                total += p.pack.size if spans is None else sum(b - a for a, b in spans)
            meter = Meter("pull", total, len(missing), progress)
            shamap = ShaMap(store)
            budget = HoldBudget(store)  # (its size: the file limit `more_files` set)
            futs = [
                pool.submit(_fetch_pack, reg, store, p, es, meter, budget)
                for p, es in by_pack.values()
            ]
            futs += [pool.submit(_fetch_large, reg, store, d, x, meter, shamap) for d, x in alone]
            _publish_as_done(futs, publish_bytes, budget)
            meter.finish()
        res.blobs_fetched = len(futs)
        res.objects_fetched = len(missing)
        res.bytes_fetched = meter.done + reg.bytes_in  # + config, indexes, node packs
        for d in missing:
            if not store.has(d):
                raise _invalid(f"object {d.hex()} did not arrive")
        with m.read() as txn:
            setid = incoming.check_closure(store, m, txn, root, nodes, sizes, _invalid, decoded)
        faults.point("remote.pull.fetched")
        with m.write() as txn:
            for d, data in nodes.items():
                m.put_raw_node(txn, d, data)
            if not keep_setid:
                root, res.stripped_setid = incoming.strip_setid(m, txn, root, setid)
                res.root = root.hex()
            existing = m.get_ref(txn, refname)
            if existing is not None and m.get_commit(txn, existing.head).root == root.hex():
                res.commit = None
            else:
                c = m.commit(
                    txn,
                    refname,
                    root,
                    expect_head=existing.head if existing is not None else None,
                    message=f"pull {rn.host}/{rn.repo}@{digest}: {_message(cfg)}",
                    path=os.path.abspath(path) if path is not None else None,
                    tiers=tiers,
                )
                res.commit = c.id
        Versions(store).set(rn.registry, refname, rn.repo, digest)
        res.requests = reg.requests
    res.seconds = time.monotonic() - t0
    return res


def _walk(
    reg: Registry,
    m: Manifests,
    root: bytes,
    where: dict[tuple[int, bytes], tuple[PackRef, Entry]],
    *,
    stored_too: bool = False,
) -> tuple[dict[bytes, bytes], set[bytes], dict[bytes, Node]]:
    """The directory nodes of `root` this store lacks (fetched from the node packs, each checked),
    the objects they name, and those nodes decoded. A node the store has is not descended into:
    every writer (ingest, commit, import, pull) stores a node's whole closure before the node
    itself, and gc removes nodes before the objects they name, so a stored node's objects are
    stored — unless fsck set some aside (`stored_too`: stored nodes are read, from the store,
    for the objects they name)."""
    packs: dict[str, bytes] = {}
    out: dict[bytes, bytes] = {}
    decoded: dict[bytes, Node] = {}
    objects: set[bytes] = set()
    stack = [root]
    seen: set[bytes] = set()
    with m.read() as txn:
        while stack:
            d = stack.pop()
            if d in seen:
                continue
            seen.add(d)
            if m.has_node(txn, d):
                if stored_too:
                    for ent in m.get_node(txn, d).entries:
                        if ent.kind is Kind.DIR:
                            stack.append(ent.digest)
                        elif ent.kind is Kind.FILE:
                            objects.add(ent.digest)
                continue
            hit = where.get((KIND_NODE, d))
            if hit is None:
                raise _invalid(f"the remote version lacks node {d.hex()}")
            p, e = hit
            blob = packs.get(p.pack.digest)
            if blob is None:
                blob = packs[p.pack.digest] = reg.get_blob(p.pack.digest, p.pack.size)
            data = blob[e.offset : e.offset + e.length]
            if node_digest(data) != d:
                raise _invalid(f"node {d.hex()} does not hash to its name")
            try:
                node = decode(data)
            except VeloError as exc:
                raise _invalid(f"node {d.hex()}: {exc.message}") from None
            out[d] = data
            decoded[d] = node
            for ent in node.entries:
                if ent.kind is Kind.DIR:
                    stack.append(ent.digest)
                elif ent.kind is Kind.FILE:
                    objects.add(ent.digest)
    return out, objects, decoded


def _publish_as_done(
    futs: list[Future[tuple[Stage, int]]], every: int, budget: HoldBudget | None = None
) -> None:
    """Collect the workers' verified stages; publish them together each `every` bytes (one
    syncfs pair for the batch, the renames on two threads), sooner when they hold half of
    `budget`'s unnamed objects (publishing gives them back for the transfers still running),
    and at the end. On any failure, what is not published is dropped."""
    pending: list[Stage] = []
    size = held = 0

    def flush() -> None:
        nonlocal size, held
        if not pending:
            return
        first = pending[0]
        for other in pending[1:]:
            first.adopt(other.staged)
            other.staged = {}
        with ThreadPoolExecutor(2) as renamers:  # mkdir/rename release the GIL
            # the stages' unnamed objects are named between the two syncfs, as renamed ones
            first.publish(renamers.map, others=lambda: sum(len(st.name_held()) for st in pending))
        for st in pending:
            st.close()
        pending.clear()
        size = held = 0
        faults.point("remote.pull.published")

    try:
        for f in as_completed(futs):
            stage, n = f.result()
            pending.append(stage)
            size += n
            held += stage.held()
            if size >= every or (budget is not None and budget.wants_back(held)):
                flush()
        flush()
    except BaseException:
        for f in futs:
            f.cancel()
        for f in futs:
            if not f.cancelled() and f.exception() is None:
                pending.append(f.result()[0])
        for st in pending:
            st.close()
        raise


def _open_stage(store: Store, budget: HoldBudget | None = None) -> Stage:
    """A new stage; with `budget`, holding small objects unnamed while it lasts."""
    stage = Stage(store)
    stage.open()
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


def _fetch_pack(
    reg: Registry,
    store: Store,
    p: PackRef,
    entries: list[Entry],
    meter: Meter,
    budget: HoldBudget,
) -> tuple[Stage, int]:
    """Fetch the wanted entries of one pack into a new stage, each verified; the caller
    publishes. Few entries of a big pack are read with HTTP range requests where the registry
    serves them (206); otherwise, or when it answers a range with the whole blob, the pack is read
    whole and must match its sha256."""
    entries = sorted(entries, key=lambda e: e.offset)
    spans = ranges(entries, p.pack.size)

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
            raise _invalid(
                f"object {e.digest.hex()} in pack {p.pack.digest} does not hash to its name"
            )

    def by_ranges(stage: Stage) -> bool:
        assert spans is not None
        todo = iter(entries)
        e = next(todo, None)
        for start, end in spans:
            with reg.blob_range(p.pack.digest, start, end - 1) as resp:
                if resp.status_code != 206:
                    return False  # no ranges here: read it whole
                if not resp.headers.get("content-range", "").startswith(
                    f"bytes {start}-{end - 1}/"
                ):
                    raise _invalid(f"the registry sent another range of pack {p.pack.digest}")
                rd = BlobReader(reg.body(resp), meter)
                while e is not None and e.offset < end:
                    add(stage, rd, e, start)
                    e = next(todo, None)
                rd.drain(end - start)
                if rd.pos != end - start:
                    raise _invalid(f"a range of pack {p.pack.digest} has the wrong length")
        return True

    def whole(stage: Stage) -> None:
        with reg.blob_stream(p.pack.digest) as resp:
            rd = BlobReader(reg.body(resp), meter)
            if rd.exact(len(PACK_HEADER)) != PACK_HEADER:
                raise _invalid(f"pack {p.pack.digest} has a bad header")
            for e in entries:
                add(stage, rd, e, 0)
            rd.drain(p.pack.size)
        if rd.pos != p.pack.size or "sha256:" + rd.sha.hexdigest() != p.pack.digest:
            raise _invalid(f"pack {p.pack.digest} does not match its digest or size")

    def once() -> Stage:
        stage = _open_stage(store, budget)
        try:
            if spans is None or not by_ranges(stage):
                stage.close()
                stage = _open_stage(store, budget)
                whole(stage)
        except BaseException:
            stage.close()
            raise
        meter.add(0, len(entries))
        return stage

    size = p.pack.size if spans is None else sum(b - a for a, b in spans)
    return reg.retrying(once), size


def _fetch_large(
    reg: Registry, store: Store, d: bytes, x: Descriptor, meter: Meter, shamap: ShaMap
) -> tuple[Stage, int]:
    def once() -> Stage:
        stage = _open_stage(store)
        try:
            with reg.blob_stream(x.digest) as resp:
                rd = BlobReader(reg.body(resp), meter)
                got, _size, _new = stage.add_stream(rd.take(x.size))
                rd.drain(x.size)
            if got != d:
                raise _invalid(f"object {d.hex()} (blob {x.digest}) does not hash to its name")
            if rd.pos != x.size or "sha256:" + rd.sha.hexdigest() != x.digest:
                raise _invalid(f"blob {x.digest} does not match its digest or size")
        except BaseException:
            stage.close()
            raise
        shamap.add({d: x.digest})
        meter.add(0, 1)
        return stage

    return reg.retrying(once), x.size
