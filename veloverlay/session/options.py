"""What a session is asked to do, and what it reports: the records both backends share."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from veloverlay.records import Record, field

__all__ = ["SessionOptions", "SessionResult", "SessionInfo", "OnStart"]


# --- public data ---------------------------------------------------------------------------------
class SessionOptions(Record):
    refs: list[str]  # stacked, later wins; the delta goes to the top (last) ref
    at: str | None = None  # target; default: the top ref's recorded ingest path
    backend: str = "auto"  # auto | overlay | shim
    net: str = "host"  # host | none
    discard: bool = False  # throw the upper away, commit nothing
    commit: bool = True  # False: harvest into REF@<id> only
    message: str | None = None
    strict: bool = False  # refuse any degradation (no +i, fallback lower form)
    as_root: bool = False  # root-free: map yourself to 0 inside
    grace: float = 5.0  # SIGTERM -> grace -> SIGKILL for leftovers when the command exits
    link: bool = False  # shim backend: hard links to proxies with Break-Before-Write


class SessionResult(Record):
    session_id: str
    exit_status: int
    commit: str | None
    conflict_ref: str | None
    changed: int
    backend: str
    lower_form: str
    protection: str
    killed: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ref: str | None = None
    state: str = ""
    conflicts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    # what the session changed, as `diff` shows it: (status letter, path); `changed` counts them
    changes: list[tuple[str, str]] = field(default_factory=list)
    mode: str = ""  # overlay: native | userns (session/select.py); shim: ""
    # what was found and not committed, with why: (path, kind); the shim's "other-owner" (a
    # file another user put in a writable directory of the tree)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # the ref had every change of the session already (made meanwhile): nothing was committed,
    # `commit` is the ref's head (the end line says so; JSON: a warning, `changes` empty)
    up_to_date: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "exit_status": self.exit_status,
            "commit": self.commit,
            "conflict_ref": self.conflict_ref,
            "conflicts": self.conflicts,
            "changed": self.changed,
            "backend": self.backend,
            "lower_form": self.lower_form,
            "mode": self.mode,
            "protection": self.protection,
            "killed": [{"pid": p, "comm": c} for p, c in self.killed],
            "warnings": self.warnings,
            "ref": self.ref,
            "state": self.state,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "changes": [{"status": c, "path": p} for c, p in self.changes],
            "skipped": [{"path": p, "kind": k} for p, k in self.skipped],
        }


class SessionInfo(Record):
    id: str
    refs: list[str]
    # starting | running | dead-unharvested | held | mounted | harvested | discarded | failed
    state: str
    start: float
    pid: int
    target: str
    commit: str | None = None
    conflict_ref: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the session said at its start
    backend: str = ""
    form: str = ""  # the overlay's lower form, or the shim's copy/link

    def to_dict(self) -> dict[str, Any]:
        return {
            "warnings": self.warnings,
            "id": self.id,
            "refs": self.refs,
            "state": self.state,
            "start": self.start,
            # local time with its UTC offset: without one a script cannot tell the instant
            "start_iso": datetime.fromtimestamp(self.start).astimezone().isoformat("T", "seconds"),
            "pid": self.pid,
            "target": self.target,
            "commit": self.commit,
            "conflict_ref": self.conflict_ref,
            "backend": self.backend,
            "form": self.form,
        }


# Called once a session's view is ready, just before its command starts (the CLI's banner).
OnStart = Callable[[SessionInfo], None]
