"""The manifest database's files, checked before LMDB maps them, and the store record.

`check_data_file` reads an existing `data.mdb`'s meta pages with plain reads (LMDB would map the
file, and a read through the map of a page the file no longer has is a SIGBUS that kills the
process without an error). `manifests.record`, outside LMDB, keeps the ref count at the last
change of it, so that gc and fsck can tell a database that lost its refs from one that has none.
This module does not import lmdb (store/manifest.py is the only one that does).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import stat
import struct
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from veloverlay import _libc
from veloverlay.errors import Reason, VeloError
from veloverlay.files import NotRegular, exact_modes, open_regular
from veloverlay.store.cas import Store

__all__ = [
    "CORRUPT_HINT",
    "corrupt",
    "fit_map_size",
    "known_failure",
    "map_failed",
    "check_data_file",
    "check_fresh",
    "stored_schema",
    "check_schema",
    "json_record",
    "never_used",
    "mkdir_nofollow",
    "record_lock",
    "record_read_lock",
    "put_record",
    "write_record",
    "read_record",
    "record_damaged",
]

CORRUPT_HINT = (
    "nothing was changed; restore manifests.lmdb from a backup (the objects are intact: "
    "'veloverlay fsck' re-hashes them), and do not run gc on this store until then"
)
_META_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II")  # mm_magic, mm_version after the 16-byte page header
_META_PSIZE = 40  # mm_dbs[FREE_DBI].md_pad holds the page size
_META_TAIL = struct.Struct("<QQ")  # mm_last_pg, mm_txnid
_META_TAIL_AT = 136
_SHORT_SLACK = 16  # pages a read-only open lets a data file be short by (see check_data_file)
_GROW_MAX = 64 << 20  # the most a writer extends a short data file by, beyond its own size
_RECORD = "manifests.record"
# What the record's writers lock: a file of the owner's alone (0600). The record itself is
# readable by every user of a shared store (fsck), and any lock a user can take on a file it
# may only read (flock in any mode, or an fcntl read lock) stops the writers that need it
# exclusively: a reader holding `flock -x manifests.record` made the owner's every ingest of
# a new ref, and every commit that made or removed a ref, wait for as long as it liked.
_RECORD_LOCK = "manifests.record.lock"
T = TypeVar("T")
_RECORD_SIZE = 64


def corrupt(store: Store, what: str) -> VeloError:
    return VeloError(
        f"the manifest database is damaged: {what}",
        reason=Reason.MANIFEST_CORRUPT,
        hint=CORRUPT_HINT,
        path=store.db_path / "data.mdb",
    )


def not_regular(store: Store, name: str) -> VeloError:
    """`name`, a file of the store beside the database (the record or its lock), is a
    directory, a FIFO or a device: the database itself is not what is wrong."""
    path = store.root / name
    return VeloError(
        f"{path} is not a regular file (the manifest database itself is not damaged)",
        reason=Reason.STORE_UNSAFE,
        hint=f"someone who can write the store put it there; remove {path} (it is made again "
        "by the next commit that changes the ref count) and check who can",
        path=path,
    )


def check_data_file(store: Store, *, writable: bool = True) -> bool:
    """Check an existing `data.mdb` against its own header before LMDB maps it. Returns False
    when there is no data file yet (a new store).

    A file shorter than the pages its newest meta page says are in use makes a read through the
    map a SIGBUS, which kills the process without an error. LMDB itself leaves the file short by
    pages it allocated but freed again unwritten (measured: one page after a kill -9), so a short
    file is not damage by itself: a writer extends it with zeros (fallocate, which never shrinks
    it or touches bytes a concurrent writer put there), and a page that was cut off then reads as
    a zero page, which LMDB reports as corrupted (MANIFEST_CORRUPT here) instead of faulting. A
    reader that may not extend it refuses a file short by more than LMDB leaves."""
    path = store.db_path / "data.mdb"
    db = store.db_path.name
    for rel in (db, f"{db}/data.mdb", f"{db}/lock.mdb"):  # relative to the store held
        name = store.root / rel
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if stat.S_ISLNK(os.stat(rel, dir_fd=store.fd, follow_symlinks=False).st_mode):
                raise VeloError(
                    f"{name} is a symbolic link: nothing in a store may be one",
                    reason=Reason.STORE_UNSAFE,
                    hint="someone who can write the store planted it; remove it and check who can",
                    path=name,
                )
    try:
        fd = open_regular(f"{db}/data.mdb", os.O_RDWR if writable else os.O_RDONLY, dir_fd=store.fd)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (NotRegular, IsADirectoryError):  # (a FIFO: refused, never waited on)
        raise corrupt(store, f"{db}/data.mdb is not a regular file") from None
    except PermissionError as exc:
        raise VeloError(
            f"cannot open the manifest database: {exc.strerror}",
            reason=Reason.STORE_PERMISSION,
            path=path,
        ) from exc
    try:
        head = os.pread(fd, 4096, 0)
        metas: list[tuple[int, int]] = []  # (txnid, last page) of each valid meta page
        psize = 0
        if len(head) >= _META_TAIL_AT + _META_TAIL.size:
            psize = struct.unpack_from("<I", head, _META_PSIZE)[0]
        if 512 <= psize <= 65536:
            for page in (head if psize <= len(head) else b"", os.pread(fd, 4096, psize)):
                if len(page) < _META_TAIL_AT + _META_TAIL.size:
                    continue
                magic, version = _META.unpack_from(page, 16)
                if magic == _META_MAGIC and version == 1:
                    last_pg, txnid = _META_TAIL.unpack_from(page, _META_TAIL_AT)
                    metas.append((txnid, last_pg))
        size = os.fstat(fd).st_size
        if not metas:
            raise corrupt(store, f"data.mdb ({size} bytes) has no valid header")
        need = (max(metas)[1] + 1) * psize
        if need - size > max(size, _GROW_MAX):
            # LMDB leaves a file short by a few pages: a header that claims far more is damaged
            # (extending the file that far could take the disk, or overflow).
            raise corrupt(store, f"data.mdb is {size} bytes; its header claims {need}")
        if size < need:
            if writable:
                try:
                    os.posix_fallocate(fd, size, need - size)
                except OSError as exc:
                    raise corrupt(store, f"data.mdb is {size} bytes of {need}: {exc}") from exc
            elif need - size > _SHORT_SLACK * psize:
                raise corrupt(
                    store, f"data.mdb is {size} bytes, shorter than the {need} its header uses"
                )
    finally:
        os.close(fd)
    return True


def json_record(store: Store, value: Any, what: str, parse: Callable[[dict[str, Any]], T]) -> T:
    """A stored JSON record, parsed (and checked) by `parse`; MANIFEST_CORRUPT naming `what`
    when it is not a whole record (ValueError, KeyError or TypeError from `parse`)."""
    try:
        d = json.loads(bytes(value))
        if not isinstance(d, dict):
            raise ValueError("not an object")
        return parse(d)
    except (ValueError, KeyError, TypeError) as exc:
        why = f"no {exc.args[0]}" if isinstance(exc, KeyError) and exc.args else str(exc)
        raise corrupt(store, f"the record of {what} is not readable ({why})") from None


def check_fresh(store: Store) -> None:
    """There is no data file: fine for a new store, damage for one that holds objects or whose
    record says it had refs (never start an empty database over a store's content)."""
    what = _content(store)
    if what:
        raise corrupt(store, f"manifests.lmdb/data.mdb is missing, but the store holds {what}")


def _content(store: Store) -> str:
    """What a new, empty database would be started over: "objects", "N refs by its record", or
    "" (nothing: a new store)."""
    had = read_record(store)
    try:
        with os.scandir(store.objects) as it:
            has_objects = next(it, None) is not None
    except FileNotFoundError:
        has_objects = False
    if has_objects:
        return "objects"
    return f"{had} refs by its record" if (had or 0) > 0 else ""


def mkdir_nofollow(store: Store) -> None:
    """Make the database directory (relative to the store held; a link is refused)."""
    try:
        with exact_modes():  # readable by the users of a shared store, whatever the umask
            os.mkdir(store.db_path.name, 0o755, dir_fd=store.fd)
    except FileExistsError:
        st = os.stat(store.db_path.name, dir_fd=store.fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            path = store.db_path
            raise VeloError(
                f"{path} is not a directory", reason=Reason.MANIFEST_CORRUPT, path=path
            ) from None


def stored_schema(env: Any) -> bytes | None:
    """The schema key of the LMDB environment `env` (written with the database), None when it
    has none. Read in a read transaction that creates nothing: a store another version made is
    judged before anything is written into it."""
    with env.begin() as txn:
        names = {bytes(k) for k, _v in txn.cursor()}
        if b"meta" not in names:
            return None
        v = txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False))
        return None if v is None else bytes(v)


