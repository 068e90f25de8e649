"""fsck: re-hash every object against its name; check that every manifest reference resolves.

Where fs-verity works on the store's filesystem (`Store.verity`), objects are sealed when they are
named; fsck counts sealed and unsealed objects, seals the unsealed ones with `repair` (the
one-time upgrade of a store named before), and with `quick` lets the kernel vouch for sealed ones
(it refuses every write to them and checks every read) instead of re-hashing their bytes. A read
of a sealed object that fails its Merkle check (EIO) is an object-corrupt finding.

Hashing runs in forked worker processes (it is CPU-bound; 2 cores hash twice as fast). A finding
names its culprit: the object (digest and path) or the ref/commit/node and path that is broken.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from veloverlay import _libc, fsflags, paths, verity
from veloverlay.errors import VeloError
from veloverlay.progress import Progress
from veloverlay.records import Record, field
from veloverlay.store import quarantine
from veloverlay.store.cas import OBJECT_MODE, OBJECTS_V1, OBJECTS_V2, Store
from veloverlay.store.dbfile import corrupt
from veloverlay.store.digest import hash_fd
from veloverlay.store.manifest import Manifests
from veloverlay.store.publish import forget_unprotected, unprotected
from veloverlay.store.tree import Kind
from veloverlay.workers import Workers, default_jobs

__all__ = ["Finding", "FsckReport", "fsck"]

_HEX = re.compile(r"^[0-9a-f]{64}\Z")
_GONE = "object-gone"  # (internal) listed, then gone before its check: not itself a finding


class Finding(Record, frozen=True):
    kind: str  # object-corrupt, object-misplaced, object-missing, node-corrupt, commit-missing,
    # commit-corrupt, ref-corrupt, tag-corrupt, ...
    what: str
    detail: str


class FsckReport(Record):
    objects: int = 0
    nodes: int = 0
    refs: int = 0
    commits: int = 0
    sealed: int = 0  # objects with fs-verity (where the store's filesystem has it)
    unsealed: int = 0  # objects without it there (named before; `repair` seals them)
    repaired: int = 0  # objects sealed by this run
    protect: bool = False  # real root: objects are meant to carry chattr +i (set at naming)
    immutable: int = 0  # objects with +i
    mutable: int = 0  # objects without it where they should have it (`repair` sets it)
    protected: int = 0  # objects given +i by this run
    unprotected_record: int = 0  # lines of the store's record of failed +i at naming
    quarantined: int = 0  # corrupt objects this run set aside (`repair`): missing from now on
    wanted: int = 0  # objects set aside or missing, marked by `repair`, that the store still lacks
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "objects": self.objects,
            "nodes": self.nodes,
            "refs": self.refs,
            "commits": self.commits,
            "fsverity": {
                "sealed": self.sealed,
                "unsealed": self.unsealed,
                "repaired": self.repaired,
            },
            "immutable": {
                "expected": self.protect,
                "set": self.immutable,
                "missing": self.mutable,
                "repaired": self.protected,
                "recorded_failures": self.unprotected_record,
            },
            "quarantine": {"set_aside": self.quarantined, "wanted": self.wanted},
            "findings": [
                {"kind": f.kind, "what": f.what, "detail": f.detail} for f in self.findings
            ],
        }


class _Opts(Record, frozen=True):
    seal: bool = False  # fs-verity works on this store: objects are meant to carry it
    repair: bool = False  # seal unsealed objects, give writable objects their 0444 back
    quick: bool = False  # trust the kernel for sealed objects: no re-hash
    protect: bool = False  # real root: objects are meant to carry +i


# (finding, verity: sealed/unsealed/repaired/"", +i: set/missing/repaired/"")
_CheckResult = tuple[tuple[str, str, str] | None, str, str]


def _flags(fd: int) -> int | None:
    """The inode flags, or None where the filesystem has none (ENOTTY/EOPNOTSUPP)."""
    try:
        return _libc.ioctl_getflags(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            return None
        raise


def _check_object(item: tuple[str, str], opts: _Opts = _Opts()) -> _CheckResult:
    name, path = item
    if not _HEX.match(name):
        return ("object-stray", path, "not an object name"), "", ""
    parts = path.rsplit("/", 3)
    one_level = parts[-3] == OBJECTS_V2 and parts[-2] == name[:2]
    two_levels = (
        parts[0].endswith("/" + OBJECTS_V1) and parts[-3] == name[:2] and parts[-2] == name[2:4]
    )
    if not (one_level or two_levels):
        return ("object-misplaced", path, f"object {name} is in the wrong shard"), "", ""
    try:
        # O_NONBLOCK: a FIFO in an object's place is reported below instead of blocking the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:  # listed, then swept by a gc: the manifest scan judges its absence
        return (_GONE, path, ""), "", ""
    except OSError as exc:
        return ("object-unreadable", path, exc.strerror or str(exc)), "", ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ("object-corrupt", path, "not a regular file"), "", ""
        sealed = opts.seal and verity.is_enabled_fd(fd)
        flags = _flags(fd) if opts.protect else None
        if sealed and opts.quick:
            # The kernel refuses every write to a sealed file, and sealing happened only to
            # bytes that hashed to this name; the descriptor must still be readable.
            verity.measure_fd(fd)
        else:
            try:
                digest, _ = hash_fd(fd)
            except OSError as exc:  # a sealed file whose blocks fail their Merkle check: EIO
                why = "fs-verity: a block does not match its Merkle tree" if sealed else ""
                return (
                    ("object-corrupt", path, f"read failed: {exc.strerror} {why}".strip()),
                    "",
                    "",
                )
            if digest.hex() != name:
                return (
                    ("object-corrupt", path, f"content hashes to {digest.hex()}, not {name}"),
                    "",
                    "",
                )
    except OSError as exc:
        return ("object-unreadable", path, exc.strerror or str(exc)), "", ""
    finally:
        os.close(fd)
    state = "sealed" if sealed else "unsealed" if opts.seal else ""
    if opts.repair and st.st_mode & 0o222:
        with contextlib.suppress(OSError):  # +i, or another owner: the finding stays
            os.chmod(path, OBJECT_MODE)
            st = os.lstat(path)
    if opts.repair and state == "unsealed":
        state = _seal_existing(path)
    if st.st_mode & 0o222:
        return (
            ("object-writable", path, f"mode {stat.S_IMODE(st.st_mode):o}: objects are 0444"),
            state,
            "",
        )
    immutable = "" if flags is None else "set" if flags & fsflags.FS_IMMUTABLE_FL else "missing"
    if opts.repair and immutable == "missing":
        with contextlib.suppress(OSError):  # counted as missing, and the record stays
            fsflags.set_immutable(path, True)
            immutable = "repaired"
    return None, state, immutable


def _seal_existing(path: str) -> str:
    """Seal an object fsck has just found correct; +i (set by root sessions) is lifted for the
    ioctl and set again — only root may, anyone else leaves it unsealed. "unsupported": the
    seal was refused as where there is no fs-verity (the cached verdict was wrong: `fsck`
    probes again)."""
    immutable = False
    with contextlib.suppress(OSError):
        immutable = fsflags.is_immutable(path)
    try:
        if immutable:
            fsflags.set_immutable(path, False)
        try:
            verity.seal(path)
        finally:
            if immutable:
                fsflags.set_immutable(path, True)
    except OSError as exc:
        return "unsupported" if exc.errno in verity.UNSUPPORTED else "unsealed"
    return "repaired"


def _check_chunk(job: tuple[list[tuple[str, str]], _Opts]) -> tuple[list[_CheckResult], int]:
    """The results of a chunk of objects, and their bytes (for the progress)."""
    items, opts = job
    size = 0
    for _name, path in items:
        with contextlib.suppress(OSError):  # gone or unreadable: _check_object reports it
            size += os.lstat(path).st_size
    return [_check_object(item, opts) for item in items], size


def _same_file(a: str, b: os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def _check_short_names(store: Store, m: Manifests, present: set[str]) -> list[Finding]:
    """Every name in ids-v1 (the data-only layer) is a hard link of the object it names: same
    inode, so the object's re-hash above covers its bytes too."""
    ids = store.root / "ids-v1"
    if not ids.is_dir():
        return []
    by_prefix: dict[str, list[str]] = {}
    for h in present:
        by_prefix.setdefault(h[:20], []).append(h)
    with m.read() as txn:
        longer = {bytes(v).decode(): bytes(k).hex() for k, v in txn.cursor(db=m.ids)}
    renamed = set(longer.values())  # objects whose prefix collided: they use their longer id
    out = []
    for shard in sorted(os.scandir(ids), key=lambda e: e.name):
        for e in os.scandir(shard.path):
            short = shard.name + e.name
            if short.endswith(".tmp"):
                continue
            if short in longer:
                candidates = [longer[short]]
            else:
                candidates = [h for h in by_prefix.get(short, ()) if h not in renamed]
            if not candidates or not any(
                _same_file(e.path, store.object_path(bytes.fromhex(h))) for h in candidates
            ):
                # The object list and the ids were read at the start: a writer may have
                # published an object since and a session named it (no damage). Look again.
                candidates = _candidates_now(store, m, short)
            if not candidates:
                out.append(Finding("id-stray", e.path, "names no object in the store"))
                continue
            if not any(_same_file(e.path, store.object_path(bytes.fromhex(h))) for h in candidates):
                shown = " or ".join(h[:24] for h in candidates)
                out.append(Finding("id-mismatch", e.path, f"is not a hard link of {shown}"))
    return out


