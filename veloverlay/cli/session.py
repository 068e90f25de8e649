"""Session verbs: run, enter, mount, umount, sessions, harvest and daemon.

`run REF... -- COMMAND`: everything after the first `--` is the command (`_RunCommand` splits it
off before typer parses the rest). With `--json`, stdout carries only the session's JSON report:
the command's own stdout (`enter`: the shell's) goes to stderr for the session's lifetime, so the
report stays parseable (`veloverlay run --json REF -- make | jq .commit`).
"""

import enum
import os
import sys
from typing import Annotated, Any

import typer

from veloverlay.cli import common, render
from veloverlay.cli.common import complete_ref, state, verb
from veloverlay.words import plural

app = common.new_app()


class Backend(enum.StrEnum):
    auto = "auto"
    overlay = "overlay"
    shim = "shim"


class Net(enum.StrEnum):
    host = "host"
    none = "none"


Refs = Annotated[
    list[str],
    typer.Argument(
        metavar="REF...",
        help="Refs to project; several stack, the last on top (it receives the changes)",
        autocompletion=complete_ref,
    ),
]
At = Annotated[
    str | None, typer.Option(metavar="DIR", help="Project here (default: the ref's ingest path)")
]
BackendOpt = Annotated[
    Backend, typer.Option(help="auto: overlay where it can be mounted, else the shim")
]
NetOpt = Annotated[Net, typer.Option(help="host, or none (a new network namespace with lo)")]
Discard = Annotated[bool, typer.Option("--discard", help="Throw all changes away")]
NoCommit = Annotated[bool, typer.Option("--no-commit", help="Keep changes as REF@SESSION only")]
Message = Annotated[str | None, typer.Option("--message", "-m", help="Commit message")]
Strict = Annotated[bool, typer.Option("--strict", help="Refuse any degraded protection or backend")]
AsRoot = Annotated[bool, typer.Option("--as-root", help="Root-free: appear as uid 0 inside")]
Grace = Annotated[
    float,
    typer.Option(
        help="Seconds between SIGTERM and SIGKILL for leftover processes, and for the command "
        "when SIGTERM or SIGHUP is sent to this process",
        callback=common.seconds,
    ),
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Say on stderr where the tree is projected (backend, form, session id) before the "
        "command starts",
    ),
]
Link = Annotated[
    bool,
    typer.Option(
        "--link",
        help="Shim backend: hard links to shared proxies with Break-Before-Write (faster; "
        "writers the shim cannot see are only detected, by fsck)",
    ),
]


