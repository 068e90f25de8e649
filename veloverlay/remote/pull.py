"""Pull a version from a registry into the store: fetch only what is missing, verify everything.

Order: the manifest (by tag or digest; by digest it must hash to it), its config, every pack index
(each checked against its sha256). Then the nodes the store lacks, from the node packs: each must
hash to its digest and decode strictly, and the root's closure must be complete, every file's
size the one its object is offered with, the tree no deeper than a checkout can make — before any
object is fetched. Then the packs (and lone blobs) holding objects the store lacks, `jobs` at a time
(`fetch`), each streamed into its own stage: every object is hashed (BLAKE3) and must equal the
name the index gives it (a pack's small objects before they are written, unnamed and held open;
others as they are written), and the blob must match its descriptor's sha256 and size, or the
whole blob is dropped: nothing from it gets a name. Blobs that pass are published in batches
(syncfs, renames, syncfs; every `publish_bytes`, 64 MiB by default, sooner when the unnamed ones
exhaust the descriptors they may hold, and at the end), so a pull that is killed resumes where it
stopped: the next pull finds those objects present and fetches the rest.
The ref moves last, in one LMDB transaction with the nodes: a killed pull never leaves a ref that
points at a version the store does not fully hold. The note of where the ref came from is written
just before (`remote.state.Versions`): a ref never moves without it. Pulled objects are ordinary
objects: `fsck` re-hashes them, `gc` keeps them when a ref reaches them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from veloverlay import faults, workers
from veloverlay.errors import Reason, VeloError
from veloverlay.files import given_path
from veloverlay.records import Record
from veloverlay.remote.client import Options, Registry
from veloverlay.remote.fetch import Task, invalid, run_threads, task_bytes
from veloverlay.remote.name import RemoteName, parse_remote
from veloverlay.remote.pack import KIND_NODE, Entry, decode_index
from veloverlay.remote.progress import Meter, ProgressFn
from veloverlay.remote.state import BlobCache, Versions
from veloverlay.remote.version import PackRef, parse_config, parse_manifest
from veloverlay.store import incoming, quarantine
from veloverlay.store.cas import Store
from veloverlay.store.digest import node_digest
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.stage import HOLD_FILES, HoldBudget, store_error
from veloverlay.store.tree import Kind, Node, decode
from veloverlay.store.versions import Ref, new_lineage

__all__ = ["pull", "PullResult", "PUBLISH_BYTES"]


PUBLISH_BYTES = 64 << 20  # publish verified blobs in batches this big (2 syncfs per batch)


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
    force: bool = False,
) -> PullResult:
    """Pull `remote` (`HOST/REPO:TAG` or `@sha256:…`) into ref `name` (default: the ref name the
    version was pushed from). An existing ref gets the version as a new commit on top (its log
    keeps what it had) only when this store last pulled it from (or pushed it to) this registry
    and repository, or with `force`: else OTHER_SOURCE, before anything is fetched (the registry
    names the ref; it must not move one of the user's own). The version's recorded ingest path
    is not trusted: pass `path`.
    Verified blobs are published (made durable and named) each time `publish_bytes` of them have
    arrived, and at the end: what a killed pull published, the next one does not fetch again.
    The tree must pass what an imported bundle must (`store.incoming`: whole, honest sizes, no
    deeper than a checkout can make); setuid/setgid bits are dropped unless `keep_setid`."""
    t0 = time.monotonic()
    if path is not None:
        given_path(path, "--path")
    rn = parse_remote(remote) if isinstance(remote, str) else remote
    if rn.reference is None:
        raise VeloError(
            f"{rn} names no tag or digest",
            reason=Reason.USAGE,
            hint="append :TAG or @sha256:DIGEST",
        )
    if name is not None:
        incoming.target_ref(name)
    store.writable()
    with Registry(rn, options) as reg, store.lock():
        store.reclaim_tmp()
        body, digest, ctype = reg.get_manifest(rn.reference)
        v = parse_manifest(body, digest, ctype)
        cfg = parse_config(reg.get_blob(v.config.digest, v.config.size, limit=1 << 20))
        root = bytes.fromhex(cfg["root"])
        pushed_as = cfg.get("ref")
        if name is None and pushed_as is not None and not isinstance(pushed_as, str):
            raise invalid("the version's ref name is not a string")
        if not (name or pushed_as or rn.tag):
            raise VeloError(
                f"the version {digest} does not say which ref it was pushed from",
                reason=Reason.USAGE,
                hint="name the ref to pull into with --name REF",
            )
        refname = incoming.target_ref(name or pushed_as or rn.tag or "")
        tiers = cfg.get("tiers")
        if tiers is not None and not incoming.valid_tiers(tiers):
            raise invalid("the version's tier rules are invalid")
        res = PullResult(str(rn), digest, refname, root.hex())
        heal = bool(quarantine.wanted(store))  # fsck set objects aside: look for them here too
        with m.read() as txn:
            # Whether this source may move the ref comes first: a ref of the user's own that
            # holds the same tree is not "up to date" with the registry, it is not its ref.
            existing = _check_target(store, m, txn, rn, refname, force)
            same = existing is not None and m.get_commit(txn, existing.head).root == root.hex()
        if same and not heal:  # up to date (a ref's whole closure is stored)
            assert existing is not None  # as below: a --force adopts it, a newer manifest of
            had = existing.head  # (a `refs --delete` meanwhile: no note of a ref that is gone)
            Versions(store).set(
                rn.registry,
                refname,
                rn.repo,
                digest,
                existing.lineage,
                had,
                still=lambda: _head_is(m, refname, had),
            )
            res.requests = reg.requests  # the tree is noted
            res.seconds = time.monotonic() - t0
            return res
        jobs = max(1, reg.opts.jobs)
        with workers.more_files(HOLD_FILES):
            with ThreadPoolExecutor(jobs) as pool:
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
                        raise invalid(f"pack {p.pack.digest} mixes nodes and objects")
                    where.setdefault((e.kind, e.digest), (p, e))
            nodes, objects, decoded = _walk(reg, store, m, root, where, stored_too=heal)
            res.objects = len(objects)
            missing = store.missing(objects)
            by_pack: dict[str, tuple[PackRef, list[Entry]]] = {}
            tasks: list[Task] = []
            sizes: dict[bytes, int] = {}  # what a fetched object is (its bytes are checked)
            for d in missing:
                hit = where.get((1, d))
                if hit is not None:
                    by_pack.setdefault(hit[0].pack.digest, (hit[0], []))[1].append(hit[1])
                    sizes[d] = hit[1].length
                elif d in v.large:
                    tasks.append(("large", d, v.large[d]))
                    sizes[d] = v.large[d].size
                else:
                    raise invalid(f"the remote version lacks object {d.hex()}")
            for p, es in by_pack.values():
                es.sort(key=lambda e: e.offset)
                tasks.append(("pack", p, es))
            # Before any object is fetched (a refused tree costs no transfer): the sizes checked
            # are those the indexes and descriptors give, which every fetched object must have.
            with m.read() as txn:
                setid = incoming.check_closure(store, m, txn, root, nodes, sizes, invalid, decoded)
            meter = Meter("pull", sum(map(task_bytes, tasks)), len(missing), progress)
            budget = HoldBudget(store)  # (its size: the file limit `more_files` set)
            run_threads(reg, store, tasks, jobs, meter, budget, publish_bytes)
            meter.finish()
        res.blobs_fetched = len(tasks)
        res.objects_fetched = len(missing)
        res.bytes_fetched = meter.done + reg.bytes_in  # + config, indexes, node packs
        lost = store.missing(missing)
        if lost:
            raise invalid(f"object {lost[0].hex()} did not arrive")
        faults.point("remote.pull.fetched")
        # The note first, for the lineage the ref has or gets: the ref and its note cannot move
        # in one transaction (the notes are a file), and a note whose commit never comes names
        # a lineage no ref has (see `Versions`). A ref that moved without its note made every
        # later pull of it refuse (OTHER_SOURCE) until --force.
        lineage = existing.lineage if existing is not None else new_lineage()
        Versions(store).set(rn.registry, refname, rn.repo, digest, lineage)
        faults.point("remote.pull.noted")
        with m.write() as txn:
            for d, data in nodes.items():
                m.put_raw_node(txn, d, data)
            if not keep_setid:
                root, res.stripped_setid = incoming.strip_setid(m, txn, root, setid)
                res.root = root.hex()
            existing = _check_target(store, m, txn, rn, refname, force)  # (made meanwhile?)
            if existing is not None and m.get_commit(txn, existing.head).root == root.hex():
                res.commit = None
            else:
                msg = incoming.message(cfg.get("message"))
                c = m.commit(
                    txn,
                    refname,
                    root,
                    expect_head=existing.head if existing is not None else None,
                    message=f"pull {rn.host}/{rn.repo}@{digest}: {msg}",
                    path=os.path.abspath(path) if path is not None else None,
                    tiers=tiers,
                    lineage=lineage,
                )
                res.commit = c.id
            now = m.get_ref(txn, refname)
        if now is not None:  # the head that came from there (and the lineage, for a --force
            # onto a ref made meanwhile): a ref moved later by anything else is not from there
            head = now.head  # (a `refs --delete` since: no note of a ref that is gone)
            Versions(store).set(
                rn.registry,
                refname,
                rn.repo,
                digest,
                now.lineage,
                head,
                still=lambda: _head_is(m, refname, head),
            )
        res.requests = reg.requests
    res.seconds = time.monotonic() - t0
    return res


def _head_is(m: Manifests, refname: str, head: str) -> bool:
    """Is `head` still the head of ref `refname`?"""
    with m.read() as txn:
        ref = m.get_ref(txn, refname)
    return ref is not None and ref.head == head


def _check_target(
    store: Store, m: Manifests, txn: Txn, rn: RemoteName, refname: str, force: bool
) -> Ref | None:
    """The ref a pull of `rn` may write to, if it exists: one this store last pulled from (or
    pushed to) the same registry and repository; another only with `force`."""
    ref = m.get_ref(txn, refname)
    if ref is None or force:
        return ref
    notes = Versions(store)
    if notes.source(rn.registry, ref) == rn.repo:
        return ref
    came = f"was ingested from {ref.path}" if ref.path else "did not come from there"
    for host in notes.load():
        repo = notes.source(host, ref)  # (a note of another ref of that name says nothing)
        if repo is not None:
            came = f"was last pulled from or pushed to {host}/{repo}"
    raise VeloError(
        f"ref '{refname}' exists and {came}; the version {rn} would become its next commit",
        reason=Reason.OTHER_SOURCE,
        hint=f"pull it under another name with --name REF (then run REF); to make it the next "
        f"version of {refname} anyway, --force",
    )


def _walk(
    reg: Registry,
    store: Store,
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
    for the objects they name). Memory holds the nodes, never the packs they come in."""
    packs = _NodePacks(reg, store)
    out: dict[bytes, bytes] = {}
    decoded: dict[bytes, Node] = {}
    objects: set[bytes] = set()
    stack = [root]
    seen: set[bytes] = set()
    with packs, m.read() as txn:
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
                raise invalid(f"the remote version lacks node {d.hex()}")
            data = packs.entry(*hit)
            if node_digest(data) != d:
                raise invalid(f"node {d.hex()} does not hash to its name")
            try:
                node = decode(data)
            except VeloError as exc:
                raise invalid(f"node {d.hex()}: {exc.message}") from None
            out[d] = data
            decoded[d] = node
            for ent in node.entries:
                if ent.kind is Kind.DIR:
                    stack.append(ent.digest)
                elif ent.kind is Kind.FILE:
                    objects.add(ent.digest)
    return out, objects, decoded


class _NodePacks:
    """The node packs a walk fetched, in one unnamed file in the store's `tmp/` (gone when
    closed), each checked against its sha256 and size as it arrives; entries are read back by
    offset. A version may name many packs, each up to 256 MiB, holding more than the nodes the
    store lacks: kept in memory, they made a pull's memory grow with the packs' sizes."""

    LIMIT = 256 << 20  # one node pack at most (as any small blob read whole)

    def __init__(self, reg: Registry, store: Store) -> None:
        self.reg = reg
        self.store = store
        self.fd = -1
        self.end = 0
        self.base: dict[str, int] = {}

    def __enter__(self) -> _NodePacks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def entry(self, p: PackRef, e: Entry) -> bytes:
        base = self.base.get(p.pack.digest)
        if base is None:
            base = self.base[p.pack.digest] = self._fetch(p.pack.digest, p.pack.size)
        out = bytearray()
        while len(out) < e.length:
            chunk = os.pread(self.fd, min(e.length - len(out), 1 << 24), base + e.offset + len(out))
            if not chunk:
                raise invalid(f"pack {p.pack.digest} ended early")  # (checked: cannot happen)
            out += chunk
        return bytes(out)

    def _fetch(self, digest: str, size: int) -> int:
        if size > self.LIMIT:
            raise invalid(f"blob {digest} is {size} bytes, over the {self.LIMIT} allowed here")
        try:
            if self.fd < 0:
                self.fd = _unnamed(self.store.tmp_fd())
            return self._spill(digest, size)
        except OSError as exc:  # a full store is STORE_FULL, as any write into it
            raise store_error(exc, "pwrite", os.fsencode(self.store.tmp)) from exc

    def _spill(self, digest: str, size: int) -> int:
        base = self.end

        def once() -> tuple[int, str]:
            os.ftruncate(self.fd, base)  # (a retry starts the blob again)
            sha = hashlib.sha256()
            n = 0
            with self.reg.blob_stream(digest) as r:
                for chunk in self.reg.body(r):
                    if n + len(chunk) > size:
                        return n + len(chunk), ""
                    sha.update(chunk)
                    view, at = memoryview(chunk), base + n
                    while view:
                        wrote = os.pwrite(self.fd, view, at)
                        view, at = view[wrote:], at + wrote
                    n += len(chunk)
            return n, "sha256:" + sha.hexdigest()

        n, got = self.reg.retrying(once)
        self.reg.bytes_in += n
        if n != size or got != digest:
            raise invalid(f"blob {digest} does not match its digest or size")
        self.end = base + size
        return base


def _unnamed(dir_fd: int) -> int:
    """A new file without a name in `dir_fd`, open for reading and writing."""
    try:
        return os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    name = f".pull-nodes.{os.getpid()}.{os.urandom(6).hex()}"  # (no O_TMPFILE here)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    os.unlink(name, dir_fd=dir_fd)
    return fd
