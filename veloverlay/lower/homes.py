"""The per-boot layer cache: where data-only metadata layers live when a tmpfs can hold them.

A metadata layer is one inode with two xattrs per file and no data (projection.py). On ext4 that
inode costs about as much as `cp -a` pays per file, and a redirect longer than ~24 bytes spills
into a 4 KiB xattr block, so layers kept in the store need short object names (`ids-v1/`, one
hard link per object). On tmpfs an inode is several times cheaper and xattr size costs memory
only, so a layer there redirects straight to `objects-v2/<ab>/<hex>`: no naming pass. The
price is RAM (about 1 KiB per file, measured in bench/bench_session.py) and a rebuild after each
boot — the layers are a cache of what the manifests say, never data.

Where (first usable wins):
* `VELO_RUNTIME_DIR` if set: a directory under which `veloverlay-<uid>/` is used (any
  filesystem with user xattrs), or `off` to keep every layer in the store;
* root: `/run/veloverlay`; others: `$XDG_RUNTIME_DIR/veloverlay`, then `/dev/shm/veloverlay-<uid>`
  — each only when it is on tmpfs.
That directory must be a real directory owned by the caller with no group/other access (a
planted metadata file would show its own bytes in someone else's projection), and, for root,
one no other user can move or replace (every directory above it root's, as for a store); a
store gets `<dir>/<dev>-<ino>/` (its root's device and inode), which names the store's path in
a file `store`: a build removes the directories of stores that are gone (`reap_orphans`).
Sessions bind it read-only like the store, in every place it may lie (`every_base`: another
environment chooses another place; each directory a store's sessions made is recorded in its
`trees-v1/boot-caches`). A place that does not exist cannot be bound: a session's command may
make one for an environment to come, so a store's directory there is used only when that
record, read-only in every session, vouches for it (`_vouched`: this boot, that inode).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from veloverlay import _libc, envvars
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import force_rmtree, read_regular, write_bytes_atomic
from veloverlay.pathtrust import real_root, untrusted_on_path
from veloverlay.records import Record
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests, Txn

__all__ = ["base", "every_base", "refuse_inside", "why_not", "planted_note", "reap_orphans"]

_why: dict[str, str] = {}


def why_not() -> str:
    """Why `home()` last returned None ('' when it did not)."""
    return _why.get("last", "")


def planted_note() -> str:
    """When the last look for the per-boot cache found a place of its that exists but that this
    user may not use (another user's, open to others, not a directory: one another user can
    make first in /dev/shm), or could not have the one VELO_RUNTIME_DIR asks for, what to tell
    the user: the layers then go to the store, slower
    but sound, and only `doctor` said why. '' otherwise (no tmpfs, VELO_RUNTIME_DIR=off)."""
    why = _why.get("planted", "")
    if not why:
        return ""
    return (
        f"the per-boot layer cache is not used ({why}): layers are built in the store, "
        "slower; set VELO_RUNTIME_DIR to a directory of yours on a tmpfs, or have that entry "
        "removed if another user made it first"
    )


def _own_private_dir(path: str, *, create: bool) -> str | None:
    """Why `path` cannot be used (None: it can): create it 0700 if asked, then insist it is a
    directory (not a symlink) that only the caller can enter. As root, also that no other user
    can move or replace it (`pathtrust.untrusted_on_path`, as for a store: root's layers must not
    be built where another user chose), judged before anything is made."""
    if real_root():
        _where, why = untrusted_on_path(os.path.abspath(path), {0, os.geteuid()})
        if why is not None:
            return why
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            return f"cannot create {path}: {exc.strerror}"
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not {os.geteuid()}"
    if st.st_mode & 0o077:
        return f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _unusable(path: str, *, create: bool, asked: bool = False) -> str | None:
    """`_own_private_dir` of a place for the cache, noting (`planted_note`) one that exists
    and is not this user's to use, or any the user `asked` for (VELO_RUNTIME_DIR) and cannot
    have (a directory of another user's where it cannot be made)."""
    why = _own_private_dir(path, create=create)
    if why is not None and (asked or os.path.lexists(path)) and not _why.get("planted"):
        _why["planted"] = why
    return why


def _on_tmpfs(path: str) -> bool:
    try:
        return _libc.statfs_type(Path(path)) == _libc.TMPFS_MAGIC
    except SysError:
        return False


def _base(*, create: bool = True) -> str | None:
    uid = os.geteuid()
    _why["planted"] = ""
    asked = (envvars.get("VELO_RUNTIME_DIR") or "").strip()
    if asked:
        if asked == "off":
            _why["last"] = "VELO_RUNTIME_DIR=off"
            return None
        path = os.path.join(os.path.abspath(asked), f"veloverlay-{uid}")
        why = _unusable(path, create=create, asked=True)
        _why["last"] = why or ""
        return None if why else path
    if uid == 0:
        candidates = [("/run", "/run/veloverlay")]
    else:
        candidates = []
        xdg = os.environ.get("XDG_RUNTIME_DIR", "")
        if xdg and os.path.isabs(xdg) and _own_private_dir(xdg, create=False) is None:
            candidates.append((xdg, os.path.join(xdg, "veloverlay")))
    candidates.append(("/dev/shm", f"/dev/shm/veloverlay-{uid}"))
    reasons = []
    for parent, path in candidates:
        if not _on_tmpfs(parent):
            reasons.append(f"{parent} is not a tmpfs")
            continue
        why = _unusable(path, create=create)
        if why is None:
            _why["last"] = ""
            return path
        reasons.append(why)
    _why["last"] = "; ".join(reasons)
    return None


_RECORD = "boot-caches"  # in a store's trees-v1/: the per-boot directories its sessions made
_RECORD_MAX = 1 << 16
_boot: list[bytes] = []


def _boot_id() -> bytes:
    if not _boot:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                _boot.append(f.read(64).strip() or b"unknown")
        except OSError:
            _boot.append(b"unknown")
    return _boot[0]


def _read_record(store_root: Path) -> bytes:
    """The store's record of per-boot directories (FileNotFoundError when there is none yet)."""
    path = os.path.join(store_root, "trees-v1", _RECORD)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return os.read(fd, _RECORD_MAX + 1)
    finally:
        os.close(fd)


def _voucher(base: str, path: str) -> bytes | None:
    """The record line that vouches for `path` (`base`/<store key>) as it is now: this boot,
    its (dev, ino), its base. None when it does not exist."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return b"%s %x-%x %s\n" % (_boot_id(), st.st_dev, st.st_ino, os.fsencode(base))


def _vouched(store_root: Path, base: str, path: str) -> bool:
    """Did one of this store's sessions make `path`, this boot? A session's command can create
    a per-boot directory where none exists yet (one its own environment did not choose, or one
    gone since), with a stack and layers of its own: the next session of that environment would
    mount them. The store, read-only in every session, keeps the proof."""
    line = _voucher(base, path)
    if line is None:
        return False
    try:
        return line in _read_record(store_root)[:_RECORD_MAX].splitlines(keepends=True)
    except OSError:
        return False


def _claim(store_root: Path, base: str, path: str) -> str | None:
    """Make `path` afresh and vouch for it in the store's record (None), or say why not. What
    stands there unvouched (made by a session's command, or before this record existed) goes
    first: it is a cache, never data."""
    from veloverlay.files import flock, force_rmtree

    rec = os.path.join(store_root, "trees-v1", _RECORD)
    try:
        with flock(Path(rec + ".lock")):
            if _vouched(store_root, base, path):
                return None  # another session's, just made
            if os.path.islink(path):
                os.unlink(path)
            elif os.path.lexists(path):
                force_rmtree(path)
            os.mkdir(path, 0o700)
            line = _voucher(base, path)
            assert line is not None
            try:
                have = _read_record(store_root)
            except FileNotFoundError:
                have = b""
            if len(have) + len(line) > _RECORD_MAX:  # keep this boot's lines only
                mine = _boot_id() + b" "
                kept = [x for x in have.splitlines(keepends=True) if x.startswith(mine)]
                write_bytes_atomic(rec, b"".join(kept)[-(_RECORD_MAX // 2) :], 0o600)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(rec, flags, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
    except (OSError, VeloError) as exc:
        return f"cannot make {path} this store's: {exc}"
    return None


def _recorded_bases(store_root: Path) -> list[str]:
    try:
        lines = _read_record(store_root)[:_RECORD_MAX].splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(b" ", 2)
        if len(parts) == 3 and parts[2].startswith(b"/") and b"\0" not in parts[2]:
            out.append(os.fsdecode(parts[2]))
    return out


def every_base(store_root: Path) -> list[str]:
    """Every directory under which this user's per-boot layers may lie, that exists and is this
    user's own private one (as `base` requires): the current one first, then the other default
    places (another environment chooses another: no XDG_RUNTIME_DIR under cron or sudo,
    VELO_RUNTIME_DIR=off) and every base the store's record names. A session binds them all
    read-only: a layer in any of them is shown by some later session."""
    uid = os.geteuid()
    found = [_base(create=False)]
    asked = (envvars.get("VELO_RUNTIME_DIR") or "").strip()
    if asked and asked != "off":
        found.append(os.path.join(os.path.abspath(asked), f"veloverlay-{uid}"))
    if uid == 0:
        found.append("/run/veloverlay")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        found.append(os.path.join(xdg, "veloverlay"))
    found.append(f"/dev/shm/veloverlay-{uid}")
    found.extend(_recorded_bases(store_root))
    out: list[str] = []
    for path in found:
        if path is None or path in out or not os.path.isabs(path):
            continue
        if _own_private_dir(path, create=False) is None:
            out.append(path)
    return out


def refuse_inside(real: str, store_root: Path, *, what: str, hint: str) -> None:
    """TARGET_INVALID when `real` (absolute, resolved) lies inside a place this user's per-boot
    layers may be (`every_base`): sessions mount what is there and gc prunes it by walking it
    (a checkout or a projection there would be pruned, or taken for layers)."""
    for cache in every_base(store_root):
        creal = os.path.realpath(cache)
        if real == creal or real.startswith(creal.rstrip("/") + "/"):
            raise VeloError(
                f"{what} {real} lies inside the per-boot layer cache {creal}",
                reason=Reason.TARGET_INVALID,
                hint=hint,
                path=real,
            )


def base() -> tuple[str | None, str]:
    """(the directory this user's per-boot layers go under, or None; why not)."""
    path = _base()
    return path, why_not()


def boot_dir(store_root: Path, *, create: bool = True) -> Path | None:
    """This store's per-boot layer directory (created unless `create` is false: then only one
    that exists), or None when there is none to use (`why_not()` says why)."""
    base = _base(create=create)
    if base is None:
        return None
    st = os.stat(store_root)
    path = os.path.join(base, _store_key(st))
    if not _vouched(store_root, base, path):
        why = _claim(store_root, base, path) if create else f"{path}: not made by this store"
        if why is not None:
            _why["last"] = why
            return None
    why = _own_private_dir(path, create=False)
    if why is not None:
        _why["last"] = why
        return None
    note = os.path.join(path, "store")
    if create and _note(note) != os.fsencode(os.path.abspath(store_root)):
        # (a store moved keeps its root's inode, so this directory: its note must follow, or
        # the next build of another store reaps it as the directory of a store that is gone)
        with contextlib.suppress(OSError):  # a directory in its place (damage): no rename
            if stat.S_ISDIR(os.lstat(note).st_mode):  # replaces it; this directory is ours
                force_rmtree(note)
        try:
            write_bytes_atomic(note, os.fsencode(os.path.abspath(store_root)), 0o600)
        except VeloError as exc:
            if exc.reason is not Reason.STORE_FULL:
                raise
            # a full cache (any user can fill /dev/shm): its builds fall back to the store, and
            # the note is written by the next session that finds room (till then nothing reaps it)
    return Path(path)


def _note(path: str) -> bytes | None:
    try:
        return read_regular(path)
    except (OSError, ValueError):  # (ValueError: not a regular file, a FIFO never read)
        return None


def _store_key(st: os.stat_result) -> str:
    return f"{st.st_dev:x}-{st.st_ino:x}"


def reap_orphans(current: Path) -> int:
    """Remove the layer directories next to `current` whose store no longer exists at the path
    it recorded (or is another store now). Returns how many went."""

    removed = 0
    if not (current / "store").exists() and (current.parent / "store").exists():
        current = current.parent  # a per-layout home (boot_home): its store's directory
    base = current.parent
    for entry in os.scandir(base):
        if entry.path == os.fspath(current) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            store_path = read_regular(os.path.join(entry.path, "store"))
        except (OSError, ValueError):
            continue  # being created right now, or not ours to judge
        try:
            alive = _store_key(os.stat(store_path)) == entry.name
        except OSError:
            alive = False
        if not alive:
            try:
                force_rmtree(entry.path)
            except OSError:
                continue  # another store's debris never stops this store's session
            removed += 1
    return removed


# --- the homes of a store's layers ------------------------------------------------------------


def trees_dir(store: Store, *parts: str) -> Path:
    return store.trees.joinpath(*parts)


class Home(Record, frozen=True):
    """Where layers, stacks, their locks and half-built layers live: the store's `trees-v1/`,
    or (data-only form) the per-boot tmpfs directory of `volatile.py`, whose layers redirect
    to full object paths under `objects-v2/` instead of short names under `ids-v1/`."""

    root: Path
    volatile: bool

    def sub(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


def disk_home(store: Store) -> Home:
    return Home(store.trees, False)


def boot_home(store: Store, *, create: bool = True) -> Home | None:
    """This store's per-boot layers, kept per object layout (their redirects name object paths
    in it: a store migrated to objects-v2 must not find layers made for objects-v1). None while a
    migration is unfinished (objects in two places): layers go to the store, with short ids."""
    if store.legacy is not None:
        return None
    path = boot_dir(store.root, create=create)
    if path is None:
        return None
    sub = path / store.objects.name
    if create:
        try:
            os.mkdir(sub, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:  # full (no inode left): the store keeps the layers
            _why["last"] = f"cannot create {sub}: {exc.strerror}"
            return None
    return Home(sub, True)


def data_layers(store: Store, home: Home, form: str) -> tuple[str, ...]:
    if form != "data-only":
        return ()
    return (os.fspath(store.objects if home.volatile else ids_dir(store)),)


def layer_homes(store: Store) -> list[Path]:
    """The directories holding this store's `layers/` and `stacks/` for the calling user: its
    per-boot layers under every base they may lie in (`every_base`: not only the one this
    environment chooses; none is made for a look) and the store's `trees-v1/`."""
    out: list[Path] = []
    if store.legacy is None:
        key = _store_key(os.stat(store.root))
        for base in every_base(store.root):
            path = os.path.join(base, key)
            if _own_private_dir(path, create=False) is not None:
                continue
            sub = Path(path) / store.objects.name
            if sub.is_dir() and not sub.is_symlink() and sub not in out:
                out.append(sub)
    return [*out, store.trees]


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM)
# Kernel memory a per-boot layer takes per entry (measured: ~1.3 KB, bench/bench_session.py), and
# the share of available memory one layer may take before it is built in the store instead.
_BYTES_PER_ENTRY = 1400
_MEMORY_SHARE = 0.25


def fallback_note(home: Home, exc: BaseException) -> str:
    if isinstance(exc, VeloError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__  # write_bytes_atomic's STORE_FULL
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0, "?")
        return f"the per-boot layer cache {home.root} is full ({code}): layers built in the store"
    return f"{exc}: layers built in the store"


class TooBig(Exception):
    """A layer that would take too much of the machine's memory in the per-boot cache."""


def check_room(home: Home, entries: int) -> None:
    """Raise TooBig when `entries` would take more than a quarter of MemAvailable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            avail = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration, ValueError):
        return
    need = entries * _BYTES_PER_ENTRY
    if need > avail * _MEMORY_SHARE:
        raise TooBig(
            f"{entries} entries would take ~{need >> 20} MiB of the per-boot layer cache "
            f"{home.root} (more than a quarter of the {avail >> 20} MiB available)"
        )


def holds_xattrs(home: Home) -> bool:
    """Can the cache's filesystem hold user xattrs (tmpfs: since Linux 6.6)? Tried on the
    directory itself: no probe module, no temp file (this runs on every build there)."""
    try:
        os.setxattr(home.root, "user.velo.probe", b"1")
        os.removexattr(home.root, "user.velo.probe")
        return True
    except OSError:
        return False


ID_HEX = 20  # 80 bits: "ab" directory + 18 hex digits


def short_id(m: Manifests, txn: Txn, digest: bytes) -> str:
    """The id of an object's short name in ids-v1: its first ID_HEX hex digits, or the longer
    one LMDB records for an object whose prefix collided."""
    alt = txn.get(digest, db=m.ids)
    return bytes(alt).decode() if alt is not None else digest.hex()[:ID_HEX]


def ids_dir(store: Store) -> Path:
    return store.root / "ids-v1"


def short_id_path(store: Store, short: str) -> bytes:
    return os.fsencode(ids_dir(store)) + b"/" + short[:2].encode() + b"/" + short[2:].encode()
