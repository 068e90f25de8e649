"""Rendering for the command line: errors, warnings, tables, JSON and progress.

Data goes to stdout, everything else to stderr. Output reads the same without colour; colour is
used only on a terminal, and never with `NO_COLOR` set or `TERM=dumb`. A failure reads

    error: <message>
    hint: <hint>

with `reason: <slug>` (the machine-readable `Reason`) added only with `--debug` or `--json`; with
`--json` the failure is also one JSON object on stdout, which always carries the reason (on
stderr, after the lines, where a verb already wrote data on stdout: `data_on_stdout`).

Text that may come from elsewhere (file names of an ingested tree, a registry's error message, a
pulled commit message) never reaches the terminal raw: control characters are shown as `\\xNN`,
so no name or answer can move the cursor, retitle the window or hide a line (`_safe`); bytes of a
name that is not UTF-8 too, so no output encoding fails on them. Data lines go through `line`, and
a name inside one through `name`, which shows a newline or tab as `\\x0a`/`\\x09`: a file name
cannot forge a line of `ls` or `diff`. A backslash is shown as `\\\\` (by `name` and in messages),
so every name shown reads back to exactly its bytes. Verbs never `print`.

Progress (ingest, checkout, fsck, gc, layer builds, shim materialisation, push and pull) is drawn
here and nowhere else: the library reports through a plain callback
(`veloverlay.progress.Progress`), and this module turns it into a rich progress bar with bytes,
rate and ETA on a terminal. No bar is drawn off a terminal, with `--json`, or for an operation
shorter than half a second; rich is imported only when a bar is first drawn.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any, BinaryIO, cast

from veloverlay import envvars
from veloverlay.errors import SysError, VeloError, errno_hint

# C0 controls but newline and tab, DEL, the C1 controls (ESC-less CSI 0x9b among them), and the
# bytes of a name that is not UTF-8 (os.fsdecode's surrogate escapes, which a strict UTF-8 stdout
# cannot encode and a lax one would write as raw bytes 0x80-0xff).
_CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f\udc80-\udcff"
# The same and newline: for one line of data (tab stays: it separates columns).
_CONTROL_IN_LINE = re.compile(f"[\x0a{_CONTROL}]")
# The same and tab, and the backslash that starts every escape: for one name (a path, a ref, a
# commit message) inside a line. A message (error, hint, warning, note) is one line too, with the
# names in it as they came (a tab stays); only a detail (a compiler's output) keeps its lines.
_IN_NAME = re.compile(f"[\\\\\x09\x0a{_CONTROL}]")
_IN_MESSAGE = re.compile(f"[\\\\\x0a{_CONTROL}]")
_IN_DETAIL = re.compile(f"[\\\\{_CONTROL}]")


def _hex(m: re.Match[str]) -> str:
    """One character shown by its bytes, each as \\xNN (a C1 control, two bytes in UTF-8, as
    two: U+009B is `\\xc2\\x9b`, the byte 0x9b of a name that is not UTF-8 is `\\x9b`), and a
    literal backslash doubled (`a\\x0ab`, four characters, is never read as a newline): every
    escaped name reads back to exactly its bytes."""
    c = ord(m.group())
    if c == 0x5C:
        return "\\\\"
    raw = bytes([c - 0xDC00]) if c >= 0xDC00 else m.group().encode()
    return "".join(f"\\x{b:02x}" for b in raw)


def _safe(text: str, *, lines: bool = False) -> str:
    """`text` (a message) with every terminal control character (and undecodable byte) shown
    as \\xNN, a newline too unless `lines` (a name in it cannot forge an `error:` line), and a
    backslash as \\\\: the names in it read back exactly."""
    return (_IN_DETAIL if lines else _IN_MESSAGE).sub(_hex, text)


def name(text: str) -> str:
    """One name inside a line of output: a control character shown as \\xNN, a newline or tab
    too (\\x0a, \\x09: a file name cannot start a line of its own or shift a column), a
    backslash as \\\\ (a name holding the four characters `\\x0a` is not one holding a
    newline). Every name a human reads goes through here (or `_safe`, inside a message)."""
    return _IN_NAME.sub(_hex, text)


def line(text: str = "") -> None:
    """One line of data on stdout: a control character in it is shown as \\xNN, a newline too
    (a tab separates columns and stays; a name in it goes through `name` first, which also
    doubles its backslashes: this does not, so as not to double them twice)."""
    sys.stdout.write(_CONTROL_IN_LINE.sub(_hex, text) + "\n")


__all__ = [
    "color_enabled",
    "emit_json",
    "data_on_stdout",
    "error",
    "warn",
    "info",
    "table",
    "Progress",
    "human_bytes",
    "name",
    "line",
    "OS_ERROR",
    "INTERNAL",
    "INTERRUPTED",
]

# The reasons the CLI gives beside `Reason`'s (docs/errors.md lists them all): an OSError that is
# no SysError, and (with --debug only; else the traceback is Python's) any other exception.
OS_ERROR = "os-error"
INTERNAL = "internal"
INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM, SIGHUP: in --json output only


def color_enabled(stream: IO[Any]) -> bool:
    """Colour only on a terminal, and never for `NO_COLOR` (any value) or `TERM=dumb`."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False


