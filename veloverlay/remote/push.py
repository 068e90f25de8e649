"""Push a ref's version to a registry: packs of what the remote lacks, then the manifest.

The have-list is the version the tag names now: its pack indexes say which nodes and objects the
repository already holds. A pack of that version is reused (listed again, not uploaded) while at
least half of its bytes are still needed; otherwise what is still needed from it is packed again,
so a tag's packs never carry much dead weight. Everything else is packed (nodes apart from objects,
by digest order, so an interrupted push re-made from the same inputs builds the same packs, which
the registry then already has) or, from `LARGE` bytes up, sent alone as a blob under its sha256.
Every object read for the push is hashed first: a damaged local object is never sent. Blobs go
before the manifest; the tag moves last. A registry that refuses the manifest for a blob it
does not hold (MANIFEST_BLOB_UNKNOWN: it lost one the tag's version names) gets the push again,
listing a blob of that version only where a HEAD says it is there.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from veloverlay.errors import Reason, VeloError
from veloverlay.records import Record
from veloverlay.remote.client import Options, Registry, dumps
from veloverlay.remote.name import RemoteName, check_tag, parse_remote
from veloverlay.remote.pack import KIND_NODE, KIND_OBJECT, PackWriter, decode_index
from veloverlay.remote.progress import Meter, ProgressFn
from veloverlay.remote.state import BlobCache, ShaMap, Versions
from veloverlay.remote.version import (
    A_BLAKE3,
    A_INDEX,
    A_KIND,
    CONFIG_TYPE,
    FORMAT,
    INDEX_TYPE,
    OBJECT_TYPE,
    PACK_TYPE,
    Descriptor,
    PackRef,
    Version,
    build_manifest,
    parse_manifest,
)
from veloverlay.store.cas import Store
from veloverlay.store.digest import Hasher
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind, links

__all__ = ["push", "PushResult", "PACK_TARGET", "LARGE", "REUSE_MIN"]

PACK_TARGET = 8 << 20  # a pack is closed once it holds this many bytes
LARGE = 1 << 20  # objects from this size up travel alone
REUSE_MIN = 0.5  # reuse a remote pack while this fraction of its bytes is still needed
_CHUNK = 1 << 20


class PushResult(Record):
    ref: str
    remote: str
    digest: str  # the manifest's
    root: str
    objects: int = 0  # in the version's closure
    bytes: int = 0  # their total size
    packs_new: int = 0
    packs_reused: int = 0
    large_new: int = 0
    large_reused: int = 0
    blobs_uploaded: int = 0
    blobs_present: int = 0  # the registry had them already (HEAD)
    blobs_mounted: int = 0  # mounted from another repository of the registry
    bytes_uploaded: int = 0
    # the version noted as the ref's, pushed there (remote-v1/versions-v1.json); False where the
    # store could not be written (a full disk, another user's store): the push itself stands
    noted: bool = False
    requests: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return self.field_dict()


class _Up:
    """Upload bookkeeping shared by the transfer threads."""

    def __init__(self, reg: Registry, meter: Meter, cache: BlobCache) -> None:
        self.reg = reg
        self.cache = cache
        self.meter = meter
        self.lock = threading.Lock()
        self.uploaded = 0
        self.present = 0
        self.bytes = 0

    def blob(self, data: bytes) -> Descriptor:
        digest, sent = self.reg.put_blob(data)
        with self.lock:
            if sent:
                self.uploaded += 1
                self.bytes += len(data)
            else:
                self.present += 1
        self.meter.add(len(data))
        return Descriptor("", digest, len(data))

    def pack(self, kind: str, pack: bytes, index: bytes) -> PackRef:
        i = self.blob(index)
        self.cache.put(i.digest, index)  # the next push of this tag reads it here
        p = self.blob(pack)
        idx = Descriptor(INDEX_TYPE, i.digest, i.size)
        return PackRef(
            kind,
            Descriptor(PACK_TYPE, p.digest, p.size, ((A_INDEX, i.digest), (A_KIND, kind))),
            idx,
        )

    def large(self, store: Store, d: bytes, size: int, shamap: ShaMap) -> Descriptor:
        sha = shamap.get(d)
        if sha is None:
            sha = _sha256_verified(store, d)
            shamap.add({d: sha})
        desc = Descriptor(OBJECT_TYPE, sha, size, ((A_BLAKE3, d.hex()),))
        if self.reg.blob_exists(sha):
            with self.lock:
                self.present += 1
            self.meter.add(size, 1)
            return desc

        def content() -> Any:
            return _file_chunks(store, d, sha, self.meter)

        self.reg.upload_blob(sha, size, content)
        with self.lock:
            self.uploaded += 1
            self.bytes += size
        self.meter.add(0, 1)
        return desc


def _sha256_verified(store: Store, d: bytes) -> str:
    """sha256 of an object, in the pass that checks its BLAKE3."""
    fd = store.open_object(d)
    try:
        sha, b3 = hashlib.sha256(), Hasher()
        while chunk := os.read(fd, _CHUNK):
            sha.update(chunk)
            b3.update(chunk)
    finally:
        os.close(fd)
    if b3.digest() != d:
        raise _corrupt(d)
    return "sha256:" + sha.hexdigest()


def _read_verified(store: Store, d: bytes, size: int) -> bytes:
    """A small object's bytes, BLAKE3-checked as they are read (once: `read_object` verifies)."""
    try:
        return store.read_object(d, size)
    except VeloError as exc:
        if exc.reason is Reason.OBJECT_CORRUPT:
            raise _corrupt(d) from None
        raise


