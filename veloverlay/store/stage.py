"""Staging objects in a store's `tmp/`: a writer's stage directory, the files it writes there
(named after they are hashed), and the durable publication of the batch (cas.py's module
docstring: syncfs, rename into the objects directory, syncfs).

Every file of a stage is made relative to a descriptor of the stage directory, itself opened
relative to the store's held descriptor (`Store.fd`) without following a symbolic link: a store
moved or replaced by name while a writer runs does not receive its files. A staged object is
kept as its path, but only its last two components (`<stage>/<file>`, relative to the `tmp/`
held) are used to rename it, by whichever process of the writer (threads). A forked worker
(`attach`) stages in its own subdirectory `<stage>/w<pid>/` and renames its files itself: files
made in one directory by several processes at once wait for each other on its lock (measured
on ext4: 2 × 10,000 creates 0.37 s in one directory, 0.27 s in two).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from veloverlay import _libc, faults, files, linking
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.store import access
from veloverlay.store.digest import Digest, Hasher, hash_own_file
from veloverlay.store.reserve import FULL_HINT

if TYPE_CHECKING:
    from veloverlay.store.cas import Store

__all__ = ["Stage", "OBJECT_MODE", "Mapper"]

OBJECT_MODE = 0o444
_CHUNK = 1 << 20


class Stage:
    """A writer's staging area. Stage objects, then `publish()` them durably in one batch.

    Usable from forked worker processes: each worker calls `Stage.attach(store, name)` and writes
    into its own subdirectory; the parent publishes (each worker renames its own: `rename_own`).
    """

    def __init__(self, store: Store, name: str | None = None) -> None:
        self.store = store
        self.name = name or f"{os.getpid()}-{os.urandom(6).hex()}"
        self.dir = store.tmp / self.name
        self._dir_b = os.fsencode(self.dir)
        self._dir_fd = -1
        self._sub = b""  # a worker's own subdirectory (attach)
        # A worker's small objects, written unnamed (O_TMPFILE) and kept open until published:
        # no name in the stage to make and to rename away (`_hold`). -1: not decided yet.
        self._hold_max = 0
        self._held: dict[bytes, int] = {}  # digest -> descriptor
        self._budget: HoldBudget | None = None  # shared with other stages (`hold`)
        self._named: list[bytes] = []  # held objects named before `rename_own` (a full batch)
        # A worker's full batch is synced and named by a thread while the next one is written
        # (`_send`): the syncfs waits for the disk, the hashing goes on. One batch at a time.
        self._flight: threading.Thread | None = None
        self._flying: dict[bytes, int] = {}
        self._flight_error: BaseException | None = None
        self._lock_fd = -1
        self._seq = 0
        self.staged: dict[bytes, bytes] = {}  # digest -> staged file path (see the docstring)
        # Whether `add_bytes` looks in the store first: not for a pull's stages, which fetch only
        # what the store lacked a moment ago (one that arrived since is kept as it is: EEXIST).
        self.ask_store = True
        self._listings: dict[int, set[str] | None] = {}  # `Store.has_listed`'s
        self.sizes: dict[bytes, int] = {}  # digest -> bytes, of what this process staged
        # Whether the umask would take bits of OBJECT_MODE (077: a shared store's users could
        # not read): only then is each object made under `files.exact_modes` (its lock and two
        # umask calls per object cost 5 % of a small-file ingest)
        self._exact = bool(files.umask_now() & OBJECT_MODE)

    def __enter__(self) -> Stage:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self.store.held()
        tmp = self.store.tmp_fd()
        self._lock_fd = access.open_nofollow(
            f"{self.name}.lock",
            os.O_RDWR | os.O_CREAT,
            0o600,
            dir_fd=tmp,
            shown=self.store.tmp / f"{self.name}.lock",
        )
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        access.mkdir_nofollow(self.name, dir_fd=tmp, shown=self.dir)

    @classmethod
    def attach(cls, store: Store, name: str) -> Stage:
        """A view of an existing stage for a worker process (it does not own the lock), writing
        into its own subdirectory of it."""
        view = cls(store, name)
        view._hold_max = -1
        view._sub = b"w%d" % os.getpid()
        view._dir_b += b"/" + view._sub
        return view

    def dir_fd(self) -> int:
        """A descriptor of the directory this process stages in (opened on first use)."""
        if self._dir_fd < 0:
            fd = access.open_dir(self.name, dir_fd=self.store.tmp_fd(), shown=self.dir)
            if self._sub:
                try:
                    sub = access.make_dir(self._sub, 0o700, dir_fd=fd, shown=self._dir_b)
                finally:
                    os.close(fd)
                fd = sub
            self._dir_fd = fd
        return self._dir_fd

    def _close_dir(self) -> None:
        with contextlib.suppress(Exception):
            self._land()
        for fd in self._held.values():  # unnamed: they vanish
            os.close(fd)
        if self._budget is not None:
            self._budget.give(len(self._held))
        self._held.clear()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __del__(self) -> None:  # a worker's view (attach) is dropped, never closed
        with contextlib.suppress(Exception):
            self._close_dir()

    def close(self) -> None:
        """Drop whatever was not published and release the stage."""
        self._close_dir()
        tmp = self.store.tmp_fd()
        with contextlib.suppress(FileNotFoundError):
            access.rmtree_count(self.name, dir_fd=tmp)
        if self._lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.name}.lock", dir_fd=tmp)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _tmpname(self) -> bytes:
        self._seq += 1
        return b"%s/%d-%d" % (self._dir_b, os.getpid(), self._seq)

    def _create(self, path: bytes, access_mode: int = os.O_WRONLY) -> int:
        flags = access_mode | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            with files.exact_modes() if self._exact else contextlib.nullcontext():
                return os.open(os.path.basename(path), flags, OBJECT_MODE, dir_fd=self.dir_fd())
        except OSError as exc:
            raise store_error(exc, "open", path) from exc

    def _drop(self, path: bytes) -> None:
        os.unlink(os.path.basename(path), dir_fd=self.dir_fd())

    def discard(self, digest: bytes) -> None:
        """Remove an object this stage holds and forget it."""
        self.sizes.pop(digest, None)
        if digest in self._held:
            os.close(self._held.pop(digest))
            return
        if digest in self._flying:  # being named: an unreferenced object, gc's to remove
            return
        path = self.staged.pop(digest)
        if os.path.dirname(path) == self._dir_b:
            self._drop(path)
        else:  # adopted from another stage
            unlink_staged(self.store, path)

    def add_bytes(self, data: bytes | memoryview, digest: Digest | None = None) -> Digest:
        """Stage `data`; the name is the hash of exactly these bytes."""
        if digest is None:
            h = Hasher()
            h.update(data)
            digest = h.digest()
        if digest in self.staged or digest in self._held or digest in self._flying:
            return digest
        if self.ask_store and self.store.has_listed(digest, self._listings):
            return digest
        if self._hold_max and self._hold(data, digest):
            return digest
        path = self._tmpname()
        fd = self._create(path)
        try:
            _write_all(fd, data, path)
        except BaseException:
            self._drop(path)
            raise
        finally:
            os.close(fd)
        faults.point("stage.written")
        self.staged[digest] = path
        self.sizes[digest] = len(data)
        return digest

    def hold(self, budget: HoldBudget) -> None:
        """Write small objects (`add_bytes`) unnamed (O_TMPFILE) and keep them open until
        published, as a worker's view does (no name to make in the stage and rename away),
        while `budget` — shared by the stages of this process's threads — has a descriptor to
        spare; past it, by name. Unlike a worker's view, nothing is named before `name_held`."""
        self._budget = budget
        self._hold_max = 1

    def name_held(self) -> list[bytes]:
        """Name what this stage holds unnamed, whose bytes the caller has synced (`publish`
        between its two syncfs), and return every object named so since the last call (full
        batches of a worker's view included)."""
        self._land()
        if self._held:
            self._name_held()
        named, self._named = self._named, []
        return named

    def held(self) -> int:
        """Objects this stage holds unnamed."""
        return len(self._held)

    def pending(self) -> int:
        """Objects staged (held or named) by this view and not published by `rename_own`."""
        return len(self.staged) + len(self._held) + len(self._named)

    def _hold(self, data: bytes | memoryview, digest: Digest) -> bool:
        """Write `data` into an unnamed file of the stage kept open (a worker's view); False
        where that cannot be (then the object is staged by name). A full batch is synced and
        named at once: the descriptors held stay bounded."""
        budget = self._budget
        if budget is not None:
            if not budget.take():
                return False
        elif self._hold_max < 0:
            self._hold_max = _hold_budget(self.store) // 2  # two batches: one in flight
            if not self._hold_max:
                return False
        try:
            fd = open_unnamed(self.dir_fd(), exact=self._exact)
        except OSError as exc:
            if budget is not None:
                budget.give(1)
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                self._hold_max = 0  # a filesystem without O_TMPFILE
                return False
            raise store_error(exc, "open", self._dir_b) from exc
        try:
            _write_all(fd, data, self._dir_b)
        except BaseException:
            os.close(fd)
            if budget is not None:
                budget.give(1)
            raise
        faults.point("stage.written")
        self._held[digest] = fd
        self.sizes[digest] = len(data)
        if budget is None and len(self._held) >= self._hold_max:
            self._send()
        return True

    def _send(self) -> None:
        """Sync and name the full batch held in a thread, while this one goes on writing the
        next (the previous batch lands first)."""
        self._land()
        self.store.follow_migration()
        batch, self._held = self._held, {}
        self._flying = dict.fromkeys(batch, -1)  # `name_held` empties `batch`
        self._flight = threading.Thread(target=self._fly, args=(batch,), daemon=True)
        self._flight.start()

    def _fly(self, batch: dict[bytes, int]) -> None:
        from veloverlay.store.publish import Shards, name_held

        try:
            _libc.syncfs(next(iter(batch.values())))  # the bytes before the names
            faults.point("publish.synced")
            with Shards(self.store) as shards:
                self._named += name_held(self.store, batch, shards)
        except BaseException as exc:  # raised by the thread that writes on (`_land`)
            self._flight_error = exc
            for fd in batch.values():
                if fd >= 0:
                    os.close(fd)
            batch.clear()

    def _land(self) -> None:
        """Wait for the batch in flight; raise what stopped it."""
        if self._flight is None:
            return
        self._flight.join()
        self._flight = None
        self._listed(self._flying)  # named there, or already
        self._flying = {}
        exc, self._flight_error = self._flight_error, None
        if exc is not None:  # the ingest fails: what this view holds unnamed vanishes
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()
            raise exc

    def _listed(self, digests: Iterable[bytes]) -> None:
        """Objects stored now: the listings `add_bytes` asks say so."""
        for digest in digests:
            names = self._listings.get(digest[0])
            if names is not None:
                names.add(digest.hex())

    def _name_held(self) -> None:
        from veloverlay.store.publish import Shards, name_held

        self.store.follow_migration()
        count = len(self._held)
        batch = list(self._held)
        try:
            with Shards(self.store) as shards:
                self._named += name_held(self.store, self._held, shards)
            self._listed(batch)  # named here, or already
        finally:  # what name_held closed (all of them, named or not, once it ran)
            if self._budget is not None:
                self._budget.give(count - len(self._held))

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
        fd = self._create(path, os.O_RDWR)
        kept = False
        try:
            how = linking.copy_in_kernel(src_fd, fd)
            if how is not None:
                digest, size = hash_own_file(fd, direct=how is linking.LinkMode.REFLINK)
                kept = True
        except OSError as exc:
            raise store_error(exc, "copy_file_range", path) from exc
        finally:
            os.close(fd)
            if not kept:
                self._drop(path)
        if not kept:  # the kernel could not: read, hash and write
            return self.add_stream(reader)
        return self._keep(digest, size, path)

    def add_stream(self, chunks: Iterable[bytes]) -> tuple[Digest, int, bool]:
        """Stage the concatenation of `chunks`, written and hashed as they come (memory stays at
        one chunk, whatever the object's size). Returns (digest, size, new)."""
        path = self._tmpname()
        fd = self._create(path)
        h = Hasher()
        size = 0
        try:
            hole = False  # at the end: then the file needs its size set
            for chunk in chunks:
                h.update(chunk)
                hole = _write_all(fd, chunk, path, sparse=True)
                size += len(chunk)
            if hole:
                _sized(fd, size, path)
        except BaseException:
            os.close(fd)
            self._drop(path)
            raise
        os.close(fd)
        return self._keep(h.digest(), size, path)

    def _keep(self, digest: Digest, size: int, path: bytes) -> tuple[Digest, int, bool]:
        """Keep the staged file at `path` as `digest`, unless that content is staged or stored
        already (then the file goes). Returns (digest, size, new)."""
        if digest in self.staged or self.store.has(digest):
            self._drop(path)
            return digest, size, False
        faults.point("stage.written")
        self.staged[digest] = path
        self.sizes[digest] = size
        return digest, size, True

    def adopt(self, staged: dict[bytes, bytes]) -> None:
        """Take over objects staged by worker processes (or other stages of this store)."""
        for digest, path in staged.items():
            if digest in self.staged:
                unlink_staged(self.store, path)
            else:
                self.staged[digest] = path

    def publish(self, mapper: Mapper | None = None, others: Callable[[], int] | None = None) -> int:
        """syncfs; rename staged objects into their names; syncfs. Returns objects published.

        `mapper` (e.g. a thread pool's `map`) spreads the renames over workers: creating the
        shard directories and renaming is most of the cost of storing many small objects.
        `others` renames what other processes staged into this stage and kept themselves (each
        worker its own, with `rename_own`), between the two syncfs; it returns their count.
        A store moved or replaced since it was judged is refused first (`Store.held`).
        """
        if not self.staged and others is None:
            return 0
        self.store.held()
        self.store.follow_migration()
        _libc.syncfs(self.dir_fd())
        faults.point("publish.synced")
        items = list(self.staged.items())
        seal = self.store.verity()[0]
        from veloverlay.store.publish import publish_chunk

        if mapper is None or len(items) < 2 * _PUBLISH_CHUNK:
            published = publish_chunk((self.store, items, seal))
        else:
            chunks = [
                (self.store, items[i : i + _PUBLISH_CHUNK], seal)
                for i in range(0, len(items), _PUBLISH_CHUNK)
            ]
            published = sum(mapper(publish_chunk, chunks))
        if others is not None:
            published += others()
        _libc.syncfs(self.store.objects_fd())
        faults.point("publish.done")
        self.staged.clear()
        return published

    def rename_own(self) -> tuple[int, int]:
        """In the process that staged them: rename this view's objects into their names (sealed
        with fs-verity first where the store uses it), once the stage's owner has synced the
        stage (`publish(others=...)` calls this in each worker). Returns (objects published,
        their bytes); an object that exists already is kept."""
        from veloverlay.store.publish import Shards, rename_noreplace

        store = self.store
        store.follow_migration()
        seal = store.verity()[0]
        fd = self.dir_fd()
        count = nbytes = 0
        with Shards(store) as shards:
            for digest, path in sorted(self.staged.items()):
                name = os.path.basename(path)
                if rename_noreplace(store, fd, name, path, digest, seal, shards):
                    faults.point("publish.renamed")
                    count += 1
                    nbytes += self.sizes.get(digest, 0)
                else:
                    os.unlink(name, dir_fd=fd)
        self._land()
        if self._held:
            self._name_held()
        count += len(self._named)
        nbytes += sum(self.sizes.get(d, 0) for d in self._named)
        self._named.clear()
        self.staged.clear()
        self.sizes.clear()
        self._close_dir()
        return count, nbytes


