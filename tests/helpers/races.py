"""Races made deterministic: another user's move lands exactly between two steps of root's.

`swap_at_mkdir` wraps os.mkdir (for one test, by pytest's monkeypatch) so that a callback runs
once, right before or right after the real mkdir of one path, whether that path is made by its
name from `/` or by its last component relative to a directory descriptor. A forked child (a
session manager) inherits the wrapper.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["swap_at_mkdir"]


def swap_at_mkdir(
    monkeypatch: pytest.MonkeyPatch, made: str, swap: Callable[[], None], *, before: bool
) -> None:
    """Run `swap` once, right before or right after the real mkdir of the absolute path
    `made` (by path, or by name relative to a directory descriptor)."""
    real_mkdir = os.mkdir
    fired: list[bool] = []

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        where = os.fsdecode(path)
        if dir_fd is not None:
            where = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), where)
        hit = not fired and where == made
        if hit:
            fired.append(True)
        if hit and before:
            swap()
        real_mkdir(path, mode, dir_fd=dir_fd)
        if hit and not before:
            swap()

    monkeypatch.setattr(os, "mkdir", mkdir)