def check_schema(stored: bytes | None, supported: bytes) -> None:
    """Refuse a database whose schema is not `supported` (a newer veloverlay made it)."""
    if stored is not None and stored != supported:
        raise VeloError(
            f"manifest schema {stored.decode(errors='replace')} is not supported (this is "
            f"{supported.decode()}); nothing was changed",
            reason=Reason.MANIFEST_SCHEMA,
            hint="use the veloverlay version that created this store",
        )


def never_used(store: Store, env: Any) -> bool:
    """Is `env` (without a schema key) what a creation killed between LMDB's making the file and
    the schema commit leaves (the first verb on a new store, `init`)? Then it is made again, not
    taken for a damaged database: nothing but empty sub-databases, in a store that holds no
    objects and whose record counts no refs."""
    if _content(store):
        return False
    with env.begin() as txn:
        for name, _v in txn.cursor():
            if txn.stat(env.open_db(bytes(name), txn=txn, create=False))["entries"]:
                return False
    return True


def _open_record(store: Store, flags: int) -> int:
    """The store record, opened without blocking: a FIFO in its place (damage) would block the
    open for ever (fsck and gc hung on one); anything but a regular file is STORE_UNSAFE, by
    name (the database is not what is damaged)."""
    try:
        return open_regular(_RECORD, flags, 0o644, dir_fd=store.fd)
    except NotRegular:
        raise not_regular(store, _RECORD) from None