class _RunCommand(common.Command):
    """`run`: the words after the first `--` are the command, kept out of typer's parsing."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta["velo.command"] = args[i + 1 :]
            args = args[:i]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [*super().collect_usage_pieces(ctx), "-- COMMAND [ARGS]..."]


def _one_ending(discard: bool, no_commit: bool, message: str | None) -> None:
    """--discard throws the changes away, --no-commit keeps them as REF@SESSION, -m names their
    commit: --discard with either is a contradiction, refused before anything starts (the
    session used to discard, losing what --no-commit asked to keep)."""
    from veloverlay.errors import Reason, VeloError

    other = "--no-commit" if no_commit else "-m" if message is not None else None
    if discard and other:
        raise VeloError(
            f"--discard and {other} contradict each other",
            reason=Reason.USAGE,
            hint="--discard throws the changes away; --no-commit keeps them as REF@SESSION",
        )


def _options(refs: list[str], **options: Any) -> Any:
    from veloverlay.session.core import SessionOptions

    _one_ending(options["discard"], options["no_commit"], options.get("message"))
    options["backend"] = options["backend"].value
    options["net"] = options["net"].value
    options["commit"] = not options.pop("no_commit")
    return SessionOptions(refs=refs, **options)


def _render(res: Any, *, shown: int = 20) -> int:
    """The end of a session as a user reads it; returns the exit status the verb ends with.

    A conflict is a failure (exit 1 when the command itself succeeded): the session's tree is
    kept as REF@SESSION and the paths both sides changed are named."""
    d = res.to_dict()
    for w in d.get("warnings", []):
        render.warn(w)
    for k in d.get("killed", []):
        render.warn(f"killed leftover process {k['pid']} ({k['comm']})")
    ref = d.get("ref") or "the ref"
    changes = d.get("changes", [])
    if d.get("conflict_ref") and d.get("conflicts"):
        render.warn(
            f"conflict: {ref} moved meanwhile and changed the same paths; this session is "
            f"kept as {d['conflict_ref']}"
        )
        for p in d["conflicts"][:shown]:
            render.info(f"  both changed: {p}")  # a message: its names shown as in `name`
        render.info(f"see: veloverlay diff {ref} {d['conflict_ref']}")
        render.info(
            f"take it whole (undoes what moved {ref} meanwhile), or ingest a merged tree: "
            f"veloverlay rollback {ref} {d['conflict_ref']}"
        )
        return int(res.exit_status) or 1
    if d.get("conflict_ref"):
        render.info(f"kept {len(changes)} changes as {d['conflict_ref']} (not committed to {ref})")
    elif res.up_to_date:  # the ref had them all: no commit of the session's
        render.info(f"{ref}: nothing new to commit (the ref is at commit {d['commit'][:12]})")
        return int(res.exit_status)
    elif d.get("commit") and not changes:
        render.info(f"{ref}: only timestamps changed (commit {d['commit'][:12]})")
    elif d.get("commit"):
        render.info(
            f"{ref}: committed {len(changes)} {plural(len(changes), 'change')} "
            f"(commit {d['commit'][:12]})"
        )
    elif d.get("state") == "discarded":
        render.info(f"{ref}: changes discarded (--discard)")
    elif d.get("state") == "harvested":
        render.info(f"{ref}: nothing changed")
    for c in changes[:shown]:
        render.info(f"  {c['status']} {c['path']}")
    if len(changes) > shown:
        render.info(f"  ... and {len(changes) - shown} more: veloverlay diff {ref}@{{1}} {ref}")
    if d.get("commit") and changes and not d.get("conflict_ref"):
        render.info(f"undo: veloverlay rollback {ref}")
    return int(res.exit_status)


def _banner(info: Any, *, interactive: bool = True) -> None:
    """The start of a session, on stderr: where the tree is projected (and, for `enter`'s shell,
    how to leave). `run` prints the first line only, and only with --verbose: its stdout and
    stderr belong to the command, as `nix develop -c` and `docker run` leave them."""
    ref = info.refs[-1] if info.refs else "?"
    how = f"{info.backend}, {info.form}" if info.form else info.backend
    where = f"veloverlay: {'+'.join(info.refs)} projected at {info.target} ({how})"
    if not interactive:
        render.info(f"{where}, session {info.id}")
        return
    render.info(where)
    render.info(
        f"  leave with 'exit' or Ctrl-D: changes are committed to {ref}; "
        f"'veloverlay status' shows them meanwhile (session {info.id})"
    )


@verb(app, cls=_RunCommand, no_args_is_help=True)
def run(
    ctx: typer.Context,
    refs: Refs,
    at: At = None,
    backend: BackendOpt = Backend.auto,
    net: NetOpt = Net.host,
    discard: Discard = False,
    no_commit: NoCommit = False,
    message: Message = None,
    strict: Strict = False,
    as_root: AsRoot = False,
    grace: Grace = 5.0,
    link: Link = False,
    verbose: Verbose = False,
) -> int:
    """Run a command in a projection of REF (several REFs stack, the last on top).

    The command is everything after `--`; its exit status is run's (127: not found). Nothing is
    printed before it starts (--verbose: one line on stderr saying where the tree is); when it
    ends, what was committed is listed on stderr. With --json, stdout carries only the session's
    report and the command's stdout goes to stderr.
    """
    from veloverlay.errors import Reason, VeloError
    from veloverlay.session.core import run as do_run

    command = ctx.meta.get("velo.command")
    if not command:
        raise VeloError(
            "no command given", reason=Reason.USAGE, hint="veloverlay run REF -- COMMAND [ARGS...]"
        )
    opts = _options(
        refs,
        at=at,
        backend=backend,
        net=net,
        discard=discard,
        no_commit=no_commit,
        message=message,
        strict=strict,
        as_root=as_root,
        grace=grace,
        link=link,
    )
    progress = render.Progress("preparing the tree", unit="entries")

    def start(info: Any) -> None:  # the bar goes before the command writes anything
        progress.done()
        if verbose and not state.json:
            _banner(info, interactive=False)

    def session() -> Any:
        try:
            return do_run(common.store(), opts, list(command), on_start=start, progress=progress)
        finally:
            progress.done()

    if state.json:
        res = _stdout_to_stderr(session)
        render.emit_json(res.to_dict())
        return int(res.exit_status) or (1 if res.conflicts else 0)
    return _render(session())


def _stdout_to_stderr(fn: Any) -> Any:
    """Call `fn` with file descriptor 1 pointing at stderr (the session's command inherits it)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        return fn()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@verb(app)
def enter(
    refs: Refs,
    at: At = None,
    backend: BackendOpt = Backend.auto,
    net: NetOpt = Net.host,
    discard: Discard = False,
    no_commit: NoCommit = False,
    message: Message = None,
    strict: Strict = False,
    as_root: AsRoot = False,
    grace: Grace = 5.0,
    link: Link = False,
) -> int:
    """Open an interactive shell in a projection of REF; changes are committed when it exits."""
    from veloverlay.session.core import enter as do_enter

    opts = _options(
        refs,
        at=at,
        backend=backend,
        net=net,
        discard=discard,
        no_commit=no_commit,
        message=message,
        strict=strict,
        as_root=as_root,
        grace=grace,
        link=link,
    )
    progress = render.Progress("preparing the tree", unit="entries")

    def start(info: Any) -> None:
        progress.done()
        if not state.json:
            _banner(info)

    def session() -> Any:
        try:
            return do_enter(common.store(), opts, on_start=start, progress=progress)
        finally:
            progress.done()

    if state.json:  # as run's: the shell's stdout goes to stderr, stdout is the report alone
        res = _stdout_to_stderr(session)
        render.emit_json(res.to_dict())
        return int(res.exit_status) or (1 if res.conflicts else 0)
    return _render(session())


@verb(app, no_args_is_help=True)
def mount(
    refs_and_dir: Annotated[
        list[str],
        typer.Argument(
            metavar="REF... DIR",
            help="Refs to project (several stack, the last on top), then the directory",
            autocompletion=complete_ref,
        ),
    ],
    strict: Strict = False,
) -> None:
    """Mount a writable projection of REF on DIR for other programs (real root).

    The session stays mounted, in this mount namespace, until 'veloverlay umount DIR' harvests
    and commits it. Root-free: run a long-lived command in a session instead ('run REF -- sleep
    infinity') and nsenter into it.
    """
    from veloverlay.errors import Reason, VeloError
    from veloverlay.session.core import SessionOptions
    from veloverlay.session.core import mount as do_mount

    if len(refs_and_dir) < 2:
        raise VeloError(
            "give at least one REF and the DIR to mount on",
            reason=Reason.USAGE,
            hint="veloverlay mount REF [REF...] DIR",
        )
    *refs, where = refs_and_dir
    opts = SessionOptions(refs=refs, at=where, backend="overlay", strict=strict)
    res = do_mount(common.store(), opts)
    if state.json:
        render.emit_json(res.to_dict())
        return
    for w in res.warnings:
        render.warn(w)
    render.info(f"mounted {refs[-1]} on {os.path.realpath(where)} (session {res.session_id})")


@verb(app, no_args_is_help=True)
def umount(
    where: Annotated[str, typer.Argument(metavar="DIR", help="Where 'mount' put the session")],
    discard: Discard = False,
    no_commit: NoCommit = False,
    message: Message = None,
) -> None:
    """Unmount a mounted session, then harvest and commit its changes (as a run's end)."""
    from veloverlay.session.core import umount as do_umount

    _one_ending(discard, no_commit, message)
    res = do_umount(common.store(), where, discard=discard, commit=not no_commit, message=message)
    if state.json:
        render.emit_json(res.to_dict())
    else:
        _render(res)


@verb(app)
def sessions(
    clean: Annotated[
        bool, typer.Option("--clean", help="Remove finished session directories")
    ] = False,
) -> None:
    """List sessions (running, unharvested after a crash, finished)."""
    import time

    from veloverlay.session.core import clean_sessions, list_sessions
    from veloverlay.session.state import damaged

    store = common.store()
    if clean:
        n = clean_sessions(store)
        if state.json:
            render.emit_json({"removed": n})
        else:
            render.line(f"removed {n} finished sessions")
        return
    items = list_sessions(store)
    for _sid, exc in damaged(store):  # not listed: say so, on stderr
        render.warn(f"{exc.message}; {exc.hint}")
    if state.json:
        render.emit_json([s.to_dict() for s in items])
        return
    rows = []
    for s in items:
        d = s.to_dict()
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(d.get("start") or 0)))
        rows.append((d["id"], ",".join(d.get("refs", [])), d["state"], start))
    render.table(rows, ("ID", "REFS", "STATE", "START"))


