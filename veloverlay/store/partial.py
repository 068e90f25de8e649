"""The names of a checkout's partial directories (`store/checkout`), made and recognised.

A checkout to NAME writes its tree into `.NAME.velo-partial-PID-RANDOM` beside NAME and renames
it into place when whole; a killed one leaves it there for the next checkout to NAME to reclaim.
Earlier versions named it `.NAME.velo-partial-PID[-N]` (N < 100): their leftovers are recognised
too, so that updating veloverlay does not leave them for good. Imports only the stdlib.
"""

from __future__ import annotations

import os
import re

__all__ = ["PARTIAL", "leftover_pid", "partial_name"]

PARTIAL = ".velo-partial-"  # `.NAME.velo-partial-PID-RANDOM`: a checkout of NAME under way
_RANDOM_HEX = 16  # 64 random bits: a name no other user can make in advance
_TAIL_BYTES = 10 + 1 + _RANDOM_HEX  # the longest pid, a dash, the random part
# what follows the prefix in a partial name, exactly: the pid of its checkout and the random part
_TAIL = rf"([1-9][0-9]{{0,9}})-[0-9a-f]{{{_RANDOM_HEX}}}"  # (compiled at first use: re caches)
# the same for the names of earlier versions, whose NAME was cut 12 bytes before the limit
_LEGACY_TAIL_BYTES = 12
_LEGACY_TAIL = r"([1-9][0-9]{0,9})(?:-[1-9][0-9]?)?"


def _prefix(name: str, tail: int) -> str:
    """`.NAME.velo-partial-`, NAME cut short where the whole with a tail of `tail` bytes would
    pass the 255-byte limit."""
    raw = os.fsencode(name)[: 255 - len(PARTIAL) - 1 - tail]
    return f".{os.fsdecode(raw)}{PARTIAL}"


def partial_name(name: str) -> str:
    """A fresh partial name for a checkout to NAME: unguessable (the pid is not: pids are handed
    out in order), so no one can make it first to have the checkout fail or find it."""
    return f"{_prefix(name, _TAIL_BYTES)}{os.getpid()}-{os.urandom(_RANDOM_HEX // 2).hex()}"


def leftover_pid(name: str, entry: str) -> str | None:
    """The pid in `entry` when it is exactly a partial name that a checkout to NAME makes, or
    made in an earlier version; None for any other name."""
    for tail, form in ((_TAIL_BYTES, _TAIL), (_LEGACY_TAIL_BYTES, _LEGACY_TAIL)):
        prefix = _prefix(name, tail)
        if entry.startswith(prefix):
            found = re.fullmatch(form, entry[len(prefix) :])
            if found is not None:
                return found.group(1)
    return None