def _candidates_now(store: Store, m: Manifests, short: str) -> list[str]:
    """The objects the short name `short` may name as the store is now (its fan-out
    directories listed again, the longer ids read again)."""
    with m.read() as txn:
        longer = {bytes(v).decode(): bytes(k).hex() for k, v in txn.cursor(db=m.ids)}
    if short in longer:
        return [longer[short]]
    renamed = set(longer.values())
    found: list[str] = []
    for top, fanout in ((store.objects, store.fanout), (store.legacy, 2)):
        if top is None or len(short) < 4:
            continue
        shard = top / short[:2] / short[2:4] if fanout == 2 else top / short[:2]
        try:
            names = os.listdir(shard)
        except OSError:
            continue
        found += [n for n in names if n.startswith(short) and _HEX.match(n) and n not in renamed]
    return found


def _set_aside_corrupt(store: Store, m: Manifests, rep: FsckReport) -> set[str]:
    """Move every object found corrupt out of its name (`store.quarantine`), drop its short
    name in ids-v1 and every cached layer (a layer may serve the bad bytes through either), so
    nothing reads them again; the finding says where they went. Returns the names set aside.
    Needs the store to itself (no session starting, no writer): otherwise the findings stay,
    saying so."""
    bad = [
        (i, os.path.basename(f.what))
        for i, f in enumerate(rep.findings)
        if f.kind == "object-corrupt" and _HEX.match(os.path.basename(f.what))
    ]
    if not bad:
        return set()
    from veloverlay.lower.homes import short_id, short_id_path
    from veloverlay.lower.prune import prune
    from veloverlay.verbs.gc import session_layers, session_roots

    done: set[str] = set()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(store.lock(exclusive=True, wait=False))
            # what running sessions have mounted stays (gone, their trees vanish under them);
            # fsck then checks those stacks as any other (verify_layers, below)
            live = frozenset(session_roots(store))
            mounted = session_layers(store)
        except VeloError as exc:  # in use, or not ours to write; a session state unreadable
            for i, _hexname in bad:
                f = rep.findings[i]
                rep.findings[i] = Finding(
                    f.kind, f.what, f"{f.detail}; not set aside: {exc.message}"
                )
            return done
        for i, hexname in bad:
            f = rep.findings[i]
            again, _state, _immutable = _check_object((hexname, f.what))
            if again is None or again[0] != "object-corrupt":  # changed before the lock: look
                rep.findings[i] = Finding(
                    f.kind, f.what, f"{f.detail}; not set aside: it changed since (run fsck again)"
                )
                continue
            try:
                dest = quarantine.set_aside(store, hexname, f.what)
            except OSError as exc:
                why = exc.strerror or str(exc)
                rep.findings[i] = Finding(f.kind, f.what, f"{f.detail}; not set aside: {why}")
                continue
            with m.read() as txn:
                short = short_id(m, txn, bytes.fromhex(hexname))
            link = os.fsdecode(short_id_path(store, short))
            if _same_file(link, dest):
                os.unlink(link)
            rep.findings[i] = Finding(
                f.kind, f.what, f"{f.detail}; set aside as {quarantine.QUARANTINE}/{dest.name}"
            )
            done.add(hexname)
            rep.quarantined += 1
        if done:  # every cached layer, in every per-boot base: rebuilt from the store on demand
            prune(store, set(live), everywhere=True, mounted=mounted)
    return done


