"""The content-addressed object store.

Layout (versioned names: a format change is a new directory name):

    <store>/CACHEDIR.TAG  .gitignore  lock
    <store>/objects-v2/ab/<64 hex>      content, mode 0444, named by BLAKE3 of the bytes written
    <store>/tmp/<stage>/                staging (same filesystem), one directory per writer
    <store>/trees-v1/                   lower layers built from manifests (projection.py)
    <store>/sessions/<id>/              session state (session.py)
    <store>/locks-v1/                   sidecar locks for sources that refuse flock
    <store>/manifests.lmdb/             the manifest database (manifest.py)

Durability without per-file fsync: writers stage objects in `tmp/`, named only after the bytes
actually written have been hashed; `Stage.publish()` then runs syncfs, renames every staged file
into the objects directory, and runs syncfs again, after which the caller may commit a manifest that
references them. A power cut leaves either no named object or a durable, correct one. Where
fs-verity works on the store's filesystem (probed once per boot, `verity.cached_support`), each
object gets verity enabled just before it is named: the kernel then refuses every write to it,
for its owner and root alike, and checks every read. A stage
directory is flock-ed by its writer; a stage whose lock can be taken belongs to a dead writer and
is reclaimed.

Writers (ingest, harvest, import) hold `lock` shared; `gc` holds it exclusively.

The object fan-out is one level of 256 directories (`objects-v2/ab/`): bounded whatever the store
holds. Stores made before issue 15 use `objects-v1/ab/cd/` (65,536 possible directories, in
practice about one per object on small stores: 10,223 directories for 10,863 objects); such a store
keeps that layout, read and written, until `gc` migrates it (`verbs/gc.migrate_objects`: each object
renamed into `objects-v2`, cached layers evicted). From the moment `objects-v2` exists it is where
objects are written; while `objects-v1` still exists too (a migration in progress or interrupted),
an object not found in `objects-v2` is looked up there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from veloverlay import _libc, faults, linking, verity
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import makedirs
from veloverlay.store import access
from veloverlay.store.digest import Digest, Hasher, hash_own_file
from veloverlay.store.objread import object_corrupt, verified_chunks

__all__ = [
    "Store",
    "Stage",
    "OBJECT_MODE",
    "default_store_path",
    "object_missing",
    "object_corrupt",
    "verified_chunks",
]

OBJECT_MODE = 0o444
OBJECTS_V1 = "objects-v1"  # <ab>/<cd>/<hex>: stores made before issue 15 (migrated by gc)
OBJECTS_V2 = "objects-v2"  # <ab>/<hex>: at most 256 fan-out directories
_CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by veloverlay.\n"
)
_CHUNK = 1 << 20


def default_store_path() -> Path:
    env = os.environ.get("VELO_STORE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(xdg) / "veloverlay"


def _is_dir(path: Path) -> bool:
    """Path.is_dir, but False for a store this user may not enter (another user's private
    store: open() then says so, STORE_PERMISSION)."""
    try:
        return path.is_dir()
    except PermissionError:
        return False


def object_missing(digest: bytes) -> VeloError:
    """The error for an object a manifest names but the store lacks."""
    return VeloError(
        f"object {digest.hex()} is missing from the store",
        reason=Reason.OBJECT_MISSING,
        hint="run 'veloverlay fsck --repair' (it says what else is affected), then ingest the "
        "source again or pull the ref again to restore it",
    )


class Store:
    """A store directory. Cheap to construct; `init()` creates it, `open()` checks it exists."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))
        self.tmp = self.root / "tmp"
        self.trees = self.root / "trees-v1"
        self.sessions = self.root / "sessions"
        self.locks = self.root / "locks-v1"
        self.db_path = self.root / "manifests.lmdb"
        self._verity: tuple[bool, str] | None = None
        self.choose_layout()

    def choose_layout(self) -> None:
        """Which object layout this store uses (see the module docstring); gc calls it again
        after a migration step."""
        v1, v2 = self.root / OBJECTS_V1, self.root / OBJECTS_V2
        if _is_dir(v1) and not _is_dir(v2):
            self.objects, self.fanout, self.legacy = v1, 2, None  # a store from before issue 15
        else:
            self.objects, self.fanout = v2, 1
            self.legacy = v1 if _is_dir(v1) else None
        self._objects_b = os.fsencode(self.objects)
        self.objects_b = self._objects_b
        self._legacy_b = os.fsencode(self.legacy) if self.legacy is not None else None
        self._known_shards: set[bytes] = set()

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def init(cls, root: str | os.PathLike[str], *, shared: bool = False) -> Store:
        """Create the store (idempotent). A new store is private to its owner (root directory
        0700: objects are named by content, and a 0600 file's bytes must not become readable
        through them); `shared` makes it readable by every local user (0755), never writable."""
        store = cls(root)
        try:
            makedirs(store.root.parent)
            try:
                os.mkdir(store.root, 0o700)
                os.chmod(store.root, 0o755 if shared else 0o700)
                existed = False
            except FileExistsError:
                existed = True
            store.check_safe()  # before any chmod: root follows no other user's link
            if existed and shared:
                os.chmod(store.root, stat.S_IMODE(os.stat(store.root).st_mode) | 0o055)
            for d in (store.objects, store.tmp, store.sessions, store.locks):
                access.mkdir_nofollow(d)
            access.private_trees(store.trees)
            access.create_once(store.root / "CACHEDIR.TAG", _CACHEDIR_TAG)
            access.create_once(store.root / ".gitignore", b"*\n")
        except PermissionError as exc:
            raise VeloError(
                f"cannot create the store at {store.root}: {exc.strerror}",
                reason=Reason.STORE_PERMISSION,
                hint="choose a writable location with --store or VELO_STORE",
            ) from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise VeloError(
                    f"no space left creating the store at {store.root}", reason=Reason.STORE_FULL
                ) from exc
            if exc.errno == errno.EROFS:
                raise store.write_refusal() or store.read_only_error(str(exc)) from exc
            raise
        return store

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Store:
        store = cls(root)
        if store.root.is_dir() and not os.access(store.root, os.R_OK | os.X_OK):
            owner = store.root.stat().st_uid
            raise VeloError(
                f"the store at {store.root} is not readable by this user",
                reason=Reason.STORE_PERMISSION,
                hint=f"it is private to its owner (uid {owner}): use a store of your own, or "
                "ask its owner for a shared one ('veloverlay init --shared')",
            )
        if not store.objects.is_dir():
            raise VeloError(
                f"no veloverlay store at {store.root}",
                reason=Reason.STORE_MISSING,
                hint="run 'veloverlay init' (or pass --store / set VELO_STORE)",
            )
        store.check_safe()
        return store

    def check_safe(self) -> None:
        """Refuse a store with planted symlinks, or (as root) one another user can write."""
        access.check_safe(self.root)

    def write_refusal(self, path: str | os.PathLike[str] | None = None) -> VeloError | None:
        """Why this process cannot change `path` (default: the store), or None when it can."""
        return access.write_refusal(self.root, path)

    def read_only_error(self, why: str, *, inside: bool = False) -> VeloError:
        return access.read_only_error(self.root, why, inside=inside)

    def verity(self) -> tuple[bool, str]:
        """(usable, reason): does fs-verity work for objects of this store? Probed on a scratch
        file in tmp/ once per boot (cached in fsverity-v1.json), then once per Store."""
        if self._verity is None:
            self._verity = verity.cached_support(self.root / "fsverity-v1.json", self.tmp)
        return self._verity

    def writable(self) -> None:
        """Raise a clear error when this user cannot write the store."""
        for d in (self.root, self.objects, self.tmp):
            if not os.access(d, os.W_OK | os.X_OK):
                refusal = self.write_refusal(d)
                if refusal is not None and refusal.reason is Reason.STORE_READ_ONLY:
                    raise refusal
                raise VeloError(
                    f"the store directory {d} is not writable by this user",
                    reason=Reason.STORE_PERMISSION,
                    hint="fix its ownership/permissions, or use another --store",
                )

    # -- objects ---------------------------------------------------------------------------
    def object_path(self, digest: bytes) -> Path:
        return Path(os.fsdecode(self.object_path_b(digest)))

    def object_path_b(self, digest: bytes) -> bytes:
        h = digest.hex().encode()
        if self.fanout == 1:
            path = b"%s/%s/%s" % (self._objects_b, h[:2], h)
        else:
            path = b"%s/%s/%s/%s" % (self._objects_b, h[:2], h[2:4], h)
        if self._legacy_b is not None and not os.path.lexists(path):
            old = b"%s/%s/%s/%s" % (self._legacy_b, h[:2], h[2:4], h)
            if os.path.lexists(old):
                return old
        elif (
            self.fanout == 2
            and not os.path.lexists(path)
            and (self.root / OBJECTS_V2).is_dir()  # gc began migrating since this was made
        ):
            self.choose_layout()
            return self.object_path_b(digest)
        return path

    def object_relpath_b(self, digest: bytes) -> bytes:
        """`/<fan-out>/<hex>`: the object's path below the objects directory (the redirect of a
        metadata layer whose data-only layer is that directory)."""
        h = digest.hex().encode()
        if self.fanout == 1:
            return b"/%s/%s" % (h[:2], h)
        return b"/%s/%s/%s" % (h[:2], h[2:4], h)

    def has(self, digest: bytes) -> bool:
        try:
            os.stat(self.object_path_b(digest))
        except FileNotFoundError:
            return False
        return True

    def open_object(self, digest: bytes) -> int:
        """Open an object read-only; a missing object is OBJECT_MISSING, naming the digest."""
        try:
            return os.open(self.object_path_b(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise object_missing(digest) from None

    def read_object(self, digest: bytes, size: int | None = None) -> bytes:
        """An object's bytes, verified against its name (and `size`, the entry's, if given)."""
        return b"".join(self.stream_object(digest, size))

    def stream_object(self, digest: bytes, size: int | None = None) -> Iterator[bytes]:
        """An object's bytes a chunk at a time, hashed as they are read: an object whose bytes
        were rewritten in place (a root-free owner can, outside sessions) raises OBJECT_CORRUPT
        after its last chunk instead of ending quietly, and one whose size differs from the
        manifest entry's `size` raises before its first."""
        fd = self.open_object(digest)
        try:
            yield from verified_chunks(fd, digest, size)
        finally:
            os.close(fd)

    def iter_objects(self) -> Iterator[tuple[str, Path]]:
        """Yield (hex name, path) of every entry under the objects directory, and under the old
        one while a migration is unfinished (names not validated)."""
        yield from _iter_fanout(self.objects)
        if self.legacy is not None:
            yield from _iter_fanout(self.legacy)

    def shard_dir(self, hexname: bytes) -> bytes:
        if self.fanout == 1:
            d = b"%s/%s" % (self._objects_b, hexname[:2])
        else:
            d = b"%s/%s/%s" % (self._objects_b, hexname[:2], hexname[2:4])
        if d not in self._known_shards:
            try:
                os.mkdir(d, 0o755)  # one call when its parent exists (the usual case)
            except FileExistsError:
                pass
            except FileNotFoundError:
                makedirs(d)
            self._known_shards.add(d)
        return d

    def remove_empty_shards(self) -> int:
        """Remove the fan-out directories under the objects directory that hold nothing (gc,
        under the exclusive store lock, after a sweep). Returns how many went."""
        removed = 0
        top = os.fspath(self.objects)
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            if dirpath == top:
                continue
            try:
                os.rmdir(dirpath)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
                continue
            removed += 1
        self._known_shards.clear()
        return removed

    # -- locking ---------------------------------------------------------------------------
    def lock(
        self, *, exclusive: bool = False, wait: bool = True
    ) -> contextlib.AbstractContextManager[None]:
        """The store lock: shared for writers, exclusive for gc."""
        return access.store_lock(self.root, exclusive=exclusive, wait=wait)

    def stage(self) -> Stage:
        return Stage(self)

    def reclaim_tmp(self) -> int:
        """Remove stages left by dead writers (their flock is free). Returns entries removed."""
        return access.reclaim_stages(self.tmp)


def _iter_fanout(top: Path) -> Iterator[tuple[str, Path]]:
    """Every non-directory up to two directory levels below `top` (either fan-out)."""
    try:
        level1 = sorted(os.scandir(top), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for d1 in level1:
        if not d1.is_dir(follow_symlinks=False):
            yield d1.name, Path(d1.path)
            continue
        for d2 in sorted(os.scandir(d1.path), key=lambda e: e.name):
            if not d2.is_dir(follow_symlinks=False):
                yield d2.name, Path(d2.path)
                continue
            for obj in os.scandir(d2.path):
                yield obj.name, Path(obj.path)


def syncfs_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _libc.syncfs(fd)
    finally:
        os.close(fd)


class Stage:
    """A writer's staging area. Stage objects, then `publish()` them durably in one batch.

    Usable from forked worker processes: each worker calls `Stage.attach(store, name)` and writes
    into the same directory under unique file names; the parent publishes.
    """

    def __init__(self, store: Store, name: str | None = None) -> None:
        self.store = store
        self.name = name or f"{os.getpid()}-{os.urandom(6).hex()}"
        self.dir = store.tmp / self.name
        self._dir_b = os.fsencode(self.dir)
        self._lock_fd = -1
        self._seq = 0
        self.staged: dict[bytes, bytes] = {}  # digest -> staged file path
        self.sizes: dict[bytes, int] = {}  # digest -> bytes, of what this process staged

    def __enter__(self) -> Stage:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        access.mkdir_nofollow(self.store.tmp)
        self._lock_fd = access.open_nofollow(
            self.store.tmp / f"{self.name}.lock", os.O_RDWR | os.O_CREAT, 0o600
        )
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        access.mkdir_nofollow(self.dir)

    @classmethod
    def attach(cls, store: Store, name: str) -> Stage:
        """A view of an existing stage for a worker process (it does not own the lock)."""
        return cls(store, name)

    def close(self) -> None:
        """Drop whatever was not published and release the stage."""
        with contextlib.suppress(FileNotFoundError):
            access.rmtree_count(self.dir)
        if self._lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.store.tmp / f"{self.name}.lock")
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _tmpname(self) -> bytes:
        self._seq += 1
        return b"%s/%d-%d" % (self._dir_b, os.getpid(), self._seq)

    def add_bytes(self, data: bytes | memoryview, digest: Digest | None = None) -> Digest:
        """Stage `data`; the name is the hash of exactly these bytes."""
        if digest is None:
            h = Hasher()
            h.update(data)
            digest = h.digest()
        if digest in self.staged or self.store.has(digest):
            return digest
        path = self._tmpname()
        fd = _create(path)
        try:
            _write_all(fd, data, path)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        faults.point("stage.written")
        self.staged[digest] = path
        self.sizes[digest] = len(data)
        return digest

    def add_fd(self, src_fd: int) -> tuple[Digest, int, bool]:
        """Copy from `src_fd` (its current offset to EOF) into the stage. A file of `_CHUNK`
        bytes or more is copied by the kernel (`linking.copy_in_kernel`: a reflink, or
        copy_file_range) and named by the hash of the staged file itself, whatever the source
        did meanwhile; the rest, or where the kernel cannot, is read, hashed and written.
        Returns (digest, size, new); content already in the store is not kept twice."""
        reader = iter(lambda: os.read(src_fd, _CHUNK), b"")
        if os.fstat(src_fd).st_size - os.lseek(src_fd, 0, os.SEEK_CUR) < _CHUNK:
            return self.add_stream(reader)
        path = self._tmpname()
        fd = _create(path, os.O_RDWR)
        kept = False
        try:
            if linking.copy_in_kernel(src_fd, fd) is not None:
                digest, size = hash_own_file(fd)
                kept = True
        except OSError as exc:
            raise _store_error(exc, "copy_file_range", path) from exc
        finally:
            os.close(fd)
            if not kept:
                os.unlink(path)
        if not kept:  # the kernel could not: read, hash and write
            return self.add_stream(reader)
        return self._keep(digest, size, path)

    def add_stream(self, chunks: Iterable[bytes]) -> tuple[Digest, int, bool]:
        """Stage the concatenation of `chunks`, written and hashed as they come (memory stays at
        one chunk, whatever the object's size). Returns (digest, size, new)."""
        path = self._tmpname()
        fd = _create(path)
        h = Hasher()
        size = 0
        try:
            for chunk in chunks:
                h.update(chunk)
                _write_all(fd, chunk, path)
                size += len(chunk)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return self._keep(h.digest(), size, path)

    def _keep(self, digest: Digest, size: int, path: bytes) -> tuple[Digest, int, bool]:
        """Keep the staged file at `path` as `digest`, unless that content is staged or stored
        already (then the file goes). Returns (digest, size, new)."""
        if digest in self.staged or self.store.has(digest):
            os.unlink(path)
            return digest, size, False
        faults.point("stage.written")
        self.staged[digest] = path
        self.sizes[digest] = size
        return digest, size, True

    def adopt(self, staged: dict[bytes, bytes]) -> None:
        """Take over objects staged by worker processes."""
        for digest, path in staged.items():
            if digest in self.staged:
                os.unlink(path)
            else:
                self.staged[digest] = path

    def publish(self, mapper: Mapper | None = None, others: Callable[[], int] | None = None) -> int:
        """syncfs; rename staged objects into their names; syncfs. Returns objects published.

        `mapper` (e.g. a process pool's `map`) spreads the renames over workers: creating the
        shard directories and renaming is most of the cost of storing many small objects.
        `others` renames what other processes staged into this stage and kept themselves (each
        worker its own, with `rename_own`), between the two syncfs; it returns their count.
        """
        if not self.staged and others is None:
            return 0
        syncfs_path(self.dir)
        faults.point("publish.synced")
        items = list(self.staged.items())
        root = os.fspath(self.store.root)
        seal = self.store.verity()[0]
        from veloverlay.store.publish import _publish_chunk

        if mapper is None or len(items) < 2 * _PUBLISH_CHUNK:
            published = _publish_chunk((root, items, seal))
        else:
            chunks = [
                (root, items[i : i + _PUBLISH_CHUNK], seal)
                for i in range(0, len(items), _PUBLISH_CHUNK)
            ]
            published = sum(mapper(_publish_chunk, chunks))
        if others is not None:
            published += others()
        syncfs_path(self.store.objects)
        faults.point("publish.done")
        self.staged.clear()
        return published

    def rename_own(self) -> tuple[int, int]:
        """In the process that staged them: rename this view's objects into their names (sealed
        with fs-verity first where the store uses it), once the stage's owner has synced the
        stage (`publish(others=...)` calls this in each worker). Returns (objects published,
        their bytes); an object that exists already is kept."""
        from veloverlay.store.publish import _rename_noreplace

        store = self.store
        seal = store.verity()[0]
        objfd = os.open(store.objects_b, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        count = nbytes = 0
        try:
            for digest, path in self.staged.items():
                if _rename_noreplace(store, objfd, path, digest, seal):
                    faults.point("publish.renamed")
                    count += 1
                    nbytes += self.sizes.get(digest, 0)
                else:
                    os.unlink(path)
        finally:
            os.close(objfd)
        self.staged.clear()
        self.sizes.clear()
        return count, nbytes


_Chunk = tuple[str, list[tuple[bytes, bytes]], bool]  # (store root, [(digest, staged)], seal)
Mapper = Callable[[Callable[[_Chunk], int], list[_Chunk]], Iterable[int]]
_PUBLISH_CHUNK = 512


def _write_all(fd: int, data: bytes | memoryview, path: bytes) -> None:
    """Write everything; a full or read-only store is a VeloError (STORE_FULL, ...)."""
    view = memoryview(data)
    try:
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as exc:
        raise _store_error(exc, "write", path) from exc


def _create(path: bytes, access_mode: int = os.O_WRONLY) -> int:
    try:
        return os.open(
            path, access_mode | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, OBJECT_MODE
        )
    except OSError as exc:
        raise _store_error(exc, "open", path) from exc


def _store_error(exc: OSError, call: str, path: bytes, path2: bytes | None = None) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return VeloError(
            "the store's filesystem is full",
            reason=Reason.STORE_FULL,
            hint="free space (e.g. 'veloverlay gc') and retry; nothing stored was changed",
            path=path,
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return VeloError(
            f"cannot write into the store: {exc.strerror}",
            reason=Reason.STORE_PERMISSION,
            path=path,
        )
    return SysError(exc.errno or errno.EIO, call, path, path2)


def check_object_file(path: str | os.PathLike[str]) -> os.stat_result:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise VeloError(f"{path} is not a regular file", reason=Reason.OBJECT_CORRUPT, path=path)
    return st
