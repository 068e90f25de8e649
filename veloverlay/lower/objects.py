"""The objects a lower layer references: short names in `ids-v1/`, `chattr +i`, proxies."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable

from veloverlay import files, fsflags, linking
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import exact_modes, makedirs
from veloverlay.lower.homes import ID_HEX, Home, ids_dir, short_id, short_id_path, trees_dir
from veloverlay.store.access import mkdir_nofollow
from veloverlay.store.cas import Store, object_corrupt, object_missing
from veloverlay.store.digest import hash_fd, hash_own_file
from veloverlay.store.manifest import Manifests, Txn

__all__ = ["ids_dir", "short_id_path", "Objects", "protect_all", "name_and_protect"]


# --- object names and protection ---------------------------------------------------------------
class Objects:
    """Per-build bookkeeping for the objects a layer references: short names, +i, proxies."""

    def __init__(
        self,
        store: Store,
        m: Manifests,
        txn: Txn,
        *,
        protect: bool,
        form: str,
        volatile: bool = False,
    ) -> None:
        self.store = store
        self.volatile = volatile
        self.m = m
        self.txn = txn
        self.protect = protect
        self.form = form
        self.ids_b = os.fsencode(ids_dir(store))
        self.proxies_b = os.fsencode(trees_dir(store, "proxies"))
        self.seen_ids: dict[bytes, str] = {}
        self.made_dirs: set[bytes] = set()
        self.protected: set[bytes] = set()
        self.protect_failed: list[str] = []
        self.proxies: dict[tuple[bytes, int], tuple[bytes, int]] = {}
        if form == "links":  # parents made here, before a build sets umask 0
            makedirs(self.proxies_b)

    # -- +i
    def _immutable(self, digest: bytes) -> None:
        if not self.protect or digest in self.protected:
            return
        self.protected.add(digest)
        try:
            fsflags.set_immutable(os.fsdecode(self.store.object_path_b(digest)), True)
        except OSError as exc:
            if len(self.protect_failed) < 5:
                self.protect_failed.append(f"{digest.hex()[:16]}: {exc}")

    # -- redirects (data-only layer)
    def redirect(self, digest: bytes) -> bytes:
        """The `user.overlay.redirect` value naming `digest` in the data-only layer (the object
        is named there first and made +i when protecting)."""
        if self.volatile:  # the layer is the objects directory; tmpfs does not mind 68 bytes
            self._immutable(digest)
            return self.store.object_relpath_b(digest)
        short = self.short_id(digest)
        return b"/%s/%s" % (short[:2].encode(), short[2:].encode())

    def short_id(self, digest: bytes) -> str:
        """Ensure `ids-v1/<ab>/<rest>` is a hard link of the object; return the id."""
        known = self.seen_ids.get(digest)
        if known is not None:
            return known
        short = self._link_id(digest, short_id(self.m, self.txn, digest))
        self.seen_ids[digest] = short
        return short

    def _link_id(self, digest: bytes, short: str) -> str:
        src = self.store.object_path_b(digest)
        dname = self.ids_b + b"/" + short[:2].encode()
        if dname not in self.made_dirs:
            with exact_modes():  # 0755: a shared store's users mount ids-v1 too
                makedirs(dname)
            self.made_dirs.add(dname)
        dst = dname + b"/" + short[2:].encode()
        try:
            _link_object(src, dst)
        except FileExistsError:
            a, b = os.lstat(src), os.lstat(dst)
            if (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev):
                self._immutable(digest)
                return short
            return self._id_clash(digest, short, dst)
        except FileNotFoundError:
            raise object_missing(digest) from None
        self._immutable(digest)
        return short

    def _id_clash(self, digest: bytes, short: str, dst: bytes) -> str:
        """`dst` names another inode: a stale name of this object (same bytes, e.g. after gc)
        is replaced; another object sharing the 80-bit prefix gets a longer id, kept in LMDB."""
        try:
            fd = files.open_regular(dst)
        except (OSError, files.NotRegular) as exc:  # a FIFO there: never waited on
            why = f"its short name {os.fsdecode(dst)} is damaged: {exc}"
            raise object_corrupt(digest, why) from None
        try:
            same = hash_fd(fd)[0] == digest
        finally:
            os.close(fd)
        if same:
            tmp = dst + b".%d.tmp" % os.getpid()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            obj = self.store.object_path_b(digest)
            _link_object(obj, tmp)
            try:
                os.rename(tmp, dst)
            except PermissionError:  # either inode +i: the stale name's, or the object's own
                _clear_immutable(dst)
                _clear_immutable(obj)
                try:
                    os.rename(tmp, dst)
                finally:
                    fsflags.set_immutable(os.fsdecode(obj), True)
            self._immutable(digest)
            return short
        full = digest.hex()
        for n in range(ID_HEX + 1, len(full) + 1):
            candidate = full[:n]
            if candidate == short:
                continue
            path = short_id_path(self.store, candidate)
            if os.path.lexists(path):
                st, ob = os.lstat(path), os.lstat(self.store.object_path_b(digest))
                if st.st_ino != ob.st_ino:
                    continue
            with self.m.write() as wtxn:
                wtxn.put(digest, candidate.encode(), db=self.m.ids)
            return self._link_id(digest, candidate)
        raise VeloError(f"no free short id for {full}", reason=Reason.OBJECT_CORRUPT)

    # -- proxies (links form)
    def proxy(self, digest: bytes, mode: int, *, bump: bool = False) -> bytes:
        key = (digest, mode)
        cur = self.proxies.get(key)
        index = 0 if cur is None else cur[1] + (1 if bump else 0)
        if cur is not None and not bump:
            return cur[0]
        hexname = digest.hex()
        pdir = self.proxies_b + b"/" + hexname[:2].encode()
        if pdir not in self.made_dirs:
            makedirs(pdir)
            self.made_dirs.add(pdir)
        name = f"{hexname}-{mode:04o}" + (f"-{index}" if index else "")
        path = pdir + b"/" + name.encode()
        if not os.path.lexists(path):
            tmp = path + b".%d.%s" % (os.getpid(), os.urandom(3).hex().encode())
            verified_copy(self.store, digest, tmp, mode)
            os.utime(tmp, ns=(PROXY_MTIME_NS, PROXY_MTIME_NS))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            os.unlink(tmp)
            self._immutable(digest)
        self.proxies[key] = (path, index)
        return path

    def link_proxy(self, digest: bytes, mode: int, name: bytes, dfd: int) -> None:
        path = self.proxy(digest, mode)
        for _ in range(64):
            try:
                os.link(path, name, dst_dir_fd=dfd, follow_symlinks=False)
                return
            except OSError as exc:
                if exc.errno != errno.EMLINK:
                    raise
                path = self.proxy(digest, mode, bump=True)
        raise SysError(errno.EMLINK, "link", path)

    def tier1(self, digest: bytes) -> bytes:
        if self.form == "data-only" and not self.volatile:
            self.short_id(digest)  # name it before +i so a later Tier-2 use needs no clearing
        else:
            if not self.store.has(digest):
                raise object_missing(digest)
            self._immutable(digest)
        return self.store.object_path_b(digest)


def verified_copy(store: Store, digest: bytes, dst: bytes, mode: int) -> None:
    """Make the new file `dst` a copy of object `digest` (a reflink where possible) with `mode`,
    hashed before it is kept: a proxy or a delta layer's copy outlives the object it was made
    from (an object damaged in place, set aside by fsck --repair and fetched again), and every
    later session would read the damaged bytes from it. The copy is what is hashed, not the
    object: what sessions will read. A mismatch removes it: object-corrupt."""
    try:
        used = linking.clone_or_copy(  # owner-readable until hashed (a 000 file, root-free)
            os.fsdecode(store.object_path_b(digest)), os.fsdecode(dst), mode=0o600
        )
    except FileNotFoundError:
        raise object_missing(digest) from None
    except VeloError as exc:  # a FIFO or a directory where the object should be
        if exc.reason is not Reason.SPECIAL_FILE:
            raise
        raise object_corrupt(digest, "it is not a regular file") from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise object_corrupt(digest, "it is a symbolic link") from None
    fd = os.open(dst, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        got, _n = hash_own_file(fd, direct=used is linking.LinkMode.REFLINK)
        if got != digest:
            os.unlink(dst)
            raise object_corrupt(digest, f"its bytes hash to {got.hex()}")
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def protect_all(store: Store, m: Manifests, root: bytes, form: str, home: Home) -> list[str]:
    """+i on every object `root` references (a stack built without it, now used by root)."""
    with m.read() as txn:
        objects: set[bytes] = set()
        m.reachable(txn, root, set(), objects)
        objs = Objects(store, m, txn, protect=True, form=form, volatile=home.volatile)
        for d in sorted(objects):
            if form == "data-only" and not home.volatile:
                objs.short_id(d)
            else:
                objs._immutable(d)
    return objs.protect_failed


def name_and_protect(store: Store, m: Manifests, digests: Iterable[bytes]) -> list[str]:
    """Give new objects (e.g. just harvested) their short names, then +i (root only).

    Done at once rather than at the next lower build so that, when root, no object of the
    store stays mutable in between (P0-a). Returns what failed (empty when all went well).
    """
    mkdir_nofollow(ids_dir(store))
    with m.read() as txn:
        objs = Objects(store, m, txn, protect=True, form="data-only")
        for d in digests:
            objs.short_id(d)
    return objs.protect_failed


PROXY_MTIME_NS = 1_000_000_000


def _clear_immutable(path: bytes) -> None:
    """Clear +i on an object (root's are +i from the moment they are named, cas.publish):
    EPERM, with what was tried, for a process that may not."""
    try:
        fsflags.set_immutable(os.fsdecode(path), False)
    except OSError:
        # e.g. root of a user namespace (a session's command running `veloverlay run` on another
        # store): it may not touch root's +i objects, and a layer in the store needs their links
        raise VeloError(
            "cannot build this tree's layers in the store: its objects are immutable (+i) and "
            "this process may not clear the flag (root inside a user namespace?)",
            reason=Reason.IMMUTABLE_DENIED,
            hint="run it as real root outside any session, or set VELO_RUNTIME_DIR to a "
            "private writable tmpfs directory so the layers are built there",
            path=path,
        ) from None


def _link_object(src: bytes, dst: bytes) -> None:
    """A hard link to an object. link() to an immutable inode is EPERM (measured): a process
    that may clear the flag clears it for the instant of the link and sets it again."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except PermissionError:
        _clear_immutable(src)
        try:
            os.link(src, dst, follow_symlinks=False)
        finally:
            fsflags.set_immutable(os.fsdecode(src), True)