def _drop_bad_layers(store: Store, rep: FsckReport, first: int, bad: set[Path]) -> None:
    """Remove the cached stacks whose layers do not show their manifest's tree (findings from
    `first` on), so no later session mounts them: they are a cache, built again from the store
    on demand. Needs the store lock exclusively (no session choosing its layers meanwhile)."""
    from veloverlay.lower.prune import drop_stacks

    if not bad:
        return
    from veloverlay.verbs.gc import session_layers, session_roots

    held: set[str] = set()
    try:
        with store.lock(exclusive=True, wait=False):
            live = frozenset(session_roots(store))
            held = {p.name for p in drop_stacks(store, bad, live, session_layers(store))}
            note = "the stack and its layers dropped (built again on demand)"
    except VeloError as exc:
        note = f"not dropped: {exc.message}"
    busy = (
        "not dropped: a running session has its layers mounted (run fsck --repair again "
        "once it ends; 'veloverlay sessions')"
    )
    for i in range(first, len(rep.findings)):
        f = rep.findings[i]
        if f.kind.startswith("layer-"):
            why = busy if f.what.split(":", 1)[0] in held else note
            rep.findings[i] = Finding(f.kind, f.what, f"{f.detail}; {why}")


def _there(store: Store, sizes: dict[bytes, int | None], digest: bytes) -> bool:
    """Whether the object `digest` is in the store now (in its place)."""
    return _size(store, sizes, digest) is not None


