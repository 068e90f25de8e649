"""Names and relative paths as the manifest sees them.

Names are bytes: any byte except `/` and NUL, 1..255 bytes, never `.` or `..`. A manifest path is a
relative, `/`-separated sequence of such names (the root is `b""`). Everything that turns outside
input (CLI arguments, bundles, upper dirs) into a manifest key goes through here.
"""

from __future__ import annotations

import os

from veloverlay.errors import Reason, VeloError

__all__ = [
    "NAME_MAX",
    "DEPTH_MAX",
    "PATH_MAX",
    "check_name",
    "check_extent",
    "bounded",
    "split",
    "join",
    "parse_user_path",
    "given_path",
    "display",
]

NAME_MAX = 255
# A tree is at most this deep, and a manifest path at most this long (bytes, relative to the
# tree's root): the kernel's PATH_MAX, so every entry can be named by one path under its root.
# 256 levels keeps the walks that still recurse once or twice per level (harvest, the shim's
# tree sync) well inside Python's recursion limit (1000).
DEPTH_MAX = 256
PATH_MAX = 4095
# A tree from elsewhere (a bundle, a registry) has at most this many paths. Its nodes may name one
# subtree from many places: 40 levels of a directory holding two names for the same child are
# 2**40 paths in a few KiB, which a checkout, a listing or a layer build would walk for ever.
# 64 Mi paths is 64 times the largest tree measured here (1,000,000 files).
ENTRIES_MAX = 1 << 26


def check_name(name: bytes) -> bytes:
    if not name:
        raise VeloError("empty name", reason=Reason.BAD_NAME)
    if name in (b".", b".."):
        raise VeloError(f"the name '{display(name)}' is not allowed", reason=Reason.BAD_NAME)
    if b"/" in name or b"\0" in name:
        shown = display(name.replace(b"\0", b"\\0"))
        raise VeloError(f"a name may not contain '/' or NUL: {shown}", reason=Reason.BAD_NAME)
    if len(name) > NAME_MAX:
        raise VeloError(
            f"name longer than {NAME_MAX} bytes: {display(name[:40])}...", reason=Reason.BAD_NAME
        )
    return name


def check_extent(depth: int, length: int, where: bytes = b"") -> None:
    """Refuse a tree deeper than DEPTH_MAX levels or with a path longer than PATH_MAX bytes
    (`where`: the path that crossed it, if known)."""
    if depth > DEPTH_MAX or length > PATH_MAX:
        at = f" at {display(where[:60])}..." if where else ""
        raise VeloError(
            f"the tree is too deep{at}: {depth} levels, a path of {length} bytes (at most "
            f"{DEPTH_MAX} levels and {PATH_MAX} bytes are kept)",
            reason=Reason.TOO_DEEP,
            hint="no program could open such a path under a projection; shorten that subtree",
        )


def bounded(p: bytes) -> None:
    """Refuse the manifest path `p` if it is deeper than DEPTH_MAX or longer than PATH_MAX (for
    walks that meet a tree's paths one at a time: harvest, the shim's tree sync)."""
    if len(p) > PATH_MAX or p.count(b"/") >= DEPTH_MAX:
        check_extent(p.count(b"/") + 1, len(p), p)


def split(path: bytes) -> list[bytes]:
    """Split a manifest path into validated names (`b""` is the root: no names)."""
    if not path:
        return []
    return [check_name(part) for part in path.split(b"/")]


def join(parent: bytes, name: bytes) -> bytes:
    return name if not parent else parent + b"/" + name


def given_path(text: str) -> str:
    """A path inside a version as given on the command line, refused (USAGE) when empty: a
    script's unset variable (`ls REF "$DIR"`) never means the root; `/` names it. (The library's
    `parse_user_path` reads '' as the root.)"""
    if not text:
        raise VeloError(
            "PATH is an empty path", reason=Reason.USAGE, hint="'/' names the tree's root"
        )
    return text


def parse_user_path(text: str | bytes) -> bytes:
    """A path typed by a user: extra slashes and `.` are dropped, `..` is refused; '' is the
    root (the command line refuses it first: `given_path`)."""
    raw = os.fsencode(text)
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    for p in parts:
        if p == b"..":
            raise VeloError(
                f"'..' is not allowed in a manifest path: {display(raw)}", reason=Reason.BAD_PATH
            )
        check_name(p)
    return b"/".join(parts)


def names_a_directory(text: str | bytes) -> bool:
    """Whether a path typed by a user can only name a directory (`d/`, `d/.`), as the kernel
    reads it: `cat REF file/` is ENOTDIR there, not the file."""
    raw = os.fsencode(text)
    return raw.endswith(b"/") or raw.endswith(b"/.") or raw == b"."


def not_a_directory(spec: str, key: bytes) -> VeloError:
    """`spec`'s `key` is a file, named with a trailing slash (`names_a_directory`)."""
    return VeloError(
        f"{spec}: {display(key)} is a file, not a directory (named with a trailing '/')",
        reason=Reason.BAD_PATH,
        hint=f"name the file without the trailing slash: {display(key)}",
    )


def display(path: bytes) -> str:
    """A bytes path for a message (never an exception): its bytes exactly, undecodable ones as
    surrogate escapes (os.fsdecode). Whoever shows a message escapes it once (the CLI: each such
    byte as \\xNN, a backslash as \\\\; JSON: \\udcNN), so the name reads back exactly.
    Escaped here too (`\\xff`, four characters), it read as a name holding a backslash."""
    return os.fsdecode(path) if path else "/"