def _file_chunks(store: Store, d: bytes, sha: str, meter: Meter) -> Any:
    """An object's bytes for an upload under `sha` (from the ShaMap, or hashed just before). The
    last chunk is held back until the whole has hashed right: an object damaged since is never
    sent whole, so no registry can take it (the upload ends short, and the push with it)."""
    fd = store.open_object(d)
    try:
        h = hashlib.sha256()
        held = b""
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
            if held:
                meter.add(len(held))
                yield held
            held = chunk
        if "sha256:" + h.hexdigest() != sha:
            raise _corrupt(d)
        if held:
            meter.add(len(held))
            yield held
    finally:
        os.close(fd)


def _corrupt(d: bytes) -> VeloError:
    return VeloError(
        f"object {d.hex()} does not match its name; it was not pushed",
        reason=Reason.OBJECT_CORRUPT,
        hint="run 'veloverlay fsck' to find and repair damaged objects",
    )


def _previous(reg: Registry, tag: str) -> Version | None:
    try:
        body, digest, ctype = reg.get_manifest(tag)
    except VeloError as exc:
        if exc.reason is Reason.NOT_FOUND:
            return None
        raise
    try:
        return parse_manifest(body, digest, ctype)
    except VeloError:
        raise VeloError(
            f"{reg.name.host}/{reg.name.repo}:{tag} holds something that is not a veloverlay "
            "version; not overwriting it",
            reason=Reason.EXISTS,
            hint="push under another tag or into another repository",
        ) from None


def _other_repo_version(reg: Registry, known: tuple[str, str] | None) -> tuple[Version, str] | None:
    """The version this store last pushed or pulled of the same ref in another repository of the
    same registry (its blobs can be mounted), if it is still there and readable."""
    if known is None or known[0] == reg.name.repo:
        return None
    repo, digest = known
    reg.also_pull(repo)
    try:
        body, got, ctype = reg.get_manifest(digest, repo=repo)
        return parse_manifest(body, got, ctype), repo
    except VeloError:
        return None


