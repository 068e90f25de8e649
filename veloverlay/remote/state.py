"""What a store remembers about remotes, under `<store>/remote-v1/`.

The BLAKE3 -> sha256 map of objects that travelled alone, so a second push needs no re-hash.
The pack indexes of versions this store pushed or pulled (`blobs/`), so the next push or pull
of that tag does not fetch them again (the have-list of an incremental push is then one
manifest GET, not one GET per pack).

`<store>/remote-v1/sha256-v1`: fixed 64-byte records (BLAKE3, sha256), appended under an
exclusive OFD lock (a write lock: a user who may only read the store cannot hold it, as any
could hold a flock) by whoever computed a pair (push while verifying an object, pull while
receiving one). A torn last record (a crash mid-append) is cut off by the next writer. The map
is as trusted as the store: a wrong pair can only make a push name a blob the registry then
refuses or a pull rejects.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from veloverlay import _libc
from veloverlay.errors import Reason, VeloError
from veloverlay.files import NotRegular, makedirs, open_regular, read_regular, write_json_atomic
from veloverlay.store.cas import Store
from veloverlay.store.stage import store_error
from veloverlay.store.versions import Ref

__all__ = ["BlobCache", "ShaMap", "Versions"]

_REC = 64


class ShaMap:
    def __init__(self, store: Store) -> None:
        self.dir = Path(store.root) / "remote-v1"
        self.path = self.dir / "sha256-v1"
        self.map: dict[bytes, bytes] = {}
        try:
            data = read_regular(self.path)
        except (FileNotFoundError, PermissionError, NotRegular):  # (a FIFO: never read)
            data = b""  # (unreadable: another user's shared store, its owner's umask 077)
        for i in range(0, len(data) - len(data) % _REC, _REC):
            self.map[data[i : i + 32]] = data[i + 32 : i + _REC]

    def get(self, blake3: bytes) -> str | None:
        sha = self.map.get(blake3)
        return "sha256:" + sha.hex() if sha is not None else None

    def add(self, pairs: dict[bytes, str]) -> None:
        new = {b: bytes.fromhex(s.split(":", 1)[1]) for b, s in pairs.items()}
        new = {b: s for b, s in new.items() if self.map.get(b) != s}
        if not new:
            return
        self.map.update(new)
        try:
            makedirs(self.dir)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            # (see below) and a store this user may only read: a push from another user's
            # shared store, or a read-only one, goes on without the map, which is the owner's
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
                return
            raise
        try:
            _libc.ofd_lock(fd, write=True, wait=True)
            size = os.fstat(fd).st_size
            if size % _REC:
                os.ftruncate(fd, size - size % _REC)
            os.lseek(fd, 0, os.SEEK_END)
            buf = memoryview(b"".join(b + s for b, s in new.items()))
            while buf:
                buf = buf[os.write(fd, buf) :]
        except OSError as exc:
            # A full store: the map only spares a later push a re-hash, and what the pair
            # describes is already stored, so the pull or push goes on without it (a torn
            # record is cut off by the next writer).
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        finally:
            os.close(fd)


class Versions:
    """The last version this store pushed or pulled per (registry, ref): `remote-v1/versions-v1
    .json`, {registry: {ref: [repository, manifest digest, lineage, head]}} (registry:
    `HOST[:PORT]`, or `http://HOST[:PORT]` without TLS; lineage: the ref's `Ref.lineage`, null
    for a ref made by an earlier version; head: the commit the pull made or the push sent;
    older notes lack one or both). A push to another repository of the same registry uses it
    as a have-list and mounts its blobs instead of uploading them; a pull moves an existing ref
    only when its current head came from there (`source`): a note whose head is not the ref's
    any more (an ingest, import --force, a session's commit or a pull from elsewhere moved
    it) vouches for nothing, whatever wrote the ref and whether or not it knew of notes.

    The file is not in the ref's LMDB transaction, so a pull writes the note first, with the
    lineage the ref has or will get and no head yet, then commits, then notes the head: a
    pull that never commits (killed, a full disk) leaves a note naming a lineage no ref has (a
    ref of that name made later gets another), or one the ref already had whose --force the
    user already gave."""

    def __init__(self, store: Store) -> None:
        self.path = Path(store.root) / "remote-v1" / "versions-v1.json"

    def load(self) -> dict[str, dict[str, list[str]]]:
        try:
            data = json.loads(read_regular(self.path))
        except (FileNotFoundError, PermissionError, ValueError):
            return {}  # (unreadable: another user's shared store, which only its owner writes)
        return data if isinstance(data, dict) else {}

    def get(self, host: str, ref: str) -> tuple[str, str] | None:
        note = self._note(host, ref)
        return (note[0], note[1]) if note is not None else None

    def source(self, host: str, ref: Ref) -> str | None:
        """The repository of `host` that `ref` was last pulled from or pushed to, if the note
        is this ref's: written for its lineage (a note without one: from before lineages)."""
        note = self._note(host, ref.name)
        if note is None or (len(note) >= 3 and note[2] != ref.lineage):
            return None  # none, a pull that never committed, or another ref of that name
        if len(note) == 4 and note[3] is not None and note[3] != ref.head:
            return None  # the ref moved since, by something else: its head is not from there
        return str(note[0])

    def _note(self, host: str, ref: str) -> list[Any] | None:
        refs = self.load().get(host)
        hit = refs.get(ref) if isinstance(refs, dict) else None
        if (
            isinstance(hit, list)
            and len(hit) in (2, 3, 4)
            and all(isinstance(x, str) for x in hit[:2])
            and all(isinstance(x, (str, type(None))) for x in hit[2:])
        ):
            return hit
        return None

    def set(
        self,
        host: str,
        ref: str,
        repo: str,
        digest: str,
        lineage: str | None,
        head: str | None = None,
        *,
        still: Callable[[], bool] | None = None,
    ) -> None:
        """Note `ref` as pulled from or pushed to `host`/`repo` (`head`: the commit that came
        from or went there; None: not yet known, the lineage alone vouches). `still`, asked
        under the notes' lock: is the ref still the one noted? Not (a `refs --delete` between
        the caller's reading it and this): no note is written (see `forgetting`)."""

        def change(data: dict[str, Any]) -> bool:
            if still is not None and not still():
                return False
            refs = data.get(host)
            if not isinstance(refs, dict):  # damaged notes: start this registry's again
                refs = data[host] = {}
            refs[ref] = [repo, digest, lineage, head]
            return True

        self._update(change)

    def forget(self, ref: str) -> None:
        """Drop the notes of `ref` (deleted: a ref of that name made later is another one,
        which a pull must not take for the one it pulled before)."""
        if self.path.exists():
            self._update(_without(ref))

    @contextlib.contextmanager
    def forgetting(self, ref: str) -> Iterator[None]:
        """Forget `ref`'s notes and keep their lock while the block deletes the ref: a pull or
        push that read the ref before and notes it now waits, then finds it gone (`set`'s
        `still`) and notes nothing. (No notes yet: nothing to forget, no lock: on a full disk
        remote-v1/ could not even be made.)"""
        if not self.path.exists():
            yield
            return
        with self._locked():
            self._apply(_without(ref))
            yield

    def _update(self, change: Callable[[dict[str, Any]], bool]) -> None:
        """Change the notes under their lock; a store this user may not write, or a full disk,
        is STORE_PERMISSION or STORE_FULL (it was a raw OSError where remote-v1/ was missing)."""
        with self._locked():
            self._apply(change)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.parent / "versions.lock"
        try:
            makedirs(self.path.parent)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise store_error(exc, "open", os.fsencode(lock)) from exc
        try:
            _libc.ofd_lock(fd, write=True, wait=True)
            yield
        finally:
            os.close(fd)

    def _apply(self, change: Callable[[dict[str, Any]], bool]) -> None:
        data: dict[str, Any] = dict(self.load())
        if change(data):
            try:
                write_json_atomic(self.path, data)
            except VeloError as exc:
                if exc.reason is not Reason.STORE_FULL or not self._shrink(data):
                    raise

    def _shrink(self, data: dict[str, Any]) -> bool:
        """Rewrite the notes in place when they got no longer (a deleted ref's forgotten): on a
        full disk, where no new file can be made, deleting a pulled ref must still forget it.
        Not atomic: a crash midway leaves notes that do not parse, read as none (every pull of
        an existing ref then needs --force: the safe side). False: they would grow."""
        new = json.dumps(data, sort_keys=True).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if len(new) > os.fstat(fd).st_size:
                return False
            os.pwrite(fd, new, 0)
            os.ftruncate(fd, len(new))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True