def open_unnamed(dir_fd: int, *, exact: bool = True) -> int:
    """A new file without a name in the directory `dir_fd`, open for writing (O_TMPFILE);
    `exact`: made under `files.exact_modes` (0444 whatever the umask)."""
    with files.exact_modes() if exact else contextlib.nullcontext():
        return os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, OBJECT_MODE, dir_fd=dir_fd)


_HOLD = 4096  # unnamed objects a worker keeps open at most: the batch it syncs and names
HOLD_FILES = 8 * _HOLD  # the file limit a process needs for a whole `HoldBudget`


class HoldBudget:
    """How many unnamed objects the stages of one process (its threads: one descriptor table)
    may hold open at once (`Stage.hold`); `_hold_budget` of the store."""

    def __init__(self, store: Store) -> None:
        # a pull's 4 transfers at once: 4 times a worker's batch, if the process may open that
        # (twice as many files: HOLD_FILES)
        self.total = self.free = _hold_budget(store, 4 * _HOLD)
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.free <= 0:
                return False
            self.free -= 1
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.free += n

    def wants_back(self, held: int) -> bool:
        """Whether stages done with `held` of it should give them back (be published) now: half
        of a budget big enough to be worth two syncfs (below 1,024, objects past it are staged
        by name instead)."""
        return self.total >= 1024 and 2 * held >= self.total