@verb(app)
def harvest(
    resume: Annotated[str | None, typer.Option(help="Harvest this session")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Harvest every unharvested session")] = False,
    set_aside: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help="With --resume: move what the session made too deep to keep (too-deep) into "
            "this new directory, each entry said, and commit the rest",
        ),
    ] = None,
) -> None:
    """Harvest sessions whose manager died (after a crash or kill), or that ended while a
    process outside them could still write (state held), once nothing can."""
    from veloverlay.errors import Reason, VeloError
    from veloverlay.session.core import harvest_resume

    if (resume is None) == (not all_):
        raise VeloError("give --resume ID or --all", reason=Reason.USAGE)
    failed: list[tuple[str, Exception]] = []
    results = harvest_resume(common.store(), resume, failed, set_aside=set_aside)
    if not state.json:
        for r in results:
            _render(r)
    if failed:  # --all: every other session was harvested; each failure is said, the first raised
        for sid, exc in failed:
            said = render.describe(exc)["message"]
            prefix = f"session {sid} could not be harvested: "
            render.warn(said if said.startswith(prefix) else prefix + said)
        if state.json:  # one document: the sessions harvested, the failures, the first's fields
            first = render.describe(failed[0][1])
            first["error"] = first.pop("message")
            report = {
                "harvested": [r.to_dict() for r in results],
                # each failure keyed as every error is (`error`); `message`, the same text,
                # kept: docs/json.md named it so before
                "failed": [
                    {"session_id": sid, "error": d["message"], **d}
                    for sid, d in ((sid, render.describe(e)) for sid, e in failed)
                ],
            }
            render.emit_json({**report, **first})
        raise failed[0][1]
    if state.json:
        render.emit_json([r.to_dict() for r in results])
        return
    render.line(f"harvested {len(results)} sessions")


@verb(app)
def daemon(
    session: Annotated[
        str, typer.Argument(metavar="SESSION", help="The shim session whose journal to commit")
    ],
) -> int:
    """Run a shim session's daemon in the foreground (sessions start their own)."""
    from veloverlay.session.shim.daemon import main as daemon_main

    return daemon_main(common.store().root, session)
