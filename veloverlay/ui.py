"""Rendering: error/hint lines, JSON output, tables and progress on stderr.

Data goes to stdout, everything else to stderr. Output reads fine without colour; colour is used
only on a TTY and never when NO_COLOR is set. A failure is rendered as

    error: <message>

    hint: <hint>
    reason: <machine-readable slug>

and, with --json, also as one JSON object on stdout ({"error", "reason", "hint", ...}).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from veloverlay.errors import SysError, VeloError

__all__ = ["emit_json", "error", "warn", "table", "Progress", "human_bytes"]


def _color(code: str, text: str) -> str:
    if os.environ.get("NO_COLOR") or not sys.stderr.isatty():
        return text
    return f"\033[{code}m{text}\033[0m"


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def error(exc: BaseException, *, as_json: bool = False) -> int:
    path: str | None = None
    if isinstance(exc, VeloError):
        msg, hint, reason, detail = exc.message, exc.hint, exc.reason.value, exc.detail
        path = exc.path
    elif isinstance(exc, SysError):
        msg, hint, reason, detail = str(exc), exc.hint, "syscall", None
    elif isinstance(exc, OSError):
        msg, hint, reason, detail = str(exc), None, "os-error", None
    else:
        msg, hint, reason, detail = f"{type(exc).__name__}: {exc}", None, "internal", None
    if isinstance(exc, OSError) and isinstance(exc.filename, (str, bytes)):
        path = os.fsdecode(exc.filename)
    sys.stderr.write(f"{_color('1;31', 'error:')} {msg}\n")
    if detail:
        sys.stderr.write(f"{detail}\n")
    if hint:
        sys.stderr.write(f"\n{_color('1;36', 'hint:')} {hint}\n")
    sys.stderr.write(f"reason: {reason}\n")
    if as_json:
        emit_json({"error": msg, "reason": reason, "hint": hint, "detail": detail, "path": path})
    return 1


def warn(msg: str) -> None:
    sys.stderr.write(f"{_color('1;33', 'warning:')} {msg}\n")


def info(msg: str) -> None:
    sys.stderr.write(msg + "\n")


def table(rows: Iterable[Sequence[object]], header: Sequence[str] | None = None) -> None:
    data = [[str(c) for c in r] for r in rows]
    if header:
        data.insert(0, list(header))
    if not data:
        return
    widths = [max(len(r[i]) for r in data if i < len(r)) for i in range(len(data[0]))]
    for r in data:
        cells = [c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class Progress:
    """A progress bar on stderr, drawn only on a TTY, at most 10 times a second."""

    def __init__(self, label: str, *, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (total is None or done < total):
            return
        self._last = now
        if total:
            width = 30
            fill = int(width * done / total)
            bar = "#" * fill + "-" * (width - fill)
            line = f"\r{self.label} [{bar}] {done}/{total}"
        else:
            line = f"\r{self.label} {done}"
        sys.stderr.write(line)
        sys.stderr.flush()
        self._drawn = True

    def done(self) -> None:
        if self._drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
