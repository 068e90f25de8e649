"""The LD_PRELOAD shim seen from Python: where the library is, the session export it reads, the
journal it writes, and the environment that loads it.

The library is built by the package's own install (setup.py: the extension `veloverlay._veloshim`
from `shim/*.c`; it has no PyInit and is never imported, only preloaded). A session copies it into
the store as `<store>/shim-v1/<blake3>.so` (0644 in 0755 directories), so any uid that runs in the
session can load it even when the install directory is not readable to it (a venv under root's 0700
home), and a session keeps the exact bytes it started with.

Formats (shim/format.h is the reference; this module mirrors it, little endian):
* export `shim.conf`: an 80-byte header (magic `VELOSHC\\0`, version, header size, flags,
  proxy count, root dev/ino, offsets of NUL-terminated strings: root, journal, socket, lock dir,
  protected prefixes; offset of the sorted (dev, ino) proxy table; reserved words).
* journal: a 64-byte header (magic `VELOJNL\\0`, version, header size, creation time, session
  id), then records of at most 4096 bytes, each written by one write(2) under O_APPEND: a 56-byte
  header (magic `VJR1`, size, type, phase, flags, pid, ret, arg, dev, ino, time) and one or two
  paths. A path cut to fit carries a TRUNC flag.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.machinery
import json
import os
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from veloverlay import records
from veloverlay.errors import Reason, VeloError
from veloverlay.files import NotRegular, open_regular, read_regular, write_bytes_atomic
from veloverlay.store.cas import Store
from veloverlay.store.digest import hash_bytes

__all__ = [
    "unshimmed",
    "RecType",
    "Phase",
    "JournalRecord",
    "library_path",
    "install",
    "build",
    "write_config",
    "create_journal",
    "JournalReader",
    "environment",
    "CONFIG_ENV",
    "REC_MAX",
    "CHUNK",
]

CONFIG_ENV = "VELO_SHIM_CONFIG"
LIBRARY_ENV = "VELO_SHIM_LIBRARY"  # tests/dev: use this built library instead of the package's
CONF_MAGIC = b"VELOSHC\0"
CONF_VERSION = 1
CONF_F_LINK = 0x1
JOURNAL_MAGIC = b"VELOJNL\0"
JOURNAL_VERSION = 1
REC_MAGIC = 0x31524A56
REC_MAX = 4096
CHUNK = 1 << 20  # bytes of journal read at once (~18,000 records at most)
_CONF_HDR = struct.Struct("<8sIIIIQQIIIIII4I")
_JOURNAL_HDR = struct.Struct("<8sIIQ32s2I")
_REC = struct.Struct("<IHBBIiiIQQQHHI")
_SHIM_DIR = Path(__file__).resolve().parents[3] / "shim"  # a source checkout's shim/
assert _CONF_HDR.size == 80 and _JOURNAL_HDR.size == 64 and _REC.size == 56

F_TRUNC1 = 0x1
F_TRUNC2 = 0x2
F_NOPATH = 0x4


class RecType(enum.IntEnum):
    """Journal record types (shim/format.h `enum velo_rec_type`)."""

    CHECKIN = 1
    OPEN = 2
    CLOSE = 3
    TRUNCATE = 4
    RENAME = 5
    UNLINK = 6
    LINK = 7
    SYMLINK = 8
    MKDIR = 9
    RMDIR = 10
    CHMOD = 11
    CHOWN = 12
    XATTR = 13
    UTIME = 14
    BBW = 15
    EXEC = 16
    SPAWN = 17
    INHERIT = 18
    DENIED = 19
    MKNOD = 20


class Phase(enum.IntEnum):
    EVENT = 0
    INTENT = 1
    DONE = 2


class JournalRecord(records.Record, frozen=True):
    type: int
    phase: int
    flags: int
    pid: int
    ret: int
    arg: int
    dev: int
    ino: int
    time_ns: int
    path1: bytes
    path2: bytes
    offset: int  # position in the journal file

    @property
    def truncated(self) -> bool:
        return bool(self.flags & (F_TRUNC1 | F_TRUNC2))

    def describe(self) -> str:
        try:
            name = RecType(self.type).name
        except ValueError:
            name = f"type{self.type}"
        ph = Phase(self.phase).name if self.phase in (0, 1, 2) else str(self.phase)
        extra = f" -> {os.fsdecode(self.path2)}" if self.path2 else ""
        return f"{name}/{ph} pid={self.pid} ret={self.ret} {os.fsdecode(self.path1)}{extra}"


# --- the library ------------------------------------------------------------------------------
def library_path() -> Path:
    """The built shim library of this installation.

    `VELO_SHIM_LIBRARY` names another build (tests that built shim/ with its Makefile). Raises
    BACKEND_UNAVAILABLE when the package was installed without it.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        p = Path(override)
        if not p.is_file():
            raise VeloError(
                f"{LIBRARY_ENV}={override} is not a file", reason=Reason.BACKEND_UNAVAILABLE
            )
        return p
    here = Path(__file__).resolve().parents[2]  # the package root, where setup.py builds it
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_veloshim{suffix}"
        if p.is_file():
            return p
    raise VeloError(
        "the shim library (veloverlay._veloshim) is not built in this installation",
        reason=Reason.BACKEND_UNAVAILABLE,
        hint="reinstall the package with a C compiler present (pip install -e . builds it), or "
        "build shim/ with make and point VELO_SHIM_LIBRARY at libveloshim.so",
    )


