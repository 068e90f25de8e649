"""`.velo` bundles: one ref's version with every node and object it needs, self-contained.

Format v1 (little endian): b"VELOBNDL" u32 version, then records `u8 type  u64 length  payload`:
    1 META    JSON {ref, root, path, tiers, message}
    2 NODE    32-byte digest + node encoding (at most MAX_NODE bytes in all: 1 GiB)
    3 OBJECT  32-byte digest + content
    0 END     32-byte BLAKE3 of every byte before this record
META first, then every NODE, then the OBJECTs: import stages only the objects that the files of
the tree's nodes name (others are read past, never stored) and refuses a node after an object.
Import validates everything before it changes the store: the trailer checksum, every node decodes
strictly (names: no `..`, `/`, NUL, empty, overlong, duplicates) and hashes to its digest, every
object hashes to its digest, and the root's closure is complete. Objects are staged and published
only then, and the ref is created in one transaction; a bad bundle leaves the store as it was.
Nodes outside the root's closure are dropped, never stored unchecked. Node records are held on
disk in the import's stage until then (`spill`): a bundle of millions of them costs disk the size
of the bundle, not memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import struct
from collections.abc import Iterator
from typing import IO, Any

from veloverlay import faults, pathtrust
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.files import given_path
from veloverlay.mount import pin_dir
from veloverlay.store import incoming
from veloverlay.store.access import refuse_overlap
from veloverlay.store.bundlepart import MAGIC, create_part, sticky_kept
from veloverlay.store.cas import Store, object_corrupt, verified_chunks
from veloverlay.store.digest import DIGEST_SIZE, Hasher, node_digest
from veloverlay.store.manifest import REF_RE, Manifests, Ref, Txn
from veloverlay.store.spill import NodeSpill
from veloverlay.store.stage import Stage
from veloverlay.store.tree import Kind, Node, decode

__all__ = ["export_bundle", "export_to_path", "import_bundle", "MAGIC", "MAX_NODE"]

VERSION = 1
_REC = struct.Struct("<BQ")
_META, _NODE, _OBJECT, _END = 1, 2, 3, 0
_MAX_META = 1 << 20
# A node record's bound, for export and import alike. 64 MiB once, while ingest has no bound: a
# directory of 220,000 files with 255-byte names (or 16,000 symlinks with long targets) exported
# to a bundle that import refused ("bad node record length"): a backup that could not be
# restored. A node this size is a directory of over 3 million entries of the longest names.
MAX_NODE = 1 << 30
_CHUNK = 1 << 20


def export_bundle(
    store: Store,
    m: Manifests,
    spec: str,
    out: IO[bytes],
    *,
    shown: str | None = None,
    sparse: bool = False,
) -> dict[str, Any]:
    """Write the bundle of `spec` to `out`; a failed write is a SysError naming `shown` (the
    output as the user gave it; a reader gone away stays a BrokenPipeError). The store lock is
    held shared throughout: gc waits, so the version resolved here keeps its objects. With
    `sparse` (`out` a new regular file, not O_APPEND), an object's chunks of zeros are seeked
    over, not written: the bundle file has holes where its files had (the format has none)."""
    with store.read_lock():
        return _write_bundle(store, m, spec, out, shown, sparse)


def _write_bundle(
    store: Store, m: Manifests, spec: str, out: IO[bytes], shown: str | None, sparse: bool
) -> dict[str, Any]:
    h = Hasher()

    def w(b: bytes) -> None:
        h.update(b)
        try:
            out.write(b)
        except BrokenPipeError:
            raise
        except OSError as exc:  # EFBIG (ulimit -f), ENOSPC, EIO: say which file
            raise SysError(exc.errno or errno.EIO, "write", shown) from None

    with m.read() as txn:
        ref, commit = m.resolve(txn, spec)
        root = bytes.fromhex(commit.root)
        nodes: set[bytes] = set()
        objects: set[bytes] = set()
        m.reachable(txn, root, nodes, objects)
        sizes: dict[bytes, int] = {}  # object -> the size its entries give it
        for d in nodes:
            raw = m.raw_node(txn, d)
            if raw is not None and DIGEST_SIZE + len(raw) > MAX_NODE:  # import refuses it
                raise VeloError(
                    f"a directory of {spec} holds {len(raw):,} bytes of entries, more than a "
                    f"bundle's node may ({MAX_NODE:,}): nothing was exported",
                    reason=Reason.BUNDLE_INVALID,
                    hint="split the directory, or carry the version with push and pull",
                )
            for e in m.get_node(txn, d).entries:
                if e.kind is Kind.FILE and sizes.setdefault(e.digest, e.size) != e.size:
                    raise object_corrupt(
                        e.digest, f"its entries disagree on its size ({sizes[e.digest]}, {e.size})"
                    )
        w(MAGIC + struct.pack("<I", VERSION))
        meta = json.dumps(
            {
                "ref": ref.name.split("@")[0],
                "root": commit.root,
                "path": ref.path,
                "tiers": ref.tiers,
                "message": commit.message,
            }
        ).encode()
        w(_REC.pack(_META, len(meta)) + meta)
        for d in sorted(nodes):
            data = m.raw_node(txn, d)
            assert data is not None
            w(_REC.pack(_NODE, DIGEST_SIZE + len(data)) + d + data)
    size_total = 0
    for d in sorted(objects):
        fd = store.open_object(d)
        try:
            size = sizes[d]
            # The record's length goes first: the size is checked before it (verified_chunks
            # checks it again, and the BLAKE3 after the last byte).
            have = os.fstat(fd).st_size
            if have != size:
                raise object_corrupt(d, f"it is {have} bytes, its manifest entry says {size}")
            w(_REC.pack(_OBJECT, DIGEST_SIZE + size) + d)
            for chunk in verified_chunks(fd, d, size):
                if sparse and chunk.count(0) == len(chunk):  # a hole to be: zeros all the same
                    h.update(chunk)
                    out.seek(len(chunk), os.SEEK_CUR)  # (the end record comes after: no hole
                else:  # at the end of the file, whose size is then right)
                    w(chunk)
            size_total += size
        finally:
            os.close(fd)
        faults.point("export.object")
    trailer = h.digest()
    out.write(_REC.pack(_END, DIGEST_SIZE) + trailer)
    return {
        "ref": ref.name,
        "root": commit.root,
        "nodes": len(nodes),
        "objects": len(objects),
        "bytes": size_total,
    }


def export_to_path(store: Store, m: Manifests, spec: str, output: str) -> dict[str, Any]:
    """Export into the file `output`, atomically: the bundle is written to `output.part` (created
    new, never through a symbolic link: one planted there is refused; one a killed export left is
    replaced, see `create_part`), fsynced and renamed over `output`; on any failure the `.part`
    file is removed and `output` is left as it was.
    (O_CREAT|O_EXCL never follows a symbolic link: it fails with EEXIST on one.) The bundle is
    its creator's alone (0600): it holds the bytes of every file of the version, private ones
    too, which a private store keeps from other users (`chmod` it to share it).

    The directory is resolved once (`pathtrust.realpath_safe`: root follows no other user's link
    into a directory that user does not own) and pinned; the file is made, renamed and removed
    relative to it, so a directory on the way swapped meanwhile cannot send any of it elsewhere."""
    parent, name = os.path.split(
        os.path.abspath(given_path(output, "-o", hint="name the bundle file ('-' for stdout)"))
    )
    if not name:
        raise VeloError(f"{output} names no file", reason=Reason.BAD_PATH, path=output)
    real_parent = pathtrust.realpath_safe(parent, Reason.BAD_PATH)
    refuse_overlap(
        os.path.join(real_parent, name),
        store.root,
        what="the bundle",
        hint="write the bundle outside the store",
    )
    pfd = pin_dir(real_parent)
    try:
        return _export_at(store, m, spec, pfd, name, output)
    except SysError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a write of the bundle's: as at its fsync
            raise _output_error(exc, output) from None
        raise
    except OSError as exc:
        raise _output_error(exc, output) from None
    finally:
        os.close(pfd)


def _output_error(exc: OSError, output: str) -> Exception:
    """A failure to make, write or rename the output file, naming `output` (the OSError names
    only `NAME.part` or `NAME`, relative to the directory pinned)."""
    err = exc.errno or errno.EIO
    if err == errno.ENAMETOOLONG:
        return VeloError(
            f"{output}: the bundle's name (with '.part' while it is written) is longer than 255 "
            "bytes",
            reason=Reason.BAD_PATH,
            path=output,
        )
    if err in (errno.ENOSPC, errno.EDQUOT):
        return VeloError(f"no space left while writing {output}", reason=Reason.STORE_FULL)
    hint = None
    if err == errno.EPERM:
        hint = (
            "in a sticky directory (/tmp) another user's file cannot be replaced: use another name"
        )
    return SysError(err, "export", output, hint=hint)


def _export_at(
    store: Store, m: Manifests, spec: str, pfd: int, name: str, output: str
) -> dict[str, Any]:
    try:  # refused now, not after the whole bundle
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        mode = st.st_mode
    except FileNotFoundError:
        st, mode = None, stat.S_IFREG
    if st is not None and stat.S_ISREG(mode) and sticky_kept(pfd, st):
        raise VeloError(
            f"{output} is another user's file in a sticky directory: it cannot be replaced",
            reason=Reason.EXISTS,
            path=output,
            hint="name another bundle file",
        )
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):  # /dev/null, a pipe: written, never replaced
        return _export_into(store, m, spec, pfd, name, output)
    if not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        if stat.S_ISLNK(mode):
            what = "a symbolic link (the bundle would replace the link)"
        raise VeloError(
            f"{output or '.'} is {what}",
            reason=Reason.EXISTS,
            path=output,
            hint="name the bundle file, e.g. -o DIR/NAME.velo ('-o -' writes to stdout)",
        )
    tmp = name + ".part"
    fd = create_part(pfd, tmp, output)
    try:
        with os.fdopen(fd, "wb") as f:
            info = export_bundle(store, m, spec, f, shown=output + ".part", sparse=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=pfd)
        raise
    return info


def _export_into(
    store: Store, m: Manifests, spec: str, pfd: int, name: str, output: str
) -> dict[str, Any]:
    """Export into the character device or FIFO `name` (`-o /dev/null`, a named pipe): written
    as it is, not replaced by a file (root renaming a bundle over /dev/null breaks the system).

    Only into one of the caller's or root's: whoever reads a pipe gets what goes into it, and
    another user's FIFO planted at the name (in /tmp, say) would receive every private file of
    the version (the kernel's protected_fifos covers only opens with O_CREAT, and may be off).
    The inode is checked through an O_PATH descriptor before the open for writing, which could
    block on a pipe without reader, and that same inode is the one opened."""
    try:
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    except OSError as exc:
        raise SysError(exc.errno or errno.EIO, "open", output) from None
    try:
        got = os.fstat(path_fd)
        if not (stat.S_ISCHR(got.st_mode) or stat.S_ISFIFO(got.st_mode)):  # replaced meanwhile
            raise VeloError(
                f"{output} changed while it was opened", reason=Reason.EXISTS, path=output
            )
        if got.st_uid not in (os.geteuid(), 0):
            raise VeloError(
                f"{output} is a pipe or device of uid {got.st_uid}: the bundle would go to "
                "that user",
                reason=Reason.TARGET_INVALID,
                path=output,
                hint="export into a file, or into a pipe or device of your own "
                "('-o -' writes to stdout)",
            )
        try:  # the inode checked, not whatever the name leads to by now
            fd = os.open(f"/proc/self/fd/{path_fd}", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise SysError(exc.errno or errno.EIO, "open", output) from None
    finally:
        os.close(path_fd)
    with os.fdopen(fd, "wb") as f:
        return export_bundle(store, m, spec, f, shown=output)


_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


def _check_new_ref(m: Manifests, txn: Txn, refname: str, force: bool) -> Ref | None:
    existing = m.get_ref(txn, refname)
    if existing is not None and not force:
        raise VeloError(
            f"ref '{refname}' exists",
            reason=Reason.EXISTS,
            hint="import under another name with --name, or --force to add a version",
        )
    return existing


def _refuse_existing_early(m: Manifests, refname: object, force: bool) -> None:
    """EXISTS as soon as the metadata names a ref that exists (without `force`): not after every
    object of the bundle was read and staged (gigabytes, or a full disk: `store-full` instead).
    A name that is no valid ref is left to the checks after the end record."""
    if force or not isinstance(refname, str) or not REF_RE.match(refname) or "@" in refname:
        return
    with m.read() as txn:
        _check_new_ref(m, txn, refname, force)


def _bad(msg: str) -> VeloError:
    return VeloError(
        f"invalid bundle: {msg}", reason=Reason.BUNDLE_INVALID, hint="nothing was imported"
    )


class _Reader:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = Hasher()

    def exact(self, n: int, *, hashed: bool = True) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise _bad("truncated")
        if hashed:
            self.h.update(b)
        return b

    def whole(self, n: int) -> bytes:
        """The next `n` bytes, held whole (a node), allocated only as they arrive: a length
        claimed and not carried is never a buffer of that size first (as `read(n)` makes)."""
        try:  # a regular file says at once whether they are there
            st = os.fstat(self.f.fileno())
            left = st.st_size - self.f.tell() if stat.S_ISREG(st.st_mode) else None
        except (OSError, ValueError, AttributeError):  # (a pipe's tell, BytesIO's fileno)
            left = None
        if left is not None and n > left:
            raise _bad("truncated")
        return self.exact(n) if left is not None else b"".join(self.chunks(n))

    def chunks(self, n: int) -> Iterator[bytes]:
        """The next `n` bytes, a chunk at a time (an object is never held whole)."""
        while n:
            b = self.exact(min(_CHUNK, n))
            n -= len(b)
            yield b


@contextlib.contextmanager
def _spill(stage: Stage) -> Iterator[NodeSpill]:
    """The node records as they arrive, held on disk in the stage (see `spill`): how many a
    bundle carries, inside the tree or not, does not bound what an import may hold in memory."""
    arriving = NodeSpill(stage.dir_fd(), os.fspath(stage.dir))
    try:
        yield arriving
    finally:
        arriving.close()


def _wanted(
    m: Manifests, meta: dict[str, Any] | None, arriving: NodeSpill, decoded: dict[bytes, Node]
) -> set[bytes]:
    """The objects the files of the tree's arriving nodes name: only these are staged, the
    others a bundle carries are read past (what an import holds and writes is bounded by the
    tree, not by the records). The nodes walked are decoded into `decoded`; a node missing, a
    bad root, are left to `check_closure` and the checks after the end record."""
    root = meta.get("root") if isinstance(meta, dict) else None
    if not isinstance(root, str) or not _HEX64.match(root):
        raise _bad("no metadata record before the objects")
    out: set[bytes] = set()
    stack = [bytes.fromhex(root)]
    while stack:
        d = stack.pop()
        if d in decoded:
            continue
        data = arriving.get(d)
        if data is None:
            continue  # stored (its objects are), or missing: said after the end record
        node = decoded[d] = decode(data)
        for e in node.entries:
            if e.kind is Kind.DIR:
                stack.append(e.digest)
            elif e.kind is Kind.FILE:
                out.add(e.digest)
    return out


def import_bundle(
    store: Store,
    m: Manifests,
    f: IO[bytes],
    *,
    name: str | None = None,
    force: bool = False,
    path: str | None = None,
    keep_setid: bool = False,
) -> dict[str, Any]:
    """Import a bundle. The bundle's own ingest path is only reported, never trusted as the
    ref's default projection point (a bundle from elsewhere could name /etc): pass `path`.
    setuid/setgid bits of its files are removed unless `keep_setid` (reported as
    `stripped_setid`)."""
    if path is not None:
        given_path(path, "--path")
    store.writable()
    r = _Reader(f)
    head = r.exact(len(MAGIC) + 4)
    if head[: len(MAGIC)] != MAGIC:
        raise _bad("not a .velo bundle (bad magic)")
    (version,) = struct.unpack("<I", head[len(MAGIC) :])
    if version != VERSION:
        raise _bad(f"bundle version {version} is not supported (this is {VERSION})")
    meta: dict[str, Any] | None = None
    with store.lock(), store.stage() as stage, _spill(stage) as arriving:
        store.reclaim_tmp()
        objects: dict[bytes, int] = {}  # digest -> size, as read from the bundle
        wanted: set[bytes] | None = None  # the tree's arriving files' objects, at the first
        decoded: dict[bytes, Node] = {}  # the arriving nodes of the tree, decoded once
        while True:
            rec = r.f.read(_REC.size)
            if len(rec) != _REC.size:
                raise _bad("truncated (no end record)")
            typ, length = _REC.unpack(rec)
            if typ == _END:
                if length != DIGEST_SIZE:
                    raise _bad("bad end record")
                expect = r.h.digest()
                if r.exact(DIGEST_SIZE, hashed=False) != expect:
                    raise _bad("checksum mismatch (the file was altered or damaged)")
                if r.f.read(1):
                    raise _bad("data after the end record")
                break
            r.h.update(rec)
            faults.point("import.record")
            if typ == _META:
                if meta is not None or length > _MAX_META:
                    raise _bad("duplicate or oversized metadata")
                try:
                    meta = json.loads(r.exact(length))
                except (ValueError, RecursionError):  # nesting deeper than the parser goes
                    raise _bad("metadata is not JSON") from None
                named = name or (meta.get("ref") if isinstance(meta, dict) else None)
                _refuse_existing_early(m, named, force)
            elif typ == _NODE:
                if wanted is not None:
                    raise _bad("a node record after the objects (a bundle lists its nodes first)")
                if not DIGEST_SIZE < length <= MAX_NODE:
                    raise _bad("bad node record length")
                d = r.exact(DIGEST_SIZE)
                data = r.whole(length - DIGEST_SIZE)
                if node_digest(data) != d:
                    raise _bad(f"node {d.hex()[:16]} does not hash to its name")
                try:
                    decode(data)
                except VeloError as exc:
                    raise _bad(exc.message) from None
                arriving.add(d, data)
            elif typ == _OBJECT:
                if length < DIGEST_SIZE:
                    raise _bad("bad object record length")
                if wanted is None:
                    wanted = _wanted(m, meta, arriving, decoded)
                d = r.exact(DIGEST_SIZE)
                if d not in wanted or d in objects:  # outside the tree: read, never staged
                    for _chunk in r.chunks(length - DIGEST_SIZE):
                        pass
                    continue
                got, size, _new = stage.add_stream(r.chunks(length - DIGEST_SIZE))
                if got != d:
                    raise _bad(f"object {d.hex()[:16]} does not hash to its name")
                objects[d] = size
            else:
                raise _bad(f"unknown record type {typ}")
        if not isinstance(meta, dict) or not isinstance(meta.get("root"), str):
            raise _bad("no metadata record")
        if not _HEX64.match(meta["root"]):
            raise _bad("bad root digest")
        root = bytes.fromhex(meta["root"])
        ref = meta.get("ref")  # (export writes a ref's name without its '@<session>')
        if name is None and not (isinstance(ref, str) and REF_RE.match(ref) and "@" not in ref):
            raise _bad(f"bad ref name '{ref}'")
        refname = incoming.target_ref(name or meta["ref"])
        tiers = meta.get("tiers")
        if tiers is not None and not incoming.valid_tiers(tiers):
            raise _bad("bad tier rules")
        with m.read() as txn:
            setid = incoming.check_closure(store, m, txn, root, arriving, objects, _bad, decoded)
            _check_new_ref(m, txn, refname, force)  # before anything is stored
        # Only the nodes of the root's closure (those `check_closure` walked, now in `decoded`)
        # are stored: a stored node is trusted to have its closure stored and checked (pull and
        # a later import do not descend into it), so an extra node a bundle carries, naming
        # objects it lacks or lying about their sizes, must never get in.
        nodes = {d: arriving[d] for d in decoded}
        stage.publish()
        with m.write() as txn:
            for d, data in nodes.items():
                m.put_raw_node(txn, d, data)
            stripped = 0
            if not keep_setid:
                root, stripped = incoming.strip_setid(m, txn, root, setid)
            existing = _check_new_ref(m, txn, refname, force)
            c = m.commit(
                txn,
                refname,
                root,
                expect_head=existing.head if existing else None,
                message=f"import: {incoming.message(meta.get('message'))}",
                path=os.path.abspath(path) if path is not None else None,
                tiers=tiers,
            )
    return {
        "bundle_path": meta.get("path") if isinstance(meta.get("path"), str) else None,
        "ref": refname,
        "root": root.hex(),
        "commit": c.id,
        "nodes": len(nodes),
        "objects": len(objects),
        "stripped_setid": stripped,
    }