def _hold_budget(store: Store, most: int | None = None) -> int:
    """How many unnamed objects a worker's view (or a `HoldBudget`) may hold open: 0 (stage by
    name) for a store sealing objects with fs-verity (a file open for writing cannot be sealed)
    or without /proc/self/fd (a kernel before 6.10 names an unnamed file by it), else up to
    `most` (default `_HOLD`), half the descriptors this process may open."""
    if store.verity()[0] or not os.path.isdir("/proc/self/fd"):
        return 0
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    most = _HOLD if most is None else most
    half = most if soft == resource.RLIM_INFINITY else soft // 2
    return min(most, half) if half >= 256 else 0


# (the store, [(digest, staged file path)], seal)
Chunk = tuple["Store", list[tuple[bytes, bytes]], bool]
Mapper = Callable[[Callable[[Chunk], int], list[Chunk]], Iterable[int]]
_PUBLISH_CHUNK = 512


def staged_name(path: bytes) -> tuple[bytes, bytes]:
    """(stage, file) of a staged file's path: what is looked up, relative to the tmp/ held."""
    head, name = os.path.split(path)
    return os.path.basename(head), name


def unlink_staged(store: Store, path: bytes) -> None:
    stage, name = staged_name(path)
    fd = access.open_dir(stage, dir_fd=store.tmp_fd(), shown=os.path.dirname(path))
    try:
        os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview, path: bytes, *, sparse: bool = False) -> bool:
    """Write everything; a full or read-only store is a VeloError (STORE_FULL, ...). `sparse`:
    a run of zeros becomes a hole (`linking.write_or_skip`); returns whether it did (a file
    that ends in one gets its size from `_sized`)."""
    view = memoryview(data)
    try:
        if sparse:
            return linking.write_or_skip(fd, view)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as exc:
        raise store_error(exc, "write", path) from exc
    return False


def _sized(fd: int, size: int, path: bytes) -> None:
    """Give a file that ends in a hole its size."""
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise store_error(exc, "ftruncate", path) from exc


def store_error(exc: OSError, call: str, path: bytes, path2: bytes | None = None) -> Exception:
    """The error a failed write into the store raises: STORE_FULL, STORE_PERMISSION, or the
    syscall's own."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return VeloError(
            "the store's filesystem is full",
            reason=Reason.STORE_FULL,
            hint=f"{FULL_HINT}; nothing stored was changed",
            path=path,
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return VeloError(
            f"cannot write into the store: {exc.strerror}",
            reason=Reason.STORE_PERMISSION,
            path=path,
        )
    return SysError(exc.errno or errno.EIO, call, path, path2)
