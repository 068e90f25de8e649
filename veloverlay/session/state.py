"""A session's state file: one typed record, written atomically, read by `sessions`, resume and gc.

`sessions/<id>/state.json` holds what a later process needs to find, finish or keep a session: its
refs and base commits, the roots gc must keep while it lives, where it projects, which processes
run it (pid + start time, so a recycled pid is never taken for the session), and how it ended.
Both backends write the same record; fields one backend does not use keep their defaults. The
JSON keys are the field names (schema `version` 1, as the first version wrote them); unknown keys
are ignored and missing ones take their defaults, so a state written by an older run still loads;
one of a higher version (a newer veloverlay's) is refused: `manifest-schema`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from veloverlay import mountinfo, process
from veloverlay.errors import Reason, VeloError
from veloverlay.files import read_regular, write_json_atomic
from veloverlay.records import Record, field
from veloverlay.session.holders import holders, namespaces_holding, tree_writers
from veloverlay.session.options import SessionInfo
from veloverlay.store.cas import Store

__all__ = [
    "State",
    "LIVE_STATES",
    "DONE_STATES",
    "new_id",
    "load",
    "load_running",
    "finishing",
    "refuse_live_view",
    "save",
    "iter_states",
    "damaged",
    "layers_in_use",
    "same_process",
]

STATE_VERSION = 1


LIVE_STATES = ("starting", "running", "harvesting")
DONE_STATES = ("harvested", "discarded", "failed")


class State(Record):
    id: str
    refs: list[str]  # resolved ref names, bottom to top; the change goes to the last
    bases: list[str]  # the commit of each ref the session started from
    view_root: str  # hex: the projected tree (the refs stacked)
    target: str  # where the tree is projected
    backend: str = "overlay"  # overlay | shim
    base_lineage: str | None = None  # the top ref's lineage at the start (None: it had none)
    specs: list[str] = field(default_factory=list)  # the refs as the user named them
    roots: list[str] = field(default_factory=list)  # hex roots gc keeps while the session lives
    below_root: str | None = None  # hex: the stack without the top ref (None: one ref)
    pid: int = 0  # the manager
    pid_start: int | None = None
    child: int = 0  # the process that runs the command (overlay: the namespace child)
    child_start: int | None = None
    # starting | running | harvesting | harvested | discarded | failed | mounted | held
    state: str = "starting"
    start: float = 0.0
    form: str = ""  # overlay: the lower form; shim: copy | link
    protection: str = ""
    discard: bool = False
    commit_to_ref: bool = True
    message: str | None = None
    warnings: list[str] = field(default_factory=list)
    exit_status: int | None = None
    killed: list[tuple[int, str]] = field(default_factory=list)
    commit: str | None = None
    conflict_ref: str | None = None
    changed: int = 0
    error: dict[str, Any] | None = None
    version: int = STATE_VERSION
    # overlay sessions
    layers: list[str] = field(default_factory=list)
    also_at: list[str] = field(default_factory=list)  # the ingest path, showing the projection
    mode: str = "userns"  # native (real root: trusted.overlay.*, redirect_dir=on) | userns
    mounted_at: str = ""  # `veloverlay mount`: the session's overlay is on this path of the host
    # the top ref's tier rules when the session started (`tiers`), what its harvest classifies
    # with and a kept REF@<id> records; False: a state of an older version, which recorded them
    # for shim sessions only
    tiers_known: bool = False
    # shim sessions
    session_ref: str = ""  # the live view REF@<id>
    target_real: str = ""
    target_created: bool = False
    target_mode: int = 0o755
    target_id: list[int] = field(default_factory=list)  # the tree top's (dev, ino)
    daemon: int = 0
    daemon_start: int | None = None
    link: bool = False
    uid: int = 0
    tiers: Any = None  # the top ref's tier rules at the start (see tiers_known)
    socket: str = ""
    argv: list[str] = field(default_factory=list)
    top_pid: int = 0
    materialize: dict[str, Any] | None = None
    unshimmed: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.field_dict()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        known = {k: v for k, v in data.items() if k in cls._fields}
        if "killed" in known:
            known["killed"] = [(int(p), str(c)) for p, c in known["killed"] or []]
        return cls(**known)

    @property
    def top(self) -> str:
        return self.refs[-1]

    def start_tiers(self, now: Any) -> Any:
        """The tier rules the session started with; `now` (the top ref's rules at harvest)
        for a state that did not record them."""
        return self.tiers if self.tiers_known or self.backend == "shim" else now

    def manager_alive(self, store: Store) -> bool:
        """The manager runs: the recorded process (pid + start time), or, where that pid means
        another process or none (the session was started in another pid namespace: inside
        another session, a container), whoever holds the session's manager lock."""
        if same_process(self.pid, self.pid_start):
            return True
        return _manager_locked(session_dir(store, self.id))

    def is_upper(self, entry: mountinfo.MountEntry) -> bool:
        """`entry` is this session's overlay (by its upper dir, whatever path it is on)."""
        upper = mountinfo.overlay_upper(entry)
        return upper is not None and upper.endswith(f"/{self.id}/upper")

    def mounted_here(self) -> mountinfo.MountEntry | None:
        """`veloverlay mount`: this session's overlay on `mounted_at` in this mount namespace.
        OSError: mountinfo unreadable (callers treat that as mounted)."""
        for entry in mountinfo.mounts():
            if entry.point == self.mounted_at and self.is_upper(entry):
                return entry
        return None

    def mounts_here(self) -> list[mountinfo.MountEntry]:
        """`veloverlay mount`: every mount of this session's overlay in this mount namespace:
        the one on `mounted_at` and any bind mount made of it (`mount --bind TARGET ELSEWHERE`),
        each of which writes the upper dir. OSError: mountinfo unreadable."""
        return [entry for entry in mountinfo.mounts() if self.is_upper(entry)]

    def mount_live(self) -> bool:
        """`veloverlay mount`: this session's overlay is mounted, on `mounted_at` or another
        path here (a bind mount of it) or in another mount namespace that copied it (its upper
        dir can still be written)."""
        try:
            if self.mounts_here():
                return True
        except OSError:
            return True  # cannot tell: never harvest what may still be written
        return bool(namespaces_holding(self.is_upper))

    def shown_state(self, store: Store) -> str:
        """The state, with a live state whose manager is gone shown as `dead-unharvested` (and
        a `mounted` one whose overlay is gone: rebooted, unmounted by hand, umount killed)."""
        if self.state == "mounted":  # (its manager: the `mount` command, while it runs)
            alive = self.manager_alive(store) or self.mount_live()
            return "mounted" if alive else "dead-unharvested"
        if self.state == "held":  # ended, but processes outside it could still write
            if self.backend == "shim":
                held = bool(tree_writers(self.target_real))
            else:
                held = bool(holders(self.is_upper))
            return "held" if held else "dead-unharvested"
        if self.state in LIVE_STATES and not self.manager_alive(store):
            return "dead-unharvested"
        return self.state


def hold(store: Store, st: State, pids: list[int], what: str) -> VeloError:
    """Record that `st` ended while processes outside it (`pids`, `what` they hold) could still
    write what it would harvest: state `held`, nothing harvested or removed; the error to raise.
    `harvest --resume` finishes it once they are gone."""
    st.state = "held"
    st.pid, st.pid_start = 0, None  # nothing runs it now
    save(store, st)
    shown = ", ".join(str(p) for p in pids[:5]) + (" …" if len(pids) > 5 else "")
    return VeloError(
        f"session {st.id}: processes outside the session {what} (pids {shown}): nothing is "
        "committed yet, its changes are kept",
        reason=Reason.SESSION_ACTIVE,
        hint=f"when they are done: veloverlay harvest --resume {st.id}",
    )


def same_process(pid: int, start: int | None) -> bool:
    """`pid` is still the process that started at `start` (not a recycled number)."""
    if pid > 0 and pid == os.getpid():
        return start is not None and own_start() == start
    return pid > 0 and start is not None and process.proc_start(pid) == start


_OWN: list[Any] = [0, None]  # (pid, its start time): this process's, read once per process


def own_start() -> int | None:
    """This process's start time (`process.proc_start` of its own pid), read once per process: a
    read of /proc/self/stat took 1-4.5 ms while the session's child was starting (the state is
    saved then), on every session start."""
    pid = os.getpid()
    if _OWN[0] != pid:  # (a forked child reads its own)
        _OWN[0], _OWN[1] = pid, process.proc_start(pid)
    return _OWN[1]  # type: ignore[no-any-return]


def new_id() -> str:
    """A new session id: its start in UTC, then random. Not local time: ids are listed, and
    `harvest --all` finishes sessions, in the order of their names, and two users' sessions (TZ
    set apart, or a DST change between them) sorted by the local clocks of their makers."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()


def session_dir(store: Store, sid: str) -> Path:
    return store.sessions / sid


# The manager of a live session holds a POSIX write lock on sessions/<id>/manager.lock, so that
# a process in another pid namespace, where the recorded pid names another process or none, sees
# it alive (`harvest --all` on the host of a session started inside another session harvested it
# under its running command). A POSIX lock, not flock: it belongs to the process, forked children
# do not inherit it, and it ends with the process. Held per session directory: {path: (fd, pid)}.
_MANAGER_LOCK = "manager.lock"
_held: dict[str, tuple[int, int]] = {}


def _key(sdir: Path) -> str:
    return os.path.realpath(sdir)  # one key whatever path led to the store


def _claim_manager(sdir: Path) -> None:
    key = _key(sdir)
    held = _held.get(key)
    if held is not None and held[1] == os.getpid():
        return
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(sdir / _MANAGER_LOCK, flags, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # (a probe holds it for an instant at most)
    except OSError:
        os.close(fd)
        raise
    _held[key] = (fd, os.getpid())


def _release_manager(sdir: Path) -> None:
    held = _held.pop(_key(sdir), None)
    if held is not None:
        os.close(held[0])  # (in a forked child a copy: the parent's lock is not the child's)


def _manager_locked(sdir: Path) -> bool:
    held = _held.get(_key(sdir))
    if held is not None and held[1] == os.getpid():
        return True  # ours: never probe it (closing any fd of the file drops a POSIX lock)
    try:
        fd = os.open(sdir / _MANAGER_LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False  # none (a session of an older version, or one that never ran)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False


def save(store: Store, st: State) -> None:
    sdir = session_dir(store, st.id)
    managing = (
        st.state in LIVE_STATES and st.pid == os.getpid() and same_process(st.pid, st.pid_start)
    )
    # Written only into the session's own directory of the store still held: a store moved
    # meanwhile (or its session directory removed) made its old path again, as root, in a
    # directory whoever moved it can write (a symbolic link there led the write anywhere).
    store.held()
    if managing:
        _claim_manager(sdir)
    try:
        write_json_atomic(sdir / "state.json", st.to_json(), parents=False)
    except FileNotFoundError:
        raise VeloError(
            f"session {st.id}: its directory {sdir} is gone; its state was not written",
            reason=Reason.SESSION_NOT_FOUND,
            path=os.fspath(sdir),
        ) from None
    if not managing:
        _release_manager(sdir)


def load(store: Store, sid: str) -> State:
    if not sid or "/" in sid or sid.startswith("."):
        raise VeloError(f"bad session id '{sid}'", reason=Reason.SESSION_NOT_FOUND)
    try:
        data = json.loads(read_regular(session_dir(store, sid) / "state.json"))
        version = data.get("version", STATE_VERSION) if isinstance(data, dict) else None
        if isinstance(version, int) and version > STATE_VERSION:
            # fields this version does not know may say what the session needs (gc keeps its
            # `roots` all the same: gc reads them raw)
            raise VeloError(
                f"session {sid}: its state file is version {version}, written by a newer "
                f"veloverlay (this one reads version {STATE_VERSION}); nothing was changed",
                reason=Reason.MANIFEST_SCHEMA,
                hint="harvest or list it with the veloverlay version that started it",
            )
        return State.from_json(data)
    except (FileNotFoundError, NotADirectoryError):
        raise VeloError(
            f"no session '{sid}'",
            reason=Reason.SESSION_NOT_FOUND,
            hint="'veloverlay sessions' lists the sessions of this store",
        ) from None
    except PermissionError:
        # another user's session in a shared store: its directory is its owner's alone (0700)
        raise VeloError(
            f"session {sid} is not readable by this user (uid {os.geteuid()})",
            reason=Reason.STORE_PERMISSION,
            hint="a session belongs to the store's owner: list and harvest it as that user",
        ) from None
    except (ValueError, TypeError) as exc:
        raise VeloError(
            f"session {sid}: unreadable state file ({exc})",
            reason=Reason.SESSION_NOT_FOUND,
            hint=f"no harvest can commit its changes: copy what you need out of "
            f"{session_dir(store, sid)} (upper/ of an overlay session), then remove it",
            path=os.fspath(session_dir(store, sid) / "state.json"),
        ) from None


@contextlib.contextmanager
def finishing(store: Store, sid: str) -> Iterator[State]:
    """The state of `sid`, read again while this process alone may finish the session for a
    manager that died (`harvest --resume`/`--all`): an exclusive flock on its directory. Two
    harvests at once would both walk the upper dir while the first one removes it (a file gone
    mid-walk, or a partial tree kept as a conflict); the second waits, then finds it done."""
    load(store, sid)  # a missing or unreadable session says so
    try:
        fd = os.open(
            session_dir(store, sid), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except FileNotFoundError:  # removed by `sessions --clean` since
        load(store, sid)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield load(store, sid)
    finally:
        os.close(fd)


def refuse_live_view(store: Store, name: str, *, doing: str = "") -> None:
    """Refuse `name` as the ref a session commits to (or that `doing` changes: "roll back",
    "delete") while it is the live view `REF@<id>` of a shim session that has not ended: that
    session's daemon owns it (its next commit there expects its own head: a rollback or a
    deletion made it fail and end, and the live view stood still for the rest of the session),
    and its end merges the session's whole tree into REF and removes it."""
    _base, sep, sid = name.partition("@")
    if not sep:
        return
    try:
        st = load(store, sid)
    except VeloError:
        return
    if st.backend != "shim" or st.session_ref != name or st.shown_state(store) in DONE_STATES:
        return
    if doing:
        raise VeloError(
            f"{name} is the live view of shim session {sid}, which has not ended: it cannot "
            f"{doing} it",
            reason=Reason.SESSION_ACTIVE,
            hint=f"its end merges the session's tree into {st.top} and removes {name}; "
            f"{doing} {st.top} after that (undo changes in {st.target} meanwhile)",
        )
    raise VeloError(
        f"{name} is the live view of shim session {sid}, which has not ended: a session "
        "cannot commit to it",
        reason=Reason.SESSION_ACTIVE,
        hint=f"project {st.top} instead, or stack {name} below another ref to read it",
    )


