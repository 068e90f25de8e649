"""Wording more than one verb uses: a counted noun's plural, and the warning of a shared store that
files other users could not read are now every local user's (ingest and a session's commit)."""

from __future__ import annotations


def plural(n: int, one: str, many: str | None = None) -> str:
    """`one` for 1, else `many` (by default `one` + "s"): "1 file", "2 files", "0 files"."""
    return one if n == 1 else (many if many is not None else one + "s")


def exposed(n: int, where: str, modes: str) -> str:
    """The shared-store warning for `n` files or directories that other users could not read
    `where` ("at the source"), for the reason `modes` says."""
    return (
        f"{n} {plural(n, 'file or directory', 'files or directories')} other users could not "
        f"read {where} ({modes}) are now readable by every local user: this store is shared"
    )