def _size(store: Store, sizes: dict[bytes, int | None], digest: bytes) -> int | None:
    if digest not in sizes:
        try:
            sizes[digest] = os.lstat(store.object_path_b(digest)).st_size
        except OSError:
            sizes[digest] = None
    return sizes[digest]


def fsck(
    store: Store,
    m: Manifests,
    *,
    jobs: int | None = None,
    progress: Progress | None = None,
    repair: bool = False,
    quick: bool = False,
) -> FsckReport:
    """Check the store. Where fs-verity works on it, every object should carry it: `repair`
    seals those that do not (after their re-hash proved them right) and gives writable objects
    their 0444 back; `quick` lets the kernel vouch for sealed objects instead of re-hashing."""
    rep = FsckReport()
    protect = fsflags.may_set_immutable()
    opts = _Opts(seal=store.verity()[0], repair=repair, quick=quick, protect=protect)
    rep.protect = protect
    recorded = unprotected(store)
    rep.unprotected_record = len(recorded)
    items = [(n, os.fspath(p)) for n, p in store.iter_objects()]
    rep.objects = len(items)
    present = {n for n, _ in items}
    jobs = jobs or default_jobs()
    chunks = [(items[i : i + 256], opts) for i in range(0, len(items), 256)]
    checked = nbytes = refused = 0
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(Workers(jobs)) if jobs > 1 and len(items) > 2000 else None
        results = pool.map_unordered(_check_chunk, chunks) if pool else map(_check_chunk, chunks)
        for found, size in results:
            nbytes += size
            for finding, state, immutable in found:
                if finding is not None and finding[0] == _GONE:
                    present.discard(os.path.basename(finding[1]))
                elif finding is not None:
                    rep.findings.append(Finding(*finding))
                if state == "sealed":
                    rep.sealed += 1
                elif state == "unsealed":
                    rep.unsealed += 1
                elif state == "unsupported":
                    refused += 1
                elif state == "repaired":
                    rep.repaired += 1
                    rep.sealed += 1
                if immutable == "set":
                    rep.immutable += 1
                elif immutable == "missing":
                    rep.mutable += 1
                elif immutable == "repaired":
                    rep.protected += 1
                    rep.immutable += 1
            checked += 256
            if progress is not None:
                progress(min(checked, len(items)), len(items), nbytes)
    if refused and not store.verity(recheck=True)[0]:
        # A seal refused as unsupported: fsverity-v1.json said fs-verity works where it does
        # not (as publish finds it: probed again, the cache written again). No object here can
        # carry it, so none is counted as unsealed (one that was sealed is counted as such).
        rep.unsealed = 0
    else:
        rep.unsealed += refused
    if repair:
        present -= _set_aside_corrupt(store, m, rep)
    if repair and protect and recorded and rep.immutable == rep.objects:
        forget_unprotected(store)  # every object carries +i now: the record is history
        rep.unprotected_record = 0
    rep.findings.extend(_check_short_names(store, m, present))
    # --link proxies of shim sessions: the documented limit is that a writer the shim cannot
    # see may change one; this is where that is detected.
    from veloverlay.session.shim.materialize import verify_proxies

    rep.findings.extend(Finding(f.kind, f.path, f.detail) for f in verify_proxies(store))
    # Cached lower layers (store and per-boot cache) show exactly their manifest's tree: a file
    # planted in one would show in every later session of that version.
    from veloverlay.lower.check import verify_layers

    bad: set[Path] = set()
    first = len(rep.findings)
    rep.findings.extend(Finding(*f) for f in verify_layers(store, m, bad))
    if repair:
        _drop_bad_layers(store, rep, first, bad)
    # Manifest side: every node decodes and hashes to its key, every reference resolves.
    from veloverlay.store.digest import node_digest

    sizes: dict[bytes, int | None] = {}
    with m.read() as txn:
        for key, data in m.iter_nodes(txn):
            rep.nodes += 1
            if node_digest(data) != key:
                rep.findings.append(
                    Finding("node-corrupt", key.hex(), "encoding does not hash to its key")
                )
                continue
            try:
                node = m.get_node(txn, key)
            except VeloError as exc:
                rep.findings.append(Finding("node-corrupt", key.hex(), exc.message))
                continue
            for e in node.entries:
                # Not listed, and not there now either: an object a writer published after the
                # listing (an ingest beside fsck) is there now, and is no damage.
                if (
                    e.kind is Kind.FILE
                    and e.digest.hex() not in present
                    and not _there(store, sizes, e.digest)
                ):
                    rep.findings.append(
                        Finding(
                            "object-missing",
                            e.digest.hex(),
                            f"referenced as {paths.display(e.name)} in node {key.hex()[:16]}",
                        )
                    )
                elif e.kind is Kind.FILE and _size(store, sizes, e.digest) not in (e.size, None):
                    rep.findings.append(
                        Finding(
                            "size-mismatch",
                            e.digest.hex(),
                            f"{paths.display(e.name)} in node {key.hex()[:16]} claims {e.size} "
                            f"bytes, the object has {sizes[e.digest]}",
                        )
                    )
                elif e.kind is Kind.DIR and not m.has_node(txn, e.digest):
                    rep.findings.append(
                        Finding("node-missing", e.digest.hex(), f"child {paths.display(e.name)}")
                    )

        # Each record on its own: a damaged one is a finding, and the rest are still checked.
        def records(table: str, read: Callable[[str], Any], kind: str) -> Iterator[Any]:
            for key in m.record_keys(txn, table):
                name = key.hex() if table == "commits" else key.decode("utf-8", "surrogateescape")
                try:
                    record = read(name)
                    if record is None:  # its key was just listed: a damaged B-tree
                        raise corrupt(store, f"{kind} '{name}' is listed but cannot be read")
                except VeloError as exc:
                    rep.findings.append(Finding(f"{kind}-corrupt", name, exc.message))
                    continue
                yield record

        commits = {}
        for c in records("commits", lambda cid: m.get_commit(txn, cid), "commit"):
            commits[c.id] = c
            rep.commits += 1
            if not m.has_node(txn, bytes.fromhex(c.root)):
                rep.findings.append(Finding("node-missing", c.root, f"root of commit {c.id[:16]}"))
        for ref in records("refs", lambda name: m.get_ref(txn, name), "ref"):
            rep.refs += 1
            if ref.head not in commits:
                rep.findings.append(Finding("commit-missing", ref.head, f"head of ref {ref.name}"))
        for tag in records("tags", lambda name: m.get_tag(txn, name), "tag"):  # gc keeps them
            if tag.commit not in commits:
                rep.findings.append(Finding("commit-missing", tag.commit, f"tag {tag.name}"))
    from veloverlay.verbs.gc import counted_refs

    _count, why = counted_refs(store, m)
    if why is not None:
        rep.findings.append(Finding("refs-lost", os.fspath(store.db_path), why))
    from veloverlay.session.state import damaged

    for sid, unread in damaged(store):  # changes no harvest can commit; gc refuses to run
        why = f"{unread.message}; {unread.hint}"
        rep.findings.append(Finding("session-unreadable", sid, why))
    if repair:  # missing for whatever reason: the next ingest or pull looks for it
        known = {d.hex() for d in quarantine.wanted(store)}  # set aside: wanted already
        for f in rep.findings:
            if f.kind == "object-missing" and f.what not in known:
                quarantine.mark_wanted(store, f.what)
                known.add(f.what)
    rep.wanted = len(quarantine.wanted(store))
    return rep
