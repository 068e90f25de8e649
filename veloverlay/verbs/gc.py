"""Garbage collection: mark from every root that may still be needed, sweep the rest.

Roots: every ref's head and the commits its log keeps (all, or the newest `keep` per ref), every
tagged commit (a named version is kept whatever `keep` says, and after its ref is deleted), each
ref's last ingested source tree (which holds every digest its ingest stat cache names), and the
base/head roots of live or unharvested sessions (`sessions/<id>/state.json`, key "roots"; finished
ones pin nothing) and the commits they started from (key "bases": kept with the session, even when
their ref is deleted or `keep` cuts its log meanwhile), with the log of each one's top ref from its
head back to that base (where `harvest --resume` looks for the session's own commit). A session
whose state file cannot be read
stops gc (session-active), since what it needs is unknown. Only objects older than `grace` seconds
(by ctime: the time they were renamed into the store) are swept, and gc holds the store lock
exclusively, so no writer can be between staging and commit. `dry_run` computes exactly what a
real run would delete.

A store made before issue 15 (objects in `objects-v1/ab/cd/`) is migrated to the one-level fan-out
`objects-v2/ab/` by the first gc that finds no live or unharvested session (`migrate_objects`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from veloverlay import _libc, faults
from veloverlay.errors import Reason, VeloError
from veloverlay.files import exact_modes, read_regular
from veloverlay.lower.homes import short_id
from veloverlay.progress import Progress
from veloverlay.records import Record, field
from veloverlay.store import access, quarantine, reserve
from veloverlay.store.cas import OBJECTS_V2, Store
from veloverlay.store.dbfile import record_damaged, record_read_lock
from veloverlay.store.manifest import (
    EMPTY_ROOT,
    Commit,
    Manifests,
    Txn,
    read_record,
    write_record,
)

__all__ = [
    "GcReport",
    "RefFootprint",
    "gc",
    "lost_refs",
    "counted_refs",
    "migrate_objects",
    "ref_footprint",
    "session_roots",
    "unfinished_ids",
    "session_layers",
]


class GcReport(Record):
    objects_deleted: int = 0
    bytes_freed: int = 0
    nodes_deleted: int = 0
    commits_deleted: int = 0
    layers_evicted: int = 0
    proxies_removed: int = 0
    objects_kept: int = 0
    young_kept: int = 0
    dirs_removed: int = 0  # empty fan-out directories of the objects
    quarantine_removed: int = 0  # set-aside copies and markers no kept tree names (fsck --repair)
    objects_migrated: int = 0  # moved from objects-v1/ab/cd/ to objects-v2/ab/ (migrate_objects)
    dry_run: bool = False
    deleted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        d = self.field_dict()
        d.pop("deleted")
        return d


def _unfinished(store: Store) -> list[dict[str, Any]]:
    """The raw state files of every session not harvested or discarded.

    Read as raw JSON on purpose, not through `session.state.load`: gc must keep what any state
    file names, even one that this version could not load as a whole."""
    return [data for _sid, data in _unfinished_by_id(store)]


def unfinished_ids(store: Store) -> list[str]:
    """The ids of the sessions not harvested or discarded, whatever their state files name
    (VeloError `session-active` for one that cannot be read)."""
    return [sid for sid, _data in _unfinished_by_id(store)]


def _unfinished_by_id(store: Store) -> list[tuple[str, dict[str, Any]]]:
    try:
        ids = os.listdir(store.sessions)
    except FileNotFoundError:
        return []
    out = []
    for sid in ids:
        p = store.sessions / sid / "state.json"
        try:
            data = json.loads(read_regular(p))  # a FIFO: ValueError, never a block
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (FileNotFoundError, NotADirectoryError):
            continue  # no state: a start that died before it named anything; it pins nothing
        except (ValueError, OSError) as exc:
            # What it needs is unknown: skipping it would let gc take a live session's view.
            raise VeloError(
                f"session {sid} has a state file that cannot be read ({exc}): gc cannot tell "
                "what it needs",
                reason=Reason.SESSION_ACTIVE,
                path=os.fspath(p),
                hint=f"if no session {sid} runs, remove {store.sessions / sid} (its changes are "
                "lost) and run gc again",
            ) from None
        if data.get("state") in ("harvested", "discarded"):
            continue  # finished: what it produced is reachable from refs, or was thrown away
        out.append((sid, data))
    return out


def session_roots(store: Store) -> set[bytes]:
    """The roots every unfinished session still needs (its state file's `roots`). Every state
    file names them (every version wrote them at the start): one whose `roots` is missing, empty
    or holds a value that is not a root is damaged, and gc cannot tell what the session needs
    (its view's objects, its mounted layers), so it refuses, as for a state it cannot read."""
    out: set[bytes] = set()
    for sid, data in _unfinished_by_id(store):
        roots = data.get("roots")
        listed = roots if isinstance(roots, list) else []
        got = [r for r in listed if _is_root(r)]
        if not got or len(got) != len(listed):
            p = store.sessions / sid / "state.json"
            raise VeloError(
                f"session {sid}'s state file does not name the roots it needs (`roots`: "
                f"{json.dumps(roots)[:80]}): gc cannot tell what it needs",
                reason=Reason.SESSION_ACTIVE,
                path=os.fspath(p),
                hint=f"harvest or discard it with the veloverlay that started it; if no "
                f"session {sid} runs, remove {store.sessions / sid} (its changes are lost) and "
                "run gc again",
            )
        out.update(bytes.fromhex(r) for r in got)
    return out


def _is_root(r: object) -> bool:
    return isinstance(r, str) and len(r) == 64 and all(c in "0123456789abcdef" for c in r)


def session_layers(store: Store) -> set[str]:
    """The lower layers every unfinished session recorded (its state file's `layers`): mounted
    while it runs, whether a stack still names them or not (`lower.prune.prune`)."""
    out: set[str] = set()
    for data in _unfinished(store):
        layers = data.get("layers")
        if isinstance(layers, list):
            out.update(p for p in layers if isinstance(p, str))
    return out


def session_bases(store: Store) -> set[str]:
    """The commits unfinished sessions started from (their state files' `bases`): a session's
    harvest commits on top of its base (or merges from it), so the base must outlive the ref
    being deleted or its log being cut by `--keep` while the session runs or waits."""
    return {c for data in _unfinished(store) for c in data.get("bases", []) if isinstance(c, str)}


def _since_bases(store: Store, m: Manifests, txn: Txn) -> list[Commit]:
    """The commits of each unfinished session's top ref from its head back to the session's
    base: the log `harvest --resume` walks to find whether an earlier finish of the session
    committed (a crash between the commit and the state's save). Cut by `--keep` (after a
    rollback, or later commits), the walk stopped short of the session's own commit, took the
    session for one that never committed and merged its changes into the ref a second time
    (undoing the rollback). Kept only while the session is unfinished."""
    out: list[Commit] = []
    for data in _unfinished(store):
        refs, bases = data.get("refs"), data.get("bases")
        if not (isinstance(refs, list) and isinstance(bases, list) and refs and bases):
            continue
        ref = m.get_ref(txn, str(refs[-1]))
        cid = ref.head if ref is not None else None
        walked: list[Commit] = []
        while cid is not None and cid != bases[-1] and m.has_commit(txn, cid):
            c = m.get_commit(txn, cid)
            walked.append(c)
            cid = c.parent
        # Made anew under the name since (the walk ends at a first commit without meeting the
        # base): its log is kept whole too, so that the session's end sees it was made anew
        # (`_made_anew` takes a cut log for the same ref) and never merges into it.
        out.extend(walked)
    return out


def _mark(
    store: Store, m: Manifests, txn: Txn, keep: int | None, *, without: str | None = None
) -> tuple[set[bytes], set[bytes], set[str]]:
    """(nodes, objects, commits) that gc keeps; `without`: as if that ref were deleted."""
    nodes: set[bytes] = set()
    objects: set[bytes] = set()
    kept_commits: set[str] = set()
    sessions = session_roots(store)
    roots: set[bytes] = {EMPTY_ROOT}
    for ref in m.refs(txn):
        if ref.name == without:
            continue
        if ref.ingest_root:
            roots.add(bytes.fromhex(ref.ingest_root))
        cid: str | None = ref.head
        n = 0
        while cid is not None and (keep is None or n < keep):
            if cid in kept_commits or (n and _pruned(m, txn, ref.name, cid)):
                break
            c = m.get_commit(txn, cid)
            kept_commits.add(cid)
            roots.add(bytes.fromhex(c.root))
            cid = c.parent
            n += 1
    for tag in m.tags(txn):  # named versions outlive --keep and their ref
        roots.add(bytes.fromhex(m.get_commit(txn, tag.commit).root))
        kept_commits.add(tag.commit)
    for cid in session_bases(store):  # (their roots are among the sessions' roots)
        if m.has_commit(txn, cid):
            kept_commits.add(cid)
    for c in _since_bases(store, m, txn):
        kept_commits.add(c.id)
        roots.add(bytes.fromhex(c.root))
    # Every root a ref, commit or tag names must be there and whole (`reachable` raises
    # MANIFEST_CORRUPT): a missing one would read as a tree without objects, swept by gc.
    for r in roots:
        m.reachable(txn, r, nodes, objects)
    for r in sessions - roots:  # (a state file of a session that never got going may name
        if m.has_node(txn, r):  # a stacked view its start did not write)
            m.reachable(txn, r, nodes, objects)
    return nodes, objects, kept_commits


def _pruned(m: Manifests, txn: Txn, ref: str, cid: str) -> bool:
    """Whether the log of `ref` ends at parent `cid` on purpose (deleted by `gc --keep`);
    MANIFEST_CORRUPT when it is missing without that record."""
    if m.has_commit(txn, cid):
        return False
    if m.was_pruned(txn, cid):
        return True
    raise VeloError(
        f"commit {cid} of the log of {ref} is missing, and no gc --keep removed it",
        reason=Reason.MANIFEST_CORRUPT,
        hint="nothing was deleted; restore manifests.lmdb from a backup. If 'gc --keep N' of "
        "an earlier veloverlay removed it, run 'gc --keep N' once more with N "
        f"no more than the entries of 'veloverlay log {ref}'",
    )


class RefFootprint(Record):
    """What deleting a ref frees, and when: its objects that nothing else keeps (other refs,
    tags, sessions) go at the first `gc` run once they are older than the grace period."""

    ref: str
    objects: int = 0
    bytes: int = 0  # allocated on disk
    objects_now: int = 0  # older than the grace already: the next gc frees them
    bytes_now: int = 0
    free_after: float = 0.0  # epoch seconds: from then on a gc frees all of it (0: now)
    grace: float = 3600.0


def ref_footprint(store: Store, m: Manifests, name: str, *, grace: float = 3600.0) -> RefFootprint:
    """What deleting ref `name` would free (computed, nothing changed)."""
    fp = RefFootprint(name, grace=grace)
    with m.read() as txn:
        m.require_ref(txn, name)
        _n, others, _c = _mark(store, m, txn, None, without=name)
        mine: set[bytes] = set()
        _mark_ref(m, txn, name, mine)
    now = time.time()
    for digest in mine - others:
        try:
            st = os.lstat(store.object_path_b(digest))
        except FileNotFoundError:
            continue
        used = st.st_blocks * 512
        fp.objects += 1
        fp.bytes += used
        ready = st.st_ctime + grace
        if ready <= now:
            fp.objects_now += 1
            fp.bytes_now += used
        else:
            fp.free_after = max(fp.free_after, ready)
    return fp


def _mark_ref(m: Manifests, txn: Txn, name: str, objects: set[bytes]) -> None:
    ref = m.require_ref(txn, name)
    nodes: set[bytes] = set()
    if ref.ingest_root:
        m.reachable(txn, bytes.fromhex(ref.ingest_root), nodes, objects)
    for c in m.log(txn, name):
        m.reachable(txn, bytes.fromhex(c.root), nodes, objects)


def migrate_objects(store: Store) -> int:
    """Move the objects of a store made before issue 15 from `objects-v1/ab/cd/<hex>` (a fan-out
    of up to 65,536 directories) to `objects-v2/ab/<hex>` (256); returns how many moved. The
    caller holds the store lock exclusively (no writer runs). Nothing is done while a session is
    live or unharvested, whatever its state file names (a session's layers and trees name object
    paths: the next gc will).
    Crash-safe: objects are renamed one by one, readers look in both places until `objects-v1` is
    gone, and the next gc continues. Cached layers are evicted (theirs name the old paths; built
    again on demand); the per-boot cache is kept per layout (lower/homes.py)."""
    legacy = store.root / "objects-v1"
    if not legacy.is_dir() or _unfinished(store):
        return 0
    from veloverlay import fsflags

    with contextlib.suppress(FileExistsError), exact_modes():
        os.mkdir(OBJECTS_V2, 0o755, dir_fd=store.fd)
    store.choose_layout()  # from now on: written to objects-v2, read from both
    moved = 0
    for dirpath, _dirs, files in os.walk(legacy):
        for name in files:
            if len(name) != 64 or not all(c in "0123456789abcdef" for c in name):
                continue  # not an object: left where it is (fsck reports it)
            src = os.path.join(dirpath, name)
            with store.shard(name.encode()) as shard:  # made, and entered, without a link
                if access.exists_at(shard, name):
                    _unlink_object(store, Path(src), None)  # in both (by hand): keep the new
                    continue
                try:
                    os.rename(src, name, dst_dir_fd=shard)
                except PermissionError:  # +i: only a process that may clear it gets here (root)
                    fsflags.set_immutable(src, False)
                    os.rename(src, name, dst_dir_fd=shard)
                    fsflags.set_immutable_at(shard, name, True)
            moved += 1
            faults.point("gc.migrate")
    _libc.syncfs(store.objects_fd())
    for dirpath, _dirs, _files in os.walk(legacy, topdown=False):
        with contextlib.suppress(OSError):  # a stray file keeps its directory (and objects-v1)
            os.rmdir(dirpath)
    store.choose_layout()
    from veloverlay.lower.prune import prune

    # every cached layer (Tier-1 symlinks and redirects name old paths) but what a session has
    # mounted (none is unfinished, above: kept all the same should one have been missed)
    prune(store, set(), mounted=session_layers(store))
    return moved


def gc(
    store: Store,
    m: Manifests,
    *,
    keep: int | None = None,
    grace: float = 3600.0,
    dry_run: bool = False,
    progress: Progress | None = None,
    accept_lost_refs: bool = False,
    waiting: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> GcReport:
    """Delete what nothing needs (see the module's docstring); `progress(objects deleted,
    objects to delete, bytes freed, bytes to free)` while sweeping. `accept_lost_refs`: sweep
    even when the manifest database holds fewer refs than the store record says it had (or none
    while the store holds objects and has no record): only after checking that those refs were
    deleted on purpose, since everything they reached goes. `waiting` is told whom gc waits
    for when the store lock is held (a reader left open: `cat REF f | less`). While gc waits,
    every verb that comes queues behind it: `timeout` bounds that wait (seconds; None: until
    the holders end), after which gc gives up with `locked`, having done nothing."""
    if keep is not None and keep < 1:  # 0 or less would delete the commits refs point at
        raise VeloError(
            f"gc --keep needs N >= 1, not {keep}",
            reason=Reason.USAGE,
            hint="each ref's head is always kept; leave --keep out to keep all history",
        )
    rep = GcReport(dry_run=dry_run)
    # A dry run that cannot take the lock for writing (a read-only filesystem, inside a session)
    # only counts and deletes nothing: the shared lock readers take is enough. (Seen from inside
    # a session, a writer outside may still change what it counts meanwhile.)
    counting = dry_run and store.write_refusal() is not None
    lock = (
        store.read_lock()
        if counting
        else store.lock(exclusive=True, waiting=waiting, timeout=timeout)
    )
    with lock:
        refs, why = counted_refs(store, m)
        if not accept_lost_refs:
            _refuse_lost_refs(why)
        elif not dry_run:  # accepted: the record follows the database from now on
            write_record(store, refs)
        if not dry_run:
            store.reclaim_tmp(no_writer=True)  # stages of writers that died (none is alive:
            # we hold the lock), those without their lock file too
            rep.objects_migrated = migrate_objects(store)
        with m.read() as txn:
            nodes, objects, kept_commits = _mark(store, m, txn, keep)
            heads = set(session_roots(store))
            for ref in m.refs(txn):
                heads.add(bytes.fromhex(m.get_commit(txn, ref.head).root))
            commits = list(m.iter_commits(txn))
            dead_commits = [c.id for c in commits if c.id not in kept_commits]
            # where kept logs end (the parent deleted now, or already missing: --keep says
            # that history is not wanted)
            cuts = {
                c.parent
                for c in commits
                if c.id in kept_commits and c.parent and c.parent not in kept_commits
            }
            dead_nodes = [k for k, _ in m.iter_nodes(txn) if k not in nodes]
        now = time.time()
        victims: list[Path] = []
        short_ids: dict[str, str] = {}  # victim hex -> its short name in ids-v1
        for name, path in store.iter_objects():
            try:
                digest = bytes.fromhex(name)
            except ValueError:
                continue
            if digest in objects:
                rep.objects_kept += 1
                continue
            st = os.lstat(path)
            if now - st.st_ctime < grace:
                rep.young_kept += 1
                continue
            victims.append(path)
            rep.bytes_freed += st.st_size
            with m.read() as txn:
                short_ids[path.name] = short_id(m, txn, digest)
        rep.objects_deleted = len(victims)
        rep.commits_deleted = len(dead_commits)
        rep.nodes_deleted = len([d for d in dead_nodes if d])
        rep.deleted = [p.name for p in victims]
        if dry_run:
            return rep
        # Manifest first: after this commit nothing references the victims.
        forget = (dead_commits, cuts, dead_nodes, short_ids)
        try:
            reserve.freeing(store, lambda: _forget(m, *forget))
        except VeloError as exc:
            if exc.reason is not Reason.STORE_FULL or not victims:
                raise
            # The disk is full, and LMDB needs room even to delete (its pages are copied on
            # write): gc, the way to free room, must not fail there. The victims are reached
            # from nothing gc keeps and no writer runs (the lock is ours), so they go first;
            # the records that still name them are as unreachable, forgotten once there is
            # room (now, or by the next gc).
            _sweep(store, victims, short_ids, progress, rep.bytes_freed)
            _forget(m, *forget)
        else:
            _sweep(store, victims, short_ids, progress, rep.bytes_freed)
        # Lower layers of versions no ref head or session uses any more: rebuilt on demand;
        # under every per-boot base this user's sessions of the store used (another
        # environment's cache kept them, in memory, until a reboot or a gc run there).
        from veloverlay.lower.prune import prune

        rep.layers_evicted = prune(store, heads, everywhere=True, mounted=session_layers(store))
        keep_hex = {h.hex() for h in heads}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(store.trees / "relocation"):  # relocation.cached_find_baked
                if entry.name.split("-", 1)[0] not in keep_hex:
                    os.unlink(entry.path)
        rep.dirs_removed = store.remove_empty_shards()
        rep.quarantine_removed = quarantine.prune(store, objects)
        from veloverlay.session.shim.materialize import prune_proxies

        rep.proxies_removed = prune_proxies(store)
        reserve.ensure(store)  # room came back: kept for the next full disk (reserve.py)
    return rep


def _forget(
    m: Manifests,
    dead_commits: list[str],
    cuts: set[str],
    dead_nodes: list[bytes],
    short_ids: dict[str, str],
) -> None:
    """Delete the records gc does not keep, in one transaction."""
    with m.write() as txn:
        for cid in dead_commits:
            m.delete_commit(txn, cid)
        for cid in cuts:
            m.record_pruned(txn, cid)
        for d in dead_nodes:
            m.delete_node(txn, d)
        for hexname in short_ids:
            txn.delete(bytes.fromhex(hexname), db=m.ids)
        faults.point("commit.before")


def _sweep(
    store: Store,
    victims: list[Path],
    short_ids: dict[str, str],
    progress: Progress | None,
    total: int,
) -> None:
    freed = 0
    for i, path in enumerate(victims, 1):
        with contextlib.suppress(OSError):
            freed += os.lstat(path).st_size
        _unlink_object(store, path, short_ids.get(path.name))
        faults.point("gc.sweep")
        if progress is not None and (i % 256 == 0 or i == len(victims)):
            progress(i, len(victims), freed, total)


def lost_refs(store: Store, refs: int) -> str | None:
    """Why the manifest database looks as if it lost refs (None when it does not): fewer refs
    than the store record says it last had, or none at all in a store that holds objects and
    has no record (stores made before the record existed)."""
    had = read_record(store)
    if had is None and record_damaged(store):  # how many it had is unknown: never assume none
        return (
            f"the store record ({store.root / 'manifests.record'}) is damaged: how many refs "
            "the manifest database should hold is unknown"
        )
    if had is not None:
        if refs < had:
            return f"the store record says it had {had} refs; the manifest database has {refs}"
        return None
    if refs == 0:
        for d in (store.objects, store.root / OBJECTS_V2):
            with contextlib.suppress(FileNotFoundError), os.scandir(d) as it:
                if next(it, None) is not None:
                    return "the manifest database has no refs, but the store holds objects"
    return None


def counted_refs(store: Store, m: Manifests) -> tuple[int, str | None]:
    """(refs in the database, `lost_refs` of that count), read under the store record's lock:
    a writer that makes or deletes a ref holds it from before its commit until the record
    follows, so the two agree here. Read apart, a ref that a session made in between (the shim
    commits its session ref outside the store lock) looked like a lost one, and gc refused."""
    with record_read_lock(store):
        with m.read() as txn:
            refs = m.ref_count(txn)
        return refs, lost_refs(store, refs)


def _refuse_lost_refs(why: str | None) -> None:
    if why is not None:
        raise VeloError(
            f"gc refuses to sweep: {why} (a truncated or replaced database reads as empty)",
            reason=Reason.MANIFEST_CORRUPT,
            hint="check 'veloverlay refs' and restore manifests.lmdb if refs are missing; if "
            "they were deleted on purpose, run gc with --accept-lost-refs",
        )


def _unlink_object(store: Store, path: Path, short: str | None) -> None:
    """Delete an object and its short name (the data-only layer's hard link), clearing +i."""
    names = [path]
    if short is not None:
        from veloverlay.lower.homes import short_id_path

        link = Path(os.fsdecode(short_id_path(store, short)))
        try:
            if os.path.samefile(link, path):
                names.append(link)
        except FileNotFoundError:
            pass
    for name in names:
        try:
            os.unlink(name)
        except PermissionError:
            from veloverlay import fsflags

            fsflags.set_immutable(name, False)  # one inode: clears it for every name
            os.unlink(name)
        except FileNotFoundError:
            pass
