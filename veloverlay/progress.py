"""The progress callback that the library's long operations accept (the CLI draws it).

A leaf: imports nothing (of veloverlay). Long operations (ingest, checkout, fsck, gc, layer builds,
materialisation) call `progress(done, total, done_bytes, total_bytes)` now and then, from the
thread that called them; a total is None while unknown, byte counts are 0/None where the
operation does not move file data. The callback must be cheap and must not raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["Progress", "set_notice", "has_notice", "notice"]

# Who is told of a wait the caller did not ask for (a verb waiting for the store lock behind
# gc): the CLI installs its stderr line; a library user, nothing.
_notice: list[Callable[[str], None]] = []


def set_notice(fn: Callable[[str], None] | None) -> None:
    _notice[:] = [fn] if fn is not None else []


def has_notice() -> bool:
    return bool(_notice)


def notice(text: str) -> None:
    """Tell `text` to whoever was installed (nobody: nothing)."""
    if _notice:
        _notice[0](text)


class Progress(Protocol):
    def __call__(
        self,
        done: int,
        total: int | None = None,
        done_bytes: int = 0,
        total_bytes: int | None = None,
    ) -> None: ...
