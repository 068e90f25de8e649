"""The content-addressed object store.

Layout (versioned names: a format change is a new directory name):

    <store>/CACHEDIR.TAG  .gitignore  lock
    <store>/objects-v2/ab/<64 hex>      content, mode 0444, named by BLAKE3 of the bytes written
    <store>/tmp/<stage>/                staging (same filesystem), one directory per writer
    <store>/trees-v1/                   lower layers built from manifests (projection.py)
    <store>/sessions/<id>/              session state (session.py)
    <store>/locks-v1/                   sidecar locks for sources that refuse flock
    <store>/manifests.lmdb/             the manifest database (manifest.py)
    <store>/space-reserve               room kept for space-freeing commits (reserve.py)

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
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from veloverlay import envvars, pathtrust, verity
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import makedirs
from veloverlay.store import access, reserve, storelock
from veloverlay.store.objread import object_corrupt, open_regular, verified_chunks
from veloverlay.store.presence import Presence
from veloverlay.store.stage import OBJECT_MODE, Stage

__all__ = [
    "Store",
    "Stage",
    "OBJECT_MODE",
    "default_store_path",
    "object_missing",
    "object_corrupt",
    "verified_chunks",
]

OBJECTS_V1 = "objects-v1"  # <ab>/<cd>/<hex>: stores made before issue 15 (migrated by gc)
OBJECTS_V2 = "objects-v2"  # <ab>/<hex>: at most 256 fan-out directories

_CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by veloverlay.\n"
)


def default_store_path() -> Path:
    """The store no --store names: VELO_STORE's, else $XDG_DATA_HOME/veloverlay. VELO_STORE set
    but empty is refused (USAGE), as `--store ''` is: `VELO_STORE="$UNSET" veloverlay remove-store`
    must not mean the default store."""
    env = os.environ.get("VELO_STORE")
    if env == "":
        raise VeloError(
            "VELO_STORE is set but empty",
            reason=Reason.USAGE,
            hint="set VELO_STORE to the store directory, or unset it for the default store",
        )
    if env:
        return Path(env)
    xdg = envvars.xdg_dir("XDG_DATA_HOME", ".local/share")
    if xdg is None:
        raise VeloError(
            f"no store location: HOME is unset or not an absolute path, and uid {os.getuid()} "
            "has no home directory in the password database",
            reason=Reason.STORE_MISSING,
            hint="pass --store DIR, or set VELO_STORE (or HOME or XDG_DATA_HOME) to an "
            "absolute path",
        )
    return Path(xdg) / "veloverlay"


def _is_dir(path: Path) -> bool:
    """Path.is_dir, but False for a store this user may not enter (another user's private
    store: open() then says so, STORE_PERMISSION), or a name too long (ENAMETOOLONG: init and
    open say so of the store)."""
    try:
        return path.is_dir()
    except PermissionError:
        return False
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise


def object_missing(digest: bytes) -> VeloError:
    """The error for an object a manifest names but the store lacks."""
    return VeloError(
        f"object {digest.hex()} is missing from the store",
        reason=Reason.OBJECT_MISSING,
        hint="run 'veloverlay fsck --repair' (it says what else is affected), then ingest the "
        "source again or pull the ref again to restore it",
    )


class Store(Presence):
    """A store directory. Cheap to construct; `init()` creates it, `open()` checks it exists."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))
        self.tmp = self.root / "tmp"
        self.trees = self.root / "trees-v1"
        self.sessions = self.root / "sessions"
        self.locks = self.root / "locks-v1"
        self.db_path = self.root / "manifests.lmdb"
        self._verity: tuple[bool, str] | None = None
        self._fd = -1  # the store directory (`fd`)
        self._fds: dict[str, int] = {}  # its tmp/ and objects directories, by name
        self._fds_lock = threading.Lock()  # pull publishes on two threads
        self.choose_layout()

    def choose_layout(self) -> None:
        """Which object layout this store uses (see the module docstring); gc calls it again
        after a migration step."""
        v1, v2 = self.root / OBJECTS_V1, self.root / OBJECTS_V2
        if self._is_dir(v1) and not self._is_dir(v2):
            self.objects, self.fanout, self.legacy = v1, 2, None  # a store from before issue 15
        else:
            self.objects, self.fanout = v2, 1
            self.legacy = v1 if self._is_dir(v1) else None
        self._objects_b = os.fsencode(self.objects)
        self.objects_b = self._objects_b
        self._legacy_b = os.fsencode(self.legacy) if self.legacy is not None else None
        self._drop_fds(objects_only=True)

    def follow_migration(self) -> None:
        """Choose the layout again if gc migrated the store since this process chose it (a
        writer that opened the store before: it names objects in objects-v2 from now on)."""
        if self.fanout == 2 and self._is_dir(self.root / OBJECTS_V2):
            self.choose_layout()

    def _is_dir(self, path: Path) -> bool:
        """A directory of the store (relative to `fd` once it is held: no link followed)."""
        if self._fd < 0:
            return _is_dir(path)
        try:
            st = os.stat(path.name, dir_fd=self._fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode)

    # -- the descriptors the store's writes go by --------------------------------------------
    @property
    def fd(self) -> int:
        """A descriptor of the store directory. `open` and `init` open it once the store has
        been judged (`check_safe`): every write of objects, stages and locks is made relative to
        it, so a store moved or replaced by name afterwards is not where they go. A Store made
        directly opens its directory on first use (not judged)."""
        if self._fd < 0:
            self._fd = access.open_dir(os.path.realpath(self.root), shown=self.root)
        return self._fd

    @property
    def shared(self) -> bool:
        """Every local user can read the store (`init --shared`, or its directory made so): what
        is stored in it is theirs to read, whatever the mode of the file it came from."""
        return os.fstat(self.fd).st_mode & 0o005 == 0o005

    def held_path(self, name: str) -> str:
        """A path to `name` in the store that goes by the held descriptor (/proc/self/fd/N/name,
        where /proc is mounted), for what takes only a path: LMDB opens its files by name."""
        here = f"/proc/self/fd/{self.fd}"
        return f"{here}/{name}" if os.path.isdir(here) else os.fspath(self.root / name)

    def _sub_fd(self, name: str) -> int:
        """A descriptor of the store's directory `name` (made if missing), kept while the store
        is; never reached through a symbolic link."""
        with self._fds_lock:
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = access.make_dir(name, dir_fd=self.fd, shown=self.root / name)
            return fd

    def tmp_fd(self) -> int:
        return self._sub_fd("tmp")

    def objects_fd(self) -> int:
        return self._sub_fd(self.objects.name)

    @contextlib.contextmanager
    def shard(self, hexname: bytes) -> Iterator[int]:
        """A descriptor of the fan-out directory an object named `hexname` goes in, made if
        missing, reached from the objects directory held without following a symbolic link at
        any level; open for the call only (a few microseconds: a process keeps no more than
        three descriptors per store, whatever its open-file limit)."""
        fd = self.open_shard(hexname)
        try:
            yield fd
        finally:
            os.close(fd)

    def open_shard(self, hexname: bytes) -> int:
        """`shard`'s descriptor, for a caller that closes it (publish keeps one while the
        objects it names, in name order, go to the same directory)."""
        objects = self.objects_fd()
        top = access.make_dir(
            os.fsdecode(hexname[:2]), dir_fd=objects, shown=self._objects_b + b"/" + hexname[:2]
        )
        if self.fanout == 1:
            return top
        try:
            return access.make_dir(
                os.fsdecode(hexname[2:4]), dir_fd=top, shown=self.shard_dir_path(hexname)
            )
        finally:
            os.close(top)

    def _drop_fds(self, *, objects_only: bool = False) -> None:
        with self._fds_lock:
            fds = [
                self._fds.pop(name)
                for name in list(self._fds)
                if not objects_only or name.startswith("objects-")
            ]
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        """Close the store's descriptors (a later use opens them again, not judged)."""
        self._drop_fds()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def held(self) -> None:
        """Raise STORE_UNSAFE when the store's path no longer leads to the directory held (it was
        moved or replaced since it was judged): nothing more is written then, not even there."""
        try:
            st = os.stat(self.root)
        except OSError:
            st = None
        fst = os.fstat(self.fd)
        if st is None or (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
            raise VeloError(
                f"the store at {self.root} was moved or replaced while this command used it",
                reason=Reason.STORE_UNSAFE,
                hint="whoever can write the directory that holds it did that: keep a store in "
                "a directory only you (and root) can write, and check what is there now",
                path=self.root,
            )

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        root: str | os.PathLike[str],
        *,
        shared: bool = False,
        judge: Callable[[Store], None] | None = None,
    ) -> Store:
        """Create the store (idempotent). A new store (in an empty directory too) is its owner's
        alone (0700: objects are named by content; a 0600 file's bytes must not become readable
        through them); `shared` makes it readable by every local user (0755), never writable.
        `judge` is called on an existing store before anything is changed (its schema)."""
        store = cls(root)
        # /proc/velo: mkdir fails with ENOENT as if /proc were missing; in a cgroup tree every
        # directory made would be a cgroup
        access.refuse_kernel_fs(
            os.path.abspath(store.root),
            what="the store",
            hint="make the store in an ordinary directory (--store DIR or VELO_STORE)",
            reason=Reason.BAD_PATH,
        )
        try:
            access.check_place(store.root)  # nothing made where root must not use a store
            makedirs(store.root.parent)
            try:
                os.mkdir(store.root, 0o700)
                existed = False
            except FileExistsError:
                existed = True
                st = os.lstat(store.root)
                if stat.S_ISLNK(st.st_mode) and not os.path.exists(store.root):
                    raise VeloError(
                        f"{store.root} is a symbolic link to {os.readlink(store.root)}, "
                        "which does not exist",
                        reason=Reason.NOT_FOUND,
                        hint="make the directory it names first, or give another --store",
                        path=store.root,
                    ) from None
                if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                    raise VeloError(  # a user's file, not something planted in a store
                        f"{store.root} exists and is not a directory",
                        reason=Reason.EXISTS,
                        hint="make the store in a new or empty directory",
                        path=store.root,
                    ) from None
            store.check_safe()  # before any chmod: the very directory judged, by its descriptor
            fd = store.fd
            if existed:
                existed = access.store_there(store.root, fd)  # empty: a new store
            if existed:
                access.refuse_newer_format(store.root)
                if judge is not None:
                    judge(store)
                if shared:
                    os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o055)
            else:  # nothing written before: another user's empty directory fails here (EPERM)
                os.fchmod(fd, 0o755 if shared else 0o700)
                access.refuse_filled(store.root, fd)
            for d in (store.objects, store.tmp, store.sessions, store.locks):
                access.mkdir_nofollow(d.name, dir_fd=fd, shown=d)
            access.private_trees(store.trees, dir_fd=fd)
            storelock.make_gate(fd)
            access.create_once("CACHEDIR.TAG", _CACHEDIR_TAG, dir_fd=fd)
            access.create_once(".gitignore", b"*\n", dir_fd=fd)
            reserve.ensure(store)  # what lets a full store free space (reserve.py)
        except PermissionError as exc:
            whose = pathtrust.not_yours(store.root)
            raise VeloError(
                f"cannot create the store at {store.root}: "
                + (f"{whose}" if whose else exc.strerror or "permission denied"),
                reason=Reason.STORE_PERMISSION,
                hint="a store is made in a new or empty directory of your own: choose one "
                "with --store or VELO_STORE"
                if whose
                else "choose a writable location with --store or VELO_STORE",
                path=store.root,
            ) from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise VeloError(
                    f"no space left creating the store at {store.root}", reason=Reason.STORE_FULL
                ) from exc
            if exc.errno == errno.EROFS:
                raise store.write_refusal() or store.read_only_error(str(exc)) from exc
            if isinstance(exc, SysError):
                raise
            # ENAMETOOLONG, ENOTDIR, EIO...: said of the store, not as a bare os-error
            raise SysError(
                exc.errno or errno.EIO,
                "create the store",
                store.root,
                hint="choose another location with --store or VELO_STORE",
            ) from exc
        return store

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Store:
        store = cls(root)
        try:
            os.stat(store.root)
        except PermissionError:  # a directory on the way this user cannot enter
            raise VeloError(
                f"cannot reach the store at {store.root}: "
                + (pathtrust.not_yours(store.root) or "permission denied"),
                reason=Reason.STORE_PERMISSION,
                hint="use a store of your own (--store or VELO_STORE)",
                path=store.root,
            ) from None
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise SysError(
                    exc.errno, "open the store", store.root, hint="check --store or VELO_STORE"
                ) from None
            # missing or not a directory: said below
        if _is_dir(store.root) and not os.access(store.root, os.R_OK | os.X_OK):
            owner = store.root.stat().st_uid
            raise VeloError(
                f"the store at {store.root} is not readable by this user",
                reason=Reason.STORE_PERMISSION,
                hint=f"it is private to its owner (uid {owner}): use a store of your own, or "
                "ask its owner for a shared one ('veloverlay init --shared')",
            )
        access.refuse_newer_format(store.root)
        if not _is_dir(store.objects):
            access.refuse_kernel_fs(  # not 'run init', which refuses it
                os.path.abspath(store.root),
                what="the store",
                hint="a store lives in an ordinary directory (--store DIR or VELO_STORE)",
                reason=Reason.BAD_PATH,
            )
            raise VeloError(
                f"no veloverlay store at {store.root}",
                reason=Reason.STORE_MISSING,
                hint="run 'veloverlay init' (or pass --store / set VELO_STORE)",
            )
        store.check_safe()
        return store

    def check_safe(self) -> None:
        """Refuse a store with planted symlinks, or (as root) one another user can write or
        move (`access.check_safe`); then hold it by the descriptor of the directory judged."""
        fd = access.check_safe(self.root)
        self.close()
        self._fd = fd
        self.choose_layout()

    def write_refusal(self, path: str | os.PathLike[str] | None = None) -> VeloError | None:
        """Why this process cannot change `path` (default: the store), or None when it can."""
        return access.write_refusal(self.root, path)

    def read_only_error(self, why: str, *, inside: bool = False) -> VeloError:
        return access.read_only_error(self.root, why, inside=inside)

    def verity(self, *, recheck: bool = False) -> tuple[bool, str]:
        """(usable, reason): does fs-verity work for objects of this store? Probed on a scratch
        file in tmp/ once per boot (cached in fsverity-v1.json), then once per Store;
        `recheck`: probed again, its cache rewritten (a seal found it wrong)."""
        if self._verity is None or recheck:
            self.tmp_fd()
            self._verity = verity.cached_support(
                self.held_path("fsverity-v1.json"), self.held_path("tmp"), fresh=recheck
            )
        return self._verity

    def writable(self) -> None:
        """Raise a clear error when this user cannot write the store."""
        shim = access.shim_refusal(self.root)
        if shim is not None:
            raise shim
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

    def open_object(self, digest: bytes) -> int:
        """Open an object read-only; a missing object is OBJECT_MISSING, naming the digest."""
        try:
            return open_regular(self.object_path_b(digest), digest)
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

    def shard_dir_path(self, hexname: bytes) -> bytes:
        """The path of the fan-out directory of `hexname` (for messages: writes go by `shard`)."""
        if self.fanout == 1:
            return b"%s/%s" % (self._objects_b, hexname[:2])
        return b"%s/%s/%s" % (self._objects_b, hexname[:2], hexname[2:4])

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
        self._drop_fds(objects_only=True)
        return removed

    # -- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(
        self,
        *,
        exclusive: bool = False,
        wait: bool = True,
        waiting: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> Iterator[None]:
        """The store lock: shared for writers, exclusive for gc; `waiting` is told whom it
        waits for, when it does; `timeout` bounds the wait (`locked` when it ends). A writer
        that holds it makes the space reserve whole again if it was given up (reserve.py;
        not while gc, which may be using the room, holds the lock)."""
        with storelock.store_lock(
            self.root, self.fd, exclusive=exclusive, wait=wait, waiting=waiting, timeout=timeout
        ):
            if not exclusive:
                reserve.ensure(self)
            yield

    def read_lock(self) -> contextlib.AbstractContextManager[None]:
        """The store lock, shared, for a verb reading objects: gc waits for it to finish."""
        return storelock.reader_lock(self.root, self.fd)

    def stage(self) -> Stage:
        return Stage(self)

    def reclaim_tmp(self, *, no_writer: bool = False) -> int:
        """Remove stages left by dead writers (their flock is free); `no_writer`: the caller
        holds the store lock exclusively, and a stage without its lock file goes too. Returns
        the entries removed."""
        return access.reclaim_stages(self.tmp_fd(), no_writer=no_writer)


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


def check_object_file(path: str | os.PathLike[str]) -> os.stat_result:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise VeloError(f"{path} is not a regular file", reason=Reason.OBJECT_CORRUPT, path=path)
    return st