def _paint(code: str, text: str) -> str:
    return f"\033[{code}m{text}\033[0m" if color_enabled(sys.stderr) else text


def emit_json(obj: Any, *, failure: VeloError | None = None) -> None:
    """The one JSON document of this command on stdout. A report that ends in a failure (fsck
    finding problems) carries the failure's fields in the same object (`failure`): a second
    document after it would make stdout no JSON at all, for every script reading it."""
    import json

    if failure is not None:
        obj = {**obj, **failure.as_dict()}
    _JSON_SENT[0] = True
    out = sys.stderr if _DATA[0] is not None and _DATA[0].sent else sys.stdout
    out.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    out.flush()


def describe(exc: BaseException) -> dict[str, Any]:
    """The parts of a failure: message, hint, reason slug, detail and the path it concerns."""
    path: str | None = None
    if isinstance(exc, VeloError):
        msg, hint, reason, detail = exc.message, exc.hint, exc.reason.value, exc.detail
        path = exc.path
    elif isinstance(exc, SysError):
        msg, hint, reason, detail = str(exc), exc.hint, "syscall", None
    elif isinstance(exc, OSError):
        msg, hint, reason, detail = str(exc), errno_hint(exc.errno), OS_ERROR, None
    else:
        msg, hint, reason, detail = f"{type(exc).__name__}: {exc}", None, INTERNAL, None
    if isinstance(exc, OSError) and isinstance(exc.filename, (str, bytes)):
        path = os.fsdecode(exc.filename)
        if hint is None and exc.errno in (errno.EACCES, errno.EPERM):
            hint = _whose_hint(path)
    return {"message": msg, "reason": reason, "hint": hint, "detail": detail, "path": path}


def _whose_hint(path: str) -> str | None:
    """For a permission failure at `path`: whose it is, when another user's (a checkout or an
    export into someone else's directory said only "Permission denied")."""
    from veloverlay.pathtrust import not_yours

    whose = not_yours(path)
    return f"{whose}: choose a place of your own" if whose else None


def error(
    message: str,
    *,
    hint: str | None = None,
    reason: str,
    detail: str | None = None,
    path: str | None = None,
    show_reason: bool = False,
    as_json: bool = False,
) -> None:
    """Render one failure on stderr (and as JSON on stdout with `as_json`; on stderr too, after
    the lines, where data was already written on stdout: `data_on_stdout`)."""
    lines = [f"{_paint('1;31', 'error:')} {_safe(message)}"]
    if detail:
        lines.append(_safe(detail, lines=True))
    if hint:
        lines.append(f"{_paint('1;36', 'hint:')} {_safe(hint)}")
    if show_reason or as_json:
        lines.append(f"reason: {reason}")
    sys.stderr.write("\n".join(lines) + "\n")
    if as_json and not _JSON_SENT[0]:  # else the document sent carries it (emit_json's failure)
        emit_json(
            {"error": message, "reason": reason, "hint": hint, "detail": detail, "path": path}
        )


def warn(msg: str) -> None:
    sys.stderr.write(f"{_paint('1;33', 'warning:')} {_safe(msg)}\n")


def info(msg: str) -> None:
    sys.stderr.write(_safe(msg) + "\n")


def table(rows: Iterable[Sequence[object]], header: Sequence[str] | None = None) -> None:
    data = [[name(str(c)) for c in r] for r in rows]
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