def load_running(store: Store, sid: str) -> State:
    """The state of `sid`, which must be running (or starting, or mounted by `mount`: its upper
    dir is as live as a run's): USAGE otherwise, with where its work went."""
    st = load(store, sid)
    shown = st.shown_state(store)
    if shown not in ("running", "starting", "mounted"):
        hint = f"what it committed: veloverlay log {st.top}"
        if shown in ("dead-unharvested", "held"):  # nothing of it is committed yet
            hint = f"nothing is committed yet; its changes: veloverlay harvest --resume {sid}"
        raise VeloError(f"session {sid} is {shown}, not running", reason=Reason.USAGE, hint=hint)
    return st


def iter_states(store: Store) -> Iterator[State]:
    try:
        names = sorted(os.listdir(store.sessions))
    except FileNotFoundError:
        return
    for sid in names:
        try:
            yield load(store, sid)
        except VeloError:
            continue


def damaged(store: Store) -> list[tuple[str, VeloError]]:
    """The sessions whose state file is there but cannot be read (cut short, garbage): what
    `iter_states` skips, with why. Their upper dirs may hold changes no harvest can commit
    without it; `sessions`, `harvest --all` and `fsck` say so rather than pass over them."""
    try:
        names = sorted(os.listdir(store.sessions))
    except FileNotFoundError:
        return []
    out = []
    for sid in names:
        try:
            load(store, sid)
        except VeloError as exc:
            if exc.reason is Reason.SESSION_NOT_FOUND and os.path.lexists(
                session_dir(store, sid) / "state.json"
            ):
                out.append((sid, exc))
    return out


def layers_in_use(store: Store) -> list[str]:
    """The lower layers unfinished sessions recorded (mounted while they run)."""
    return [p for st in iter_states(store) if st.state not in DONE_STATES for p in st.layers]


def left_at(store: Store, path: str) -> State | None:
    """The session no longer running (`dead-unharvested`) whose tree top is the directory at
    `path` (not followed): what a session killed while it ran or materialised left there,
    which `harvest --resume` finishes and removes."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    for st in iter_states(store):
        mine = list(st.target_id) == [here.st_dev, here.st_ino]
        if mine and st.shown_state(store) == "dead-unharvested":
            return st
    return None


def info(store: Store, st: State) -> SessionInfo:
    """What `sessions`, `status` and a session's start callback show of a state."""
    return SessionInfo(
        id=st.id,
        refs=list(st.refs),
        state=st.shown_state(store),
        start=st.start,
        pid=st.pid,
        target=st.target,
        commit=st.commit,
        conflict_ref=st.conflict_ref,
        warnings=list(st.warnings),
        backend=st.backend,
        form=st.form,
    )