@contextlib.contextmanager
def record_lock(store: Store) -> Iterator[int]:
    """The store record, open for writing, while this process alone may change it (see
    `_RECORD_LOCK`)."""
    lock = _open_record_lock(store, os.O_RDWR)
    try:
        _libc.ofd_lock(lock, write=True, wait=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with exact_modes():
            fd = _open_record(store, flags)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        os.close(lock)


@contextlib.contextmanager
def record_read_lock(store: Store) -> Iterator[None]:
    """The record's lock, shared: no writer is between its ref-changing commit and the record
    that follows it while this is held. Only its owner (and root) can take it: another user of
    a shared store reads the record unlocked (`_RECORD_LOCK`)."""
    try:
        lock = _open_record_lock(store, os.O_RDONLY)
    except OSError:  # not ours (EACCES), or a store on a read-only filesystem: no writer
        yield
        return
    try:
        _libc.ofd_lock(lock, write=False, wait=True)
        yield
    finally:
        os.close(lock)


def _open_record_lock(store: Store, how: int) -> int:
    """The record's lock file, opened without blocking (a FIFO in its place: STORE_UNSAFE, as
    for the record itself)."""
    try:
        with exact_modes():
            return open_regular(_RECORD_LOCK, how | os.O_CREAT, 0o600, dir_fd=store.fd)
    except NotRegular:
        raise not_regular(store, _RECORD_LOCK) from None


def put_record(fd: int, refs: int) -> None:
    data = json.dumps({"refs": refs}).encode().ljust(_RECORD_SIZE)
    os.pwrite(fd, data, 0)


def write_record(store: Store, refs: int) -> None:
    """The store record (`<store>/manifests.record`): how many refs the manifest database held
    at its last change of that number. It lives outside LMDB so that `gc` and `fsck` can tell a
    database that lost its refs (truncated, replaced by an older copy) from one that has none."""
    with record_lock(store) as fd:
        put_record(fd, refs)


def read_record(store: Store) -> int | None:
    """The ref count in the store record; None when there is none (older stores) or it is
    unreadable (`record_damaged` tells which)."""
    return _record(store)[1]


def record_damaged(store: Store) -> bool:
    """Does the store record hold bytes that are no ref count (a flipped bit, another file
    copied over it)? An empty one is not damaged: what a crash between its creation and its
    first write leaves, as a store made before the record has none."""
    data, refs = _record(store)
    return refs is None and data.strip(b"\0 \n") != b""


def _record(store: Store) -> tuple[bytes, int | None]:
    try:
        fd = _open_record(store, os.O_RDONLY)
    except OSError:
        return b"", None
    try:
        data = os.pread(fd, _RECORD_SIZE, 0)
    finally:
        os.close(fd)
    try:
        refs = json.loads(data)["refs"]
    except (ValueError, KeyError, TypeError):
        return data, None
    return data, refs if isinstance(refs, int) and refs >= 0 else None


_MiB = 1 << 20


def fit_map_size(store: Store, default: int) -> int:
    """`default`, or less under an address-space limit (`ulimit -v`, RLIMIT_AS, as batch
    schedulers set it): LMDB maps the whole map size when it opens, so the 64 GiB default
    failed every verb with ENOMEM, reported as a damaged database. Under a limit: a quarter of
    it (the interpreter and the workers need the rest), never less than the data file plus
    64 MiB to grow in (a commit past that is map-full, whose hint names VELO_MAP_SIZE)."""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY or soft >= 4 * default:
        return default
    try:
        used = os.stat(store.db_path / "data.mdb").st_size
    except OSError:
        used = 0
    size = max(soft // 4, used + 64 * _MiB)
    return min(default, (size + _MiB - 1) // _MiB * _MiB)


def map_failed(store: Store, text: str) -> VeloError:
    """ENOMEM from LMDB's open: the map does not fit the address space, the database is fine."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit // 1024} KiB"
    return VeloError(
        f"cannot map the manifest database ({text}); address-space limit: {shown}",
        reason=Reason.SYSCALL,
        path=store.db_path,
        hint="raise the limit (ulimit -v), or set VELO_MAP_SIZE to fewer bytes (at least the "
        "size of manifests.lmdb/data.mdb)",
    )


def known_failure(store: Store, text: str) -> VeloError | None:
    """What an LMDB failure that says nothing about the database's health means, or None."""
    if "Cannot allocate memory" in text:
        return map_failed(store, text)
    if "mdb_txn_begin" in text and "temporarily unavailable" in text:
        # EAGAIN of the lock LMDB sets on byte <pid> of lock.mdb to mark a live reader: a
        # process of another pid namespace (a container, another session's command) with the
        # same pid number holds it, as two processes of this store can never do otherwise
        return VeloError(
            f"cannot read the manifest database: another process of this store has this "
            f"process's pid ({os.getpid()}) in another pid namespace, and LMDB tells its "
            "readers apart by pid; the database is fine",
            reason=Reason.LOCKED,
            path=store.db_path / "lock.mdb",
            hint="run it once that process has ended, or from the pid namespace where the "
            "store's other veloverlay processes run: in a session or a container, processes "
            "have small pids that another one's processes share",
        )
    return None
