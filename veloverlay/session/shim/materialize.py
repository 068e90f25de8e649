"""Materialise a manifest as a real, writable tree for the shim backend (no mount namespace).

Default (copy) mode: every Tier-2 file is a private reflink (FICLONE) or, where the filesystem
cannot, a byte copy of its data extents (holes stay holes): the object's inode is never in the
tree, so no writer, shimmed or not, can reach an object through it (P0-a, review §2.2). `--link`
mode: Tier-2 files are hard links to per-(digest, mode) *proxy* inodes
`<store>/shim-v1/proxies/<ab>/<hex>-<mode>` (copies of the object, never the 0444 object itself)
— fast, but shared: the shim breaks a proxy link before the first write (Break-Before-Write); a
writer the shim cannot see changes the proxy, which `verify_proxies` (fsck) detects. Proxies carry
the normalised mtime `PROXY_MTIME_NS` (as the overlay links form and Nix do). Tier-1 files are
symlinks to their objects. MASK entries are skipped.

Writes only inside the target: directories are created by us and entered by fd with O_NOFOLLOW,
files are created O_EXCL|O_NOFOLLOW relative to them (as checkout.py). Directory modes and mtimes
are set when the directory is complete (post-order).

The *baseline* records what was materialised — per inode: size, mtime, ctime, digest — so the
end-of-session stat-diff re-hashes only files whose inode, size, mtime or ctime changed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from veloverlay import _libc, faults, fsflags, linking
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import (
    DIRFLAGS,
    NEWFILE,
    makedirs,
    open_opened_up,
    read_regular,
    write_bytes_atomic,
)
from veloverlay.lower.objects import PROXY_MTIME_NS, verified_copy
from veloverlay.progress import Progress
from veloverlay.records import Record, field
from veloverlay.session.target import hold_shared
from veloverlay.store.access import private_dir, refuse_overlap
from veloverlay.store.cas import Store, object_corrupt, object_missing
from veloverlay.store.checkout import REPORT_BYTES, tree_totals
from veloverlay.store.dest import claim_dir, resolve_dest
from veloverlay.store.digest import hash_fd
from veloverlay.store.manifest import Manifests, Txn
from veloverlay.store.tree import Entry, Kind

__all__ = [
    "Baseline",
    "Materialized",
    "materialize",
    "TargetDir",
    "prepare_target",
    "open_target",
    "proxies_dir",
    "verify_proxies",
    "prune_proxies",
    "ProxyFinding",
]

_SETID = stat.S_ISUID | stat.S_ISGID
_BL_MAGIC = b"VBL1"
_BL_REC = struct.Struct("<QQqq32s")


def proxies_dir(store: Store) -> Path:
    return store.root / "shim-v1" / "proxies"


def private_proxies(store: Store) -> None:
    """`shim-v1/proxies/` is its owner's alone (0700), even in a shared store: a proxy carries
    its file's mode, so the proxy of a 0666 file is writable by every user who can reach it, and
    what they write shows in every tree that links it and is committed by a live session. The
    trees reach their proxies through hard links, never through this directory."""
    makedirs(proxies_dir(store).parent)
    private_dir(proxies_dir(store))


class Baseline:
    """What materialisation wrote, by inode: (size, mtime_ns, ctime_ns, digest)."""

    def __init__(self) -> None:
        self.by_ino: dict[int, tuple[int, int, int, bytes]] = {}

    def save(self, path: str | os.PathLike[str]) -> None:
        out = bytearray(_BL_MAGIC + struct.pack("<Q", len(self.by_ino)))
        pack = _BL_REC.pack
        for ino, (size, mtime, ctime, digest) in self.by_ino.items():
            out += pack(ino, size, mtime, ctime, digest)
        write_bytes_atomic(path, bytes(out), 0o600)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Baseline:
        try:
            data = read_regular(path)
        except ValueError:  # a FIFO or a directory in its place: never read (it would block)
            raise VeloError(f"{path}: not a baseline", reason=Reason.MANIFEST_CORRUPT) from None
        if data[:4] != _BL_MAGIC:
            raise VeloError(f"{path}: not a baseline", reason=Reason.MANIFEST_CORRUPT)
        (n,) = struct.unpack_from("<Q", data, 4)
        if len(data) != 12 + n * _BL_REC.size:
            raise VeloError(f"{path}: truncated baseline", reason=Reason.MANIFEST_CORRUPT)
        bl = cls()
        for ino, size, mtime, ctime, digest in _BL_REC.iter_unpack(data[12:]):
            bl.by_ino[ino] = (size, mtime, ctime, digest)
        return bl


class Materialized(Record):
    form: str  # "reflink" | "copy" | "link": how Tier-2 files were placed (the weakest used)
    entries: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    proxies: set[tuple[int, int]] = field(default_factory=set)  # (dev, ino) of proxy inodes
    baseline: Baseline = field(default_factory=Baseline)
    max_ctime_ns: int = 0
    seconds: float = 0.0
    tier1_protected: bool = False
    warnings: list[str] = field(default_factory=list)
    setid_withheld: int = 0  # files written without the setuid/setgid bits their entry has


class TargetDir(Record, frozen=True):
    fd: int  # the directory, open (DIRFLAGS): the caller's to close
    real: str  # its path: the parent resolved once, the last component never followed
    created: bool


def prepare_target(target: str, store: Store) -> TargetDir:
    """Check `target` may receive a tree; create it if missing. It comes back open, reached and
    checked only through descriptors (`claim_dir`): its (dev, ino), mode, owner and emptiness
    are those of the directory at `real`, whoever swaps a directory on the way meanwhile; the
    caller goes on with the descriptor, never with the path.

    Refused (TARGET_INVALID): a non-empty directory, a non-directory, a symlink, a path that
    contains or lies inside the store, a missing parent, a path that changed on the way.
    """
    real = resolve_dest(target)
    refuse_overlap(
        real, store.root, what="the target", hint="project somewhere outside the store (--at DIR)"
    )
    for _ in range(100):
        fd, created = _claim(target, real)
        try:
            if hold_shared(fd, real):  # as overlay sessions: while it is ours (session/target.py)
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed meanwhile by the session that made it: find or make it again
    else:
        raise VeloError(f"{target} keeps being removed", reason=Reason.TARGET_INVALID, path=target)
    try:
        if not created:
            _check_existing(target, fd)
    except BaseException:
        os.close(fd)
        raise
    return TargetDir(fd, real, created)


def _claim(target: str, real: str) -> tuple[int, bool]:
    try:
        return claim_dir(real, 0o700)
    except FileNotFoundError:
        raise VeloError(
            f"the parent of {target} does not exist",
            reason=Reason.TARGET_INVALID,
            hint="create it, or choose another --at",
            path=target,
        ) from None
    except NotADirectoryError:
        raise VeloError(
            f"{target} exists and is not a directory",
            reason=Reason.TARGET_INVALID,
            path=target,
        ) from None


def _check_existing(target: str, fd: int) -> None:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise VeloError(
            f"{target} belongs to uid {st.st_uid}: that user could add files to the tree, and "
            "the session would commit them as this user's change",
            reason=Reason.TARGET_INVALID,
            hint="project into a new directory, or one of your own (--at)",
            path=target,
        )
    if os.listdir(fd):
        raise VeloError(
            f"{target} is not empty: the shim backend materialises the tree there and cannot "
            "hide what is already in it",
            reason=Reason.TARGET_INVALID,
            hint="use an empty or new directory (--at), or move the ingested source aside "
            "(ingest --adopt)",
            path=target,
        )


def open_target(target: str | bytes, ident: tuple[int, int] | None) -> int:
    """An fd of the session's tree top, never through a symbolic link, and only the directory
    the session made or checked (`ident`: its (dev, ino)): whoever can write the target's parent
    could otherwise rename the tree away and put a directory of their own in its place, whose
    content the session would commit as its user's change. A top the session made unreadable
    (chmod 000 .) is opened all the same, its mode left as it was."""
    unreadable = False
    try:
        fd = os.open(target, DIRFLAGS)
    except PermissionError:
        fd = os.open(target, os.O_PATH | DIRFLAGS)  # opened up below, once it is the tree
        unreadable = True
    st = os.fstat(fd)
    if ident and (st.st_dev, st.st_ino) != tuple(ident):
        os.close(fd)
        raise VeloError(
            f"{os.fsdecode(target)} is no longer the session's tree: the directory was replaced",
            reason=Reason.TARGET_INVALID,
            hint="someone who can write its parent replaced it; nothing was committed from it "
            "(project into a directory no other user can write)",
            path=target,
        )
    if unreadable:
        fd = open_opened_up(fd, stat.S_IMODE(st.st_mode))
        os.fchmod(fd, stat.S_IMODE(st.st_mode))  # opened: its mode back at once
    return fd


class _Placer:
    def __init__(self, store: Store, res: Materialized, *, link: bool, protect: bool) -> None:
        self.store = store
        self.res = res
        self.link = link
        self.protect = protect
        self.reflink = True
        self.proxy_paths: dict[tuple[bytes, int], tuple[bytes, int]] = {}
        self.proxy_dirs: set[bytes] = set()
        self.proxy_root = os.fsencode(proxies_dir(store))
        if link:
            private_proxies(store)
        self.tier1_seen: set[bytes] = set()
        self.protect_failed = 0

    def _count(self, what: str) -> None:
        self.res.counts[what] = self.res.counts.get(what, 0) + 1

    # -- Tier-2, copy mode
    def copy(self, dfd: int, e: Entry) -> None:
        fd = os.open(e.name, NEWFILE, e.mode, dir_fd=dfd)
        try:
            if e.size:
                src = self.store.open_object(e.digest)
                try:
                    have = os.fstat(src).st_size
                    if have != e.size:  # a lying entry: never copy what the object is not
                        raise object_corrupt(
                            e.digest, f"it is {have} bytes, its manifest entry says {e.size}"
                        )
                    self._fill(src, fd)
                finally:
                    os.close(src)
            else:
                self._count("copy")
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.res.baseline.by_ino[st.st_ino] = (st.st_size, e.mtime_ns, st.st_ctime_ns, e.digest)
        if st.st_ctime_ns > self.res.max_ctime_ns:
            self.res.max_ctime_ns = st.st_ctime_ns

    def _fill(self, src: int, dst: int) -> None:
        if self.reflink:
            try:
                _libc.ficlone(dst, src)
                self._count("reflink")
                return
            except SysError as exc:
                if exc.errno not in (
                    errno.EOPNOTSUPP,
                    errno.ENOTTY,
                    errno.EXDEV,
                    errno.EINVAL,
                    errno.ENOSYS,
                ):
                    raise
                self.reflink = False
        # Data extents only: a hole stays a hole (a sparse disk image or database file of the
        # tree costs its data, not its size in zeros), as overlay sessions and checkout show it.
        linking.copy_bytes(src, dst)
        self._count("copy")

    # -- Tier-2, --link mode
    def proxy(self, e: Entry, *, bump: bool = False) -> bytes:
        key = (e.digest, e.mode)
        cur = self.proxy_paths.get(key)
        if cur is not None and not bump:
            return cur[0]
        index = 0 if cur is None else cur[1] + 1
        hexname = e.digest.hex()
        pdir = self.proxy_root + b"/" + hexname[:2].encode()
        if pdir not in self.proxy_dirs:
            makedirs(pdir)
            self.proxy_dirs.add(pdir)
        name = f"{hexname}-{e.mode:04o}" + (f"-{index}" if index else "")
        path = pdir + b"/" + name.encode()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not _proxy_looks_intact(st, e):
            # Written behind the shim's back (its mtime or size moved): never link it again.
            quarantine = path + b".corrupt-%d" % time.time_ns()
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, quarantine)
            self.res.warnings.append(
                f"proxy {os.fsdecode(path)} was modified outside any shim (size/mtime changed); "
                f"moved aside as {os.fsdecode(quarantine)} — run 'veloverlay fsck'"
            )
            st = None
        if st is None:
            tmp = path + b".%d.%s.tmp" % (os.getpid(), secrets.token_hex(3).encode())
            verified_copy(self.store, e.digest, tmp, e.mode)  # kept and shared: hashed first
            os.utime(tmp, ns=(PROXY_MTIME_NS, PROXY_MTIME_NS))
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            os.unlink(tmp)
        self.proxy_paths[key] = (path, index)
        return path

    def hardlink(self, dfd: int, e: Entry) -> bool:
        """Link `e` to its proxy; False when this filesystem cannot (then copy)."""
        path = self.proxy(e)
        for _ in range(64):
            try:
                os.link(path, e.name, dst_dir_fd=dfd, follow_symlinks=False)
                self._count("link")
                return True
            except OSError as exc:
                if exc.errno == errno.EMLINK:
                    path = self.proxy(e, bump=True)
                    continue
                if exc.errno in (errno.EXDEV, errno.EPERM):
                    return False
                raise
        raise SysError(errno.EMLINK, "link", path)

    def finish_proxies(self) -> None:
        """ctimes are read last: every link() above changed the proxies' ctime."""
        for path, _index in self.proxy_paths.values():
            st = os.lstat(path)
            self.res.proxies.add((st.st_dev, st.st_ino))
            digest = bytes.fromhex(os.path.basename(path).split(b"-")[0].decode())
            self.res.baseline.by_ino[st.st_ino] = (
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                digest,
            )
            if st.st_ctime_ns > self.res.max_ctime_ns:
                self.res.max_ctime_ns = st.st_ctime_ns

    # -- Tier-1
    def tier1(self, dfd: int, e: Entry) -> None:
        obj = self.store.object_path_b(e.digest)
        if e.digest not in self.tier1_seen:
            self.tier1_seen.add(e.digest)
            if not self.store.has(e.digest):
                raise object_missing(e.digest)
            if self.protect:
                try:
                    fsflags.set_immutable(os.fsdecode(obj), True)
                except OSError:
                    self.protect_failed += 1
        os.symlink(obj, e.name, dir_fd=dfd)
        os.utime(e.name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
        self._count("symlink")


def _proxy_looks_intact(st: os.stat_result, e: Entry) -> bool:
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == e.size
        and st.st_mtime_ns == PROXY_MTIME_NS
        and stat.S_IMODE(st.st_mode) == e.mode
    )


