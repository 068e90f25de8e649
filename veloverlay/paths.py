"""Names and relative paths as the manifest sees them.

Names are bytes: any byte except `/` and NUL, 1..255 bytes, never `.` or `..`. A manifest path is a
relative, `/`-separated sequence of such names (the root is `b""`). Everything that turns outside
input (CLI arguments, bundles, upper dirs) into a manifest key goes through here.
"""

from __future__ import annotations

import os

from veloverlay.errors import Reason, VeloError

__all__ = ["NAME_MAX", "check_name", "split", "join", "parse_user_path", "display"]

NAME_MAX = 255


def check_name(name: bytes) -> bytes:
    if not name:
        raise VeloError("empty name", reason=Reason.BAD_NAME)
    if name in (b".", b".."):
        raise VeloError(f"the name {name!r} is not allowed", reason=Reason.BAD_NAME)
    if b"/" in name or b"\0" in name:
        raise VeloError(f"a name may not contain '/' or NUL: {name!r}", reason=Reason.BAD_NAME)
    if len(name) > NAME_MAX:
        raise VeloError(
            f"name longer than {NAME_MAX} bytes: {name[:40]!r}...", reason=Reason.BAD_NAME
        )
    return name


def split(path: bytes) -> list[bytes]:
    """Split a manifest path into validated names (`b""` is the root: no names)."""
    if not path:
        return []
    return [check_name(part) for part in path.split(b"/")]


def join(parent: bytes, name: bytes) -> bytes:
    return name if not parent else parent + b"/" + name


def parse_user_path(text: str | bytes) -> bytes:
    """A path typed by a user: extra slashes and `.` are dropped, `..` is refused."""
    raw = os.fsencode(text)
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    for p in parts:
        if p == b"..":
            raise VeloError(
                f"'..' is not allowed in a manifest path: {display(raw)}", reason=Reason.BAD_PATH
            )
        check_name(p)
    return b"/".join(parts)


def display(path: bytes) -> str:
    """Render a bytes path for humans (undecodable bytes escaped, never an exception)."""
    return path.decode("utf-8", "backslashreplace") if path else "/"