def build(dest: str | os.PathLike[str]) -> Path:
    """Build shim/ with its Makefile into `dest` (source checkouts and tests); returns the .so."""
    if not (_SHIM_DIR / "Makefile").is_file():
        raise VeloError("shim sources not found", reason=Reason.BACKEND_UNAVAILABLE)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["make", "-s", "-C", os.fspath(_SHIM_DIR), f"O={out}", "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise VeloError(
            "building the shim failed",
            reason=Reason.BACKEND_UNAVAILABLE,
            detail=proc.stderr[-2000:],
        )
    return out / "libveloshim.so"


def install(store: Store, lib: Path | None = None) -> Path:
    """Copy the library into `<store>/shim-v1/<blake3 hex>.so`, readable by every uid."""
    src = lib or library_path()
    with open(src, "rb") as f:  # the package's own file, about 100 KB
        data = f.read()
    d = store.root / "shim-v1"
    d.mkdir(mode=0o755, exist_ok=True)
    os.chmod(d, 0o755)
    dst = d / f"{hash_bytes(data).hex()}.so"
    if not dst.is_file():
        write_bytes_atomic(dst, data, 0o644)
    return dst


def environment(base: Mapping[str, str], lib: Path, conf: Path) -> dict[str, str]:
    """`base` plus what loads the shim into every process started from it."""
    env = dict(base)
    pre = env.get("LD_PRELOAD", "").strip()
    parts = [p for p in pre.replace(":", " ").split() if p and p != os.fspath(lib)]
    env["LD_PRELOAD"] = " ".join([os.fspath(lib), *parts])
    env[CONFIG_ENV] = os.fspath(conf)
    return env


# --- the export -------------------------------------------------------------------------------
def write_config(
    path: str | os.PathLike[str],
    *,
    root: bytes,
    journal: bytes,
    sock: bytes,
    locks: bytes,
    protect: Iterable[bytes],
    link: bool,
    proxies: Iterable[tuple[int, int]],
) -> None:
    """Write the read-only session export the shim maps at start (atomically)."""
    st = os.stat(root)
    strings = bytearray()
    offs: list[int] = []
    base = _CONF_HDR.size
    for s in (root.rstrip(b"/") or b"/", journal, sock, locks, b":".join(protect)):
        if b"\0" in s:
            raise VeloError("NUL in a shim export path", reason=Reason.BAD_PATH)
        offs.append(base + len(strings))
        strings += s + b"\0"
    while (base + len(strings)) % 8:
        strings += b"\0"
    table = sorted(set(proxies))
    proxies_off = base + len(strings)
    hdr = _CONF_HDR.pack(
        CONF_MAGIC,
        CONF_VERSION,
        _CONF_HDR.size,
        CONF_F_LINK if link else 0,
        len(table),
        st.st_dev,
        st.st_ino,
        *offs,
        proxies_off,
        0,
        0,
        0,
        0,
    )
    body = struct.pack(f"<{2 * len(table)}Q", *(v for pair in table for v in pair))
    write_bytes_atomic(os.fsdecode(path), hdr + bytes(strings) + body, 0o644)


def create_journal(path: str | os.PathLike[str], session_id: str) -> None:
    hdr = _JOURNAL_HDR.pack(
        JOURNAL_MAGIC,
        JOURNAL_VERSION,
        _JOURNAL_HDR.size,
        time.time_ns(),
        session_id.encode()[:32],
        0,
        0,
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, hdr)
    finally:
        os.close(fd)