def materialize(
    store: Store,
    m: Manifests,
    txn: Txn,
    root: bytes,
    target: str,
    *,
    link: bool = False,
    protect: bool = False,
    progress: Progress | None = None,
    ident: tuple[int, int] | None = None,
    fd: int | None = None,
) -> Materialized:
    """Write the tree `root` into the (new or empty, checked) directory `target`.

    `fd`: that directory, open (`prepare_target`'s; left open): written through it, never
    reached by the path again. Without it, `target` is opened and must be `ident`.
    `protect`: set `chattr +i` on the Tier-1 objects the tree symlinks to (root only).
    `progress(entries, total, bytes, total bytes)`: as checkout's (the totals counted first).
    """
    t0 = time.perf_counter()
    total, total_bytes = tree_totals(m, txn, root) if progress is not None else (0, 0)
    placed = reported = 0
    res = Materialized(form="link" if link else "copy")
    placer = _Placer(store, res, link=link, protect=protect)
    top = open_target(target, ident) if fd is None else os.open(".", DIRFLAGS, dir_fd=fd)
    old_umask = os.umask(0)  # modes are applied exactly as the manifest says
    # Post-order over an explicit stack: ("dir", fd, digest) fills a directory, ("done", fd,
    # mode, mtime) then sets its own metadata once everything inside it exists.
    stack: list[tuple[str, int, bytes, int, int]] = [("dir", top, root, 0, 0)]
    open_fds = [top]
    try:
        while stack:
            what, dfd, digest, mode, mtime = stack.pop()
            if what == "done":
                os.utime(dfd, ns=(mtime, mtime))
                os.chmod(dfd, mode)
                os.close(dfd)
                open_fds.remove(dfd)
                continue
            node = m.get_node(txn, digest)
            stack.append(("done", dfd, b"", node.mode, node.mtime_ns))
            for e in node.entries:
                res.entries += 1
                if progress is not None and (
                    res.entries % 1000 == 0 or placed - reported >= REPORT_BYTES
                ):
                    reported = placed
                    progress(res.entries, total, placed, total_bytes)
                if e.kind is Kind.FILE:
                    placed += e.size
                    if e.mode & _SETID and e.tier != 1:
                        # As checkout does unless asked: the tree is on the host, for every
                        # user who can reach it (and a --link proxy stays in the store), so a
                        # root session would put a setuid-root program there. The harvest
                        # gives an unchanged file its bits back (treesync `_file`).
                        e = e.replace(mode=e.mode & ~_SETID)
                        res.setid_withheld += 1
                    if e.tier == 1:
                        placer.tier1(dfd, e)
                    elif not link or not placer.hardlink(dfd, e):
                        if link and res.form == "link":
                            res.form = "copy"
                            res.warnings.append(
                                "--link: hard links to the store's proxies are not possible "
                                "here (another filesystem?): Tier-2 files were copied"
                            )
                        placer.copy(dfd, e)
                    faults.point("materialize.file")
                elif e.kind is Kind.DIR:
                    os.mkdir(e.name, 0o700, dir_fd=dfd)
                    cfd = os.open(e.name, DIRFLAGS, dir_fd=dfd)
                    open_fds.append(cfd)
                    stack.append(("dir", cfd, e.digest, 0, 0))
                elif e.kind is Kind.SYMLINK:
                    os.symlink(e.target, e.name, dir_fd=dfd)
                    os.utime(e.name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
                # MASK: a deletion for stacked refs, nothing to write
        placer.finish_proxies()
        if progress is not None:
            progress(res.entries, total, placed, total_bytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VeloError(
                f"no space left while materialising into {target}", reason=Reason.STORE_FULL
            ) from exc
        if isinstance(exc, SysError):
            raise
        raise SysError(exc.errno or errno.EIO, "materialize", target) from exc
    finally:
        os.umask(old_umask)
        for fd in open_fds:
            os.close(fd)
    if not link and placer.reflink and res.counts.get("reflink"):
        res.form = "reflink"
    res.tier1_protected = protect and placer.protect_failed == 0
    if res.setid_withheld:
        res.warnings.append(
            f"{res.setid_withheld} setuid/setgid file(s) projected without those bits, as "
            "checkout writes them; the ref keeps them unless the session changes the file"
        )
    res.seconds = time.perf_counter() - t0
    return res


# --- proxies in the store ----------------------------------------------------------------------
class ProxyFinding(Record, frozen=True):
    kind: str  # proxy-corrupt | proxy-mode | proxy-stray
    path: str
    detail: str


def _iter_proxies(store: Store) -> Iterator[Path]:
    base = proxies_dir(store)
    try:
        shards = sorted(base.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return  # none, or another user's (its owner's alone: a reader of a shared store)
    for shard in shards:
        if shard.is_dir() and not shard.is_symlink():
            yield from sorted(shard.iterdir())


def verify_proxies(store: Store) -> list[ProxyFinding]:
    """Re-hash every --link proxy against the digest in its name (the documented limit of
    --link: a writer the shim cannot see changes a proxy; this is where that is detected)."""
    out: list[ProxyFinding] = []
    for p in _iter_proxies(store):
        name = p.name
        if ".corrupt-" in name:
            out.append(ProxyFinding("proxy-corrupt", os.fspath(p), "quarantined earlier"))
            continue
        parts = name.split("-")
        try:
            digest = bytes.fromhex(parts[0])
            mode = int(parts[1], 8)
        except (ValueError, IndexError):
            out.append(ProxyFinding("proxy-stray", os.fspath(p), "not a proxy name"))
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            out.append(ProxyFinding("proxy-stray", os.fspath(p), exc.strerror or str(exc)))
            continue
        try:
            st = os.fstat(fd)
            got, _n = hash_fd(fd)
        finally:
            os.close(fd)
        if got != digest:
            out.append(
                ProxyFinding(
                    "proxy-corrupt",
                    os.fspath(p),
                    f"content hashes to {got.hex()}, not {digest.hex()} (written outside the "
                    f"shim through a --link projection; {st.st_nlink - 1} links share it)",
                )
            )
        elif stat.S_IMODE(st.st_mode) != mode:
            out.append(
                ProxyFinding(
                    "proxy-mode",
                    os.fspath(p),
                    f"mode {stat.S_IMODE(st.st_mode):04o}, not {mode:04o}",
                )
            )
    return out


def prune_proxies(store: Store, *, repair: bool = False) -> int:
    """Remove proxies no tree links any more (link count 1); with `repair`, corrupt ones too
    (trees that still link a corrupt proxy keep their inode). Returns how many were removed."""
    removed = 0
    bad = {f.path for f in verify_proxies(store)} if repair else set()
    for p in _iter_proxies(store):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if st.st_nlink == 1 or os.fspath(p) in bad:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                removed += 1
    return removed