def _without(ref: str) -> Callable[[dict[str, Any]], bool]:
    """The change to the notes that drops every note of `ref`."""

    def change(data: dict[str, Any]) -> bool:
        hits = [refs for refs in data.values() if isinstance(refs, dict) and ref in refs]
        for refs in hits:
            del refs[ref]
        return bool(hits)

    return change


class BlobCache:
    """Small registry blobs (pack indexes) by sha256: `remote-v1/blobs/<hex>`, one file each.

    Registry blobs are immutable under their digest, so a copy stays right as long as its bytes
    are intact: every read is checked against the sha256 and size the manifest names (a few
    milliseconds for an index of 20,000 entries), and a copy that fails is deleted and the caller
    fetches the blob again. Writes are atomic (rename) and not synced: a lost copy only costs a
    fetch. The directory can be deleted at any time."""

    MAX = 64 << 20  # bigger blobs are not kept

    def __init__(self, store: Store) -> None:
        self.dir = Path(store.root) / "remote-v1" / "blobs"

    def _path(self, digest: str) -> Path | None:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            return None
        return self.dir / hexd

    def get(self, digest: str, size: int) -> bytes | None:
        path = self._path(digest)
        if path is None or size > self.MAX:
            return None
        try:
            fd = open_regular(path)
        except (OSError, NotRegular):  # (a FIFO: refused, never waited on)
            return None
        try:
            # `size` is what the manifest claims: read(size) would make a buffer of that size
            # first (up to MAX, per index) for a copy of a few bytes. A copy of another size
            # is not this blob (nor deleted: the manifest may be what is wrong).
            if os.fstat(fd).st_size != size:
                return None
            data = os.read(fd, size + 1)
        finally:
            os.close(fd)
        if len(data) == size and "sha256:" + hashlib.sha256(data).hexdigest() == digest:
            return data
        with contextlib.suppress(OSError):
            path.unlink()  # damaged or foreign: fetched again
        return None

    def put(self, digest: str, data: bytes) -> None:
        """Keep `data` (the caller has checked it hashes to `digest`); failures are ignored."""
        path = self._path(digest)
        if path is None or len(data) > self.MAX:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            makedirs(self.dir)
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def fetch(self, digest: str, size: int, get: Callable[[], bytes]) -> bytes:
        """The kept copy, or `get()` (which checks what it fetched against `digest`), kept."""
        data = self.get(digest, size)
        if data is None:
            data = get()
            self.put(digest, data)
        return data
