"""The progress callback that the library's long operations accept (the CLI draws it).

A leaf: imports nothing. Long operations (ingest, checkout, fsck, gc, layer builds,
materialisation) call `progress(done, total, done_bytes, total_bytes)` now and then, from the
thread that called them; a total is None while unknown, byte counts are 0/None where the
operation does not move file data. The callback must be cheap and must not raise.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress"]


class Progress(Protocol):
    def __call__(
        self,
        done: int,
        total: int | None = None,
        done_bytes: int = 0,
        total_bytes: int | None = None,
    ) -> None: ...