class JournalReader:
    """Reads records appended since the last call. A record not yet complete (a reader can see
    the first page of an append before the second) is left for the next call; bytes that are no
    record (a torn write after a crash) are skipped to the next magic and counted in `damaged`."""

    def __init__(self, path: str | os.PathLike[str], offset: int = 0) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.damaged = 0
        if offset == 0:
            with self._open() as f:
                hdr = f.read(_JOURNAL_HDR.size)
            if len(hdr) < _JOURNAL_HDR.size:
                raise VeloError(
                    f"journal {self.path} has no header", reason=Reason.MANIFEST_CORRUPT
                )
            magic, version, hsize, _created, _sid, _r0, _r1 = _JOURNAL_HDR.unpack(hdr)
            if magic != JOURNAL_MAGIC or version != JOURNAL_VERSION or hsize < _JOURNAL_HDR.size:
                raise VeloError(
                    f"journal {self.path}: unknown format (version {version})",
                    reason=Reason.MANIFEST_SCHEMA,
                )
            self.offset = hsize

    def _open(self) -> BinaryIO:
        """The journal, opened as `files.open_regular` opens (a FIFO in its place is damage
        said so, never a read that blocks the harvest for ever)."""
        try:
            return open(open_regular(self.path), "rb")
        except NotRegular:
            raise VeloError(
                f"journal {self.path} is not a regular file", reason=Reason.MANIFEST_CORRUPT
            ) from None

    def read(self, *, final: bool = False, limit: int = CHUNK) -> list[JournalRecord]:
        """New complete records from at most `limit` bytes on. With `final` (no writer is left),
        a partial tail at the end of the file is damage."""
        with self._open() as f:
            f.seek(self.offset)
            data = f.read(limit)
        return list(self._parse(data, final=final and len(data) < limit))

    def chunks(self, *, final: bool = False, limit: int = CHUNK) -> Iterator[list[JournalRecord]]:
        """Every record appended up to now, `limit` bytes at a time: memory stays bounded
        however long the journal (a session's own process can append gigabytes to it; read
        whole, 300 MB of records once took 1.4 GB)."""
        end = os.stat(self.path).st_size
        while self.offset < end:
            start = self.offset
            recs = self.read(final=final, limit=limit)
            if recs:
                yield recs
            if self.offset == start:
                return  # a record still being written: the next call

    def _parse(self, data: bytes, *, final: bool) -> Iterator[JournalRecord]:
        pos = 0
        end = len(data)
        magic = struct.pack("<I", REC_MAGIC)
        while pos + _REC.size <= end:
            (m, size, rtype, phase, flags, pid, ret, arg, dev, ino, tns, l1, l2, _res) = (
                _REC.unpack_from(data, pos)
            )
            if m != REC_MAGIC or size < _REC.size or size > REC_MAX or size != _REC.size + l1 + l2:
                nxt = data.find(magic, pos + 1)
                self.damaged += 1
                if nxt < 0:
                    # Keep the last few bytes: they may be the start of a record being written.
                    pos = max(pos + 1, end - _REC.size)
                    break
                pos = nxt
                continue
            if pos + size > end:
                break
            body = pos + _REC.size
            yield JournalRecord(
                rtype,
                phase,
                flags,
                pid,
                ret,
                arg,
                dev,
                ino,
                tns,
                data[body : body + l1],
                data[body + l1 : body + l1 + l2],
                self.offset + pos,
            )
            pos += size
        if final and pos < end:
            self.damaged += 1
            pos = end
        self.offset += pos


def make_tempdir(prefix: str = "veloshim-") -> str:
    """A world-readable temp dir (for a build other uids must load)."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    return d


_NAME_MAX = 256  # bytes of a program's name kept for the warning


def unshimmed(sdir: Path, argv: list[str], top_pid: int) -> tuple[list[str], int]:
    """Programs the journal of the session directory `sdir` shows starting without a
    check-in; also count refused store writes.

    One pass: an EXEC intent waits for its pid's next CHECKIN (the new image loaded the shim)
    or EXEC failure; whatever still waits at the end ran unshimmed. A SPAWN child, and the
    command itself, must have checked in at some point (journal or live socket)."""
    reader = JournalReader(sdir / "journal")
    checked_in: set[int] = set()
    with contextlib.suppress(OSError, ValueError):
        live = json.loads(read_regular(sdir / "daemon.json")).get("checkins", {})
        checked_in.update(int(pid) for pid in live)
    pending: dict[int, str] = {}
    spawned: dict[int, str] = {}
    denied = 0
    for recs in reader.chunks(final=True):  # (a journal can be far larger than memory)
        for r in recs:
            if r.type == RecType.CHECKIN:
                checked_in.add(r.pid)
                pending.pop(r.pid, None)
            elif r.type == RecType.EXEC:
                if r.phase == Phase.INTENT:
                    pending[r.pid] = os.fsdecode(r.path1[:_NAME_MAX])
                else:
                    pending.pop(r.pid, None)  # the exec failed: the old image goes on
            elif r.type == RecType.SPAWN and r.ret > 0:
                spawned[r.ret] = os.fsdecode(r.path1[:_NAME_MAX])
            elif r.type == RecType.DENIED:
                denied += 1
    # (journal order decides for execs: the same pid checked in before it exec'd)
    out = [f"pid {pid} ran {prog}" for pid, prog in pending.items()]
    out += [f"pid {pid} ran {prog}" for pid, prog in spawned.items() if pid not in checked_in]
    if top_pid and top_pid not in checked_in:
        out.insert(0, f"pid {top_pid} ran {' '.join(argv[:1]) or '?'}")
    if reader.damaged:
        out.append(f"(the journal had {reader.damaged} damaged records)")
    return out, denied
