"""Where things are mounted: /proc/PID/mountinfo read into `MountEntry`s, one mount looked up by
id, an overlay's upper dir as its super options show it, the mount an open fd is on (fdinfo), and
the set of mount ids of this namespace (a cheap snapshot to compare with after a command ran).

Reads only; every mount(2) call is `mount.py`'s. Imports only the standard library and
`veloverlay.errors`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from veloverlay.errors import Reason, VeloError

__all__ = [
    "MountEntry",
    "mounts",
    "mount_entry",
    "mount_ids",
    "fstype_at",
    "overlay_upper",
    "mnt_id_of",
]


class MountEntry(NamedTuple):
    """One line of /proc/PID/mountinfo (proc(5)); `point` unescaped, `super_opts` as written."""

    mnt_id: int
    parent_id: int
    point: str
    fstype: str
    super_opts: str
    peers: int = 0  # its shared:N peer group (0: not shared): an unmount propagates across it


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts(pid: int | str = "self") -> list[MountEntry]:
    """The mounts of `pid`'s mount namespace, in the kernel's order (a mount stacked on another
    comes after it). OSError when it cannot be read (the process is gone, no permission)."""
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [e for line in f if (e := _entry(line)) is not None]


def mount_entry(mnt_id: int) -> MountEntry | None:
    """This mount namespace's mount `mnt_id` (None: none such), read without parsing the rest."""
    with open("/proc/self/mountinfo", "rb") as f:
        want = b"%d " % mnt_id
        for line in f:
            if line.startswith(want):
                return _entry(line.decode("utf-8", "surrogateescape"))
    return None


def _entry(line: str) -> MountEntry | None:
    fields = line.rstrip("\n").split(" ")
    try:
        sep = fields.index("-", 6)
        return MountEntry(
            int(fields[0]),
            int(fields[1]),
            _unescape(fields[4]),
            fields[sep + 1],
            " ".join(fields[sep + 3 :]),
            next((int(f[7:]) for f in fields[6:sep] if f.startswith("shared:")), 0),
        )
    except (ValueError, IndexError):
        return None  # not a line of this format


def overlay_upper(entry: MountEntry) -> str | None:
    """The upperdir an overlay mount shows in its super options (None: not an overlay, or none),
    as it was given: the path itself for the new API (fd or string), its option-string form
    (`escape_option_path`) for mount(2). mountinfo's octal escapes (`\\054` for `,`) are undone."""
    if entry.fstype != "overlay":
        return None
    m = re.search(r"(?:^|,)upperdir=([^,]*)", entry.super_opts)
    return None if m is None else _unescape(m.group(1))


def mnt_id_of(fd: int) -> int:
    """The id of the mount an open fd is on (its `mnt_id:` in /proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:  # bytes: no codec to load on first use
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise VeloError(f"no mnt_id in /proc/self/fdinfo/{fd}", reason=Reason.SYSCALL)


def mount_ids() -> set[int] | None:
    """The ids of this namespace's mounts: the first field of each mountinfo line, not parsed
    further (this runs before the command, on every session's start)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            return {int(line.split(b" ", 1)[0]) for line in f}
    except (OSError, ValueError):
        return None


def fstype_at(path: str) -> str | None:
    """fstype of the mount holding `path` (longest mount point prefix in mountinfo)."""
    best, fstype = -1, None
    try:
        entries = mounts()
    except OSError:
        return None
    for e in entries:
        inside = path == e.point or path.startswith(e.point.rstrip("/") + "/")
        if inside and len(e.point) > best:
            best, fstype = len(e.point), e.fstype
    return fstype