_DELAY = 0.5  # seconds before a bar appears: short operations draw nothing
_JSON_SENT = [False]  # this command line has written its JSON document
_MACHINE = [False]  # --json: output is for programs, and no bar is drawn even on a terminal
_DATA: list[_Counted | None] = [None]  # stdout of a verb that writes data there (data_on_stdout)


class _Counted:
    """A binary stdout that counts the bytes written through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sent = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self.raw.write(data)
        self.sent += len(data)
        return n

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()


def data_on_stdout() -> BinaryIO:
    """Binary stdout for a verb whose stdout carries data (`cat`, `export -o -`). With --json, a
    failure before any byte of it is written is told as for every verb (lines on stderr, JSON on
    stdout); once data went out, its JSON goes to stderr too, after the lines: stdout holds only
    the bytes (a document after them made it neither the data nor JSON)."""
    _DATA[0] = _Counted(sys.stdout.buffer)
    return cast(BinaryIO, _DATA[0])


def machine_output(on: bool) -> None:
    """`--json` given: progress bars stay off (stderr carries only errors and warnings)."""
    _MACHINE[0] = on


def reset() -> None:
    """A new command line (main() may run several in one process): nothing sent yet."""
    _JSON_SENT[0] = False
    _DATA[0] = None
    machine_output(False)


class Progress:
    """A progress bar on stderr for one long operation, drawn only on a terminal.

    Called as `progress(done, total, done_bytes, total_bytes)` (the library's
    `veloverlay.progress.Progress`); totals may be None when unknown. An operation that moves
    file data reports bytes: the bar shows them with a byte rate, and its ETA follows the bytes
    when their total is known, else the items (fsck knows how many objects, not their size).
    Without bytes (a layer build writes metadata only): items, their rate and the ETA. Nothing
    is drawn for operations that end within half a second, and rich is imported only then.
    """

    def __init__(self, label: str, *, unit: str = "files", enabled: bool | None = None) -> None:
        self.label = label
        self.unit = unit
        if enabled is None:
            enabled = not _MACHINE[0] and (color_enabled(sys.stderr) or _forced() == "1")
        self.enabled = enabled
        self._start = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __call__(
        self,
        done: int,
        total: int | None = None,
        done_bytes: int = 0,
        total_bytes: int | None = None,
    ) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            if time.monotonic() - self._start < _DELAY and not _forced():
                return
            self._open()
        elapsed = max(time.monotonic() - self._start, 1e-3)
        with_bytes = total_bytes is not None or done_bytes > 0
        count = f"{done:,}/{total:,}" if total is not None else f"{done:,}"
        if with_bytes:  # 12.0/80.0 MiB  41.2 MiB/s  1,204/2,000 files  ETA 0:00:02
            size = human_bytes(done_bytes)
            if total_bytes is not None:
                size = f"{size} / {human_bytes(total_bytes)}"
            what = f"{size}  {human_bytes(done_bytes / elapsed)}/s  {count} {self.unit}"
        else:  # 1,204/20,000 entries  9,700 entries/s  ETA 0:00:02
            what = f"{count} {self.unit}  {done / elapsed:,.0f} {self.unit}/s"
        if total_bytes is not None:
            self._bar.update(self._task, completed=done_bytes, total=total_bytes, what=what)
        else:
            self._bar.update(self._task, completed=done, total=total, what=what)

    def _open(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        columns: list[Any] = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[what]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        console = Console(stderr=True, force_terminal=_forced() == "1" or None)
        self._bar = Bar(*columns, console=console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=None, what="")

    def done(self) -> None:
        bar, self._bar = self._bar, None
        if bar is None:
            return
        try:
            bar.stop()
        except Exception:
            # A Ctrl-C that landed inside rich's own drawing leaves it half started, and stop()
            # then fails on rich's state (IndexError: pop from empty list), hiding the
            # KeyboardInterrupt that `done` runs under: that interrupt is what the user gets
            # (status 130). The cursor rich hid is given back all the same.
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write("\x1b[?25h")
                sys.stderr.flush()


def _forced() -> str:
    """VELO_INTERNAL__TEST_PROGRESS, for the suite: `1` draws bars at once on any stderr, `tty`
    at once but only on a terminal (the rule itself stays under test)."""
    return envvars.get("VELO_INTERNAL__TEST_PROGRESS") or ""