def push(
    store: Store,
    m: Manifests,
    refs: list[str],
    remote: str | RemoteName,
    *,
    options: Options | None = None,
    progress: ProgressFn | None = None,
) -> list[PushResult]:
    """Push each ref (`NAME`, `NAME@{n}`) to `remote`; its tag, or the ref's name when the remote
    names no tag (several refs: one tag each, their names)."""
    name = parse_remote(remote) if isinstance(remote, str) else remote
    if name.digest:
        raise VeloError(
            "a push names a tag, not a digest", reason=Reason.USAGE, hint="drop the @sha256:…"
        )
    if name.tag and len(refs) > 1:
        raise VeloError(
            "several refs go to one tag each: name the repository without a tag",
            reason=Reason.USAGE,
        )
    with m.read() as txn:  # every version and tag checked before the registry is asked anything
        for spec in refs:
            m.resolve(txn, spec)
    tags = [name.tag or check_tag(spec.split("@")[0]) for spec in refs]
    out = []
    with Registry(name, options, push=True) as reg:
        reg.ping()
        for spec, tag in zip(refs, tags, strict=True):
            # The store lock, shared, per ref: gc waits, so the version keeps its objects.
            with store.read_lock():
                out.append(_push_one(store, m, reg, spec, name.with_tag(tag), progress))
    return out


def _push_one(
    store: Store,
    m: Manifests,
    reg: Registry,
    spec: str,
    target: RemoteName,
    progress: ProgressFn | None,
    *,
    check: bool = False,
) -> PushResult:
    """With `check`, a blob of a base version is listed again only if the registry says it
    holds it (HEAD): the second try after the registry refused a manifest for a blob it lost."""
    t0 = time.monotonic()
    requests0 = reg.requests
    assert target.tag is not None
    with m.read() as txn:
        ref, commit = m.resolve(txn, spec)
        root = bytes.fromhex(commit.root)
        node_data: dict[bytes, bytes] = {}
        sizes: dict[bytes, int] = {}  # object -> size, as the manifest records it
        stack = [root]
        while stack:
            d = stack.pop()
            if d in node_data:
                continue
            data = m.raw_node(txn, d)
            if data is None:
                raise VeloError(f"node {d.hex()} is missing", reason=Reason.MANIFEST_CORRUPT)
            node_data[d] = data
            for k, digest, size in links(data):  # a stored node: no full decode needed
                if k == Kind.DIR:
                    stack.append(digest)
                else:
                    sizes[digest] = size
    nodes, objects = set(node_data), set(sizes)
    res = PushResult(ref.name, str(target), "", commit.root, len(objects), sum(sizes.values()))

    prev = _previous(reg, target.tag)
    versions = Versions(store)
    base_name = ref.name.split("@")[0]
    bases: list[tuple[Version, str | None]] = [(prev, None)] if prev is not None else []
    other = _other_repo_version(reg, versions.get(reg.name.registry, base_name))
    if other is not None:
        bases.append(other)
    need_nodes = set(nodes)
    need_small = {d for d, s in sizes.items() if s < LARGE}
    large = sorted(d for d, s in sizes.items() if s >= LARGE)
    packs: list[PackRef] = []
    large_descs: dict[bytes, Descriptor] = {}
    jobs = max(1, reg.opts.jobs)
    cache = BlobCache(store)
    with ThreadPoolExecutor(jobs) as pool:
        for base, from_repo in bases:
            indexes = list(
                pool.map(
                    lambda p: cache.fetch(
                        p.index.digest,
                        p.index.size,
                        lambda: reg.get_blob(p.index.digest, p.index.size, repo=from_repo),  # noqa: B023
                    ),
                    base.packs,
                )
            )
            for p, data in zip(base.packs, indexes, strict=True):
                entries = decode_index(data, p.pack.size)
                need = need_nodes if p.kind == "nodes" else need_small
                live = [e for e in entries if e.digest in need]
                total = sum(e.length for e in entries) or 1
                if not live or sum(e.length for e in live) < REUSE_MIN * total:
                    continue
                if from_repo is not None:
                    if not (
                        reg.mount_blob(p.index.digest, from_repo)
                        and reg.mount_blob(p.pack.digest, from_repo)
                    ):
                        continue
                    res.blobs_mounted += 2
                if check and not all(pool.map(reg.blob_exists, (p.index.digest, p.pack.digest))):
                    continue  # (mounted too: a registry may answer 201 for what it lacks)
                packs.append(p)
                need.difference_update(e.digest for e in live)
                res.packs_reused += 1
            for d in large:
                if d in base.large and d not in large_descs:
                    if from_repo is not None:
                        if not reg.mount_blob(base.large[d].digest, from_repo):
                            continue
                        res.blobs_mounted += 1
                    if check and not reg.blob_exists(base.large[d].digest):
                        continue
                    large_descs[d] = base.large[d]
                    res.large_reused += 1
        todo = sum(len(node_data[d]) for d in need_nodes) + sum(sizes[d] for d in need_small)
        todo += sum(sizes[d] for d in large if d not in large_descs)
        meter = Meter("push", todo, len(need_small) + len(large) - len(large_descs), progress)
        up = _Up(reg, meter, cache)
        shamap = ShaMap(store)
        futures: list[Future[PackRef]] = []
        window = threading.Semaphore(jobs * 2)  # packs built but not yet sent (memory bound)

        def send(kind: str, w: PackWriter) -> None:
            pack, index = w.finish()
            window.acquire()

            def job() -> PackRef:
                try:
                    return up.pack(kind, pack, index)
                finally:
                    window.release()

            futures.append(pool.submit(job))

        for kind, code, items in (
            ("nodes", KIND_NODE, sorted(need_nodes)),
            ("objects", KIND_OBJECT, sorted(need_small)),
        ):
            w = PackWriter(code)
            for d in items:
                if code == KIND_NODE:
                    data = node_data[d]
                else:
                    data = _read_verified(store, d, sizes[d])
                w.add(d, data)
                if w.size >= PACK_TARGET:
                    send(kind, w)
                    w = PackWriter(code)
            if w.entries:
                send(kind, w)
        new_large = [d for d in large if d not in large_descs]
        large_futs = [pool.submit(up.large, store, d, sizes[d], shamap) for d in new_large]
        for f in futures:
            packs.append(f.result())
        for d, lf in zip(new_large, large_futs, strict=True):
            large_descs[d] = lf.result()
        res.packs_new = len(futures)
        res.large_new = len(new_large)
    config: dict[str, Any] = {
        "format": FORMAT,
        "ref": ref.name.split("@")[0],
        "root": commit.root,
        "tiers": ref.tiers,
        "message": commit.message,
        "time_ns": commit.time_ns,
        "commit": commit.id,
        "parent": prev.digest if prev is not None else None,
    }
    cfg = up.blob(dumps(config))
    manifest = build_manifest(
        Descriptor(CONFIG_TYPE, cfg.digest, cfg.size),
        packs,
        sorted(large_descs.items()),
        {
            "org.opencontainers.image.created": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(commit.time_ns / 1e9)
            ),
            "org.veloverlay.ref": ref.name.split("@")[0],
            "org.veloverlay.root": commit.root,
        },
    )
    try:
        res.digest = reg.put_manifest(target.tag, manifest)
    except VeloError as exc:
        # the tag's version names blobs the registry no longer holds (lost, collected): they
        # are not trusted again but checked, and what is missing is uploaded
        if check or "MANIFEST_BLOB_UNKNOWN" not in (exc.detail or ""):
            raise
        return _push_one(store, m, reg, spec, target, progress, check=True)
    with m.read() as txn:  # the note is the ref's, not a session ref's (nor a later ref's)
        base_ref = m.get_ref(txn, base_name)
    lineage = base_ref.lineage if base_ref is not None else None
    try:
        versions.set(
            reg.name.registry,
            base_name,
            reg.name.repo,
            res.digest,
            lineage,
            commit.id,
            still=lambda: _lineage_of(m, base_name) == lineage,  # (not deleted since)
        )
        res.noted = True
    except VeloError as exc:  # the registry holds the tag: the push is done, whatever this says
        if exc.reason not in (Reason.STORE_FULL, Reason.STORE_PERMISSION):
            raise
    meter.finish()
    res.blobs_uploaded, res.blobs_present, res.bytes_uploaded = up.uploaded, up.present, up.bytes
    res.requests = reg.requests - requests0
    res.seconds = time.monotonic() - t0
    return res


def _lineage_of(m: Manifests, name: str) -> str | None:
    """The lineage of ref `name` now (None: no such ref, or one made before lineages)."""
    with m.read() as txn:
        ref = m.get_ref(txn, name)
    return ref.lineage if ref is not None else None
