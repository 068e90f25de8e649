"""The `veloverlay` command line, on typer: parse, call one library verb, render.

The only package that imports typer (and rich, through `render`). One module per group of verbs:
`store` (the store and its manifests), `upkeep` (fsck, gc, status), `versions` (tag,
remove-store), `remote` (push, pull), `diff`, `session` (run, enter and their bookkeeping),
`doctor`; `common` (the options every verb shares), `render` (all output), `man` (the manual
page). A command imports only the module of its verb: the top-level group (`_Verbs`) knows each
verb's module by name and builds that one typer command when the verb is looked up, so
`veloverlay run …` never imports the store verbs, and verb bodies import the library modules they
call.

Global options (`--store`, `--debug`, `--json`) are accepted before and after the verb. Exit
status: 0, 1 for a failure (`error:`/`hint:` on stderr), 2 for a usage error (typer's, or a
`VeloError` with `Reason.USAGE`), 141 when stdout is closed early (`veloverlay ls | head`, as git
does), 130 on Ctrl-C, 128+N on SIGTERM or SIGHUP (after the same clean-up as for Ctrl-C: no
`.part` file or half-made stage left behind); `run`/`enter` pass their command's status through
(127: not found).
`--debug` shows the traceback before the error. A stdin, stdout or stderr closed before the start
(`>&-`) is /dev/null, as in git.
"""

import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import typer

from veloverlay import __version__, progress
from veloverlay.cli import common, render

__all__ = ["main", "entry", "VERBS", "app"]

HELP = (
    "Keep file trees in one content-addressed store and project them as live, writable "
    "directories (OverlayFS, as root or root-free). Changes made in a session are harvested "
    "into a new manifest version."
)

# Each verb and the module that defines it, in the order `--help` lists them.
VERBS: dict[str, str] = {
    "init": "store",
    "ingest": "store",
    "refs": "store",
    "ls": "store",
    "cat": "store",
    "log": "store",
    "diff": "diff",
    "checkout": "store",
    "rollback": "store",
    "export": "store",
    "import": "store",
    "push": "remote",
    "pull": "remote",
    "fsck": "upkeep",
    "gc": "upkeep",
    "status": "upkeep",
    "tag": "versions",
    "remove-store": "versions",
    "tiers": "store",
    "run": "session",
    "enter": "session",
    "sessions": "session",
    "harvest": "session",
    "daemon": "session",
    "mount": "session",
    "umount": "session",
    "doctor": "doctor",
}


class _Commands(Mapping[str, Any]):
    """The verbs by name; a verb's module is imported, and that verb alone built, on lookup."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            self._built[name] = _build(
                name, importlib.import_module(f"{__name__}.{VERBS[name]}").app
            )
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(VERBS)

    def __len__(self) -> int:
        return len(VERBS)


def _build(name: str, verbs: typer.Typer) -> Any:
    """The typer command (or group) `name` of the verb module whose app is `verbs`."""
    for info in verbs.registered_commands:
        if info.name == name:
            return typer.main.get_command_from_info(
                info,
                pretty_exceptions_short=verbs.pretty_exceptions_short,
                rich_markup_mode=verbs.rich_markup_mode,
            )
    for group in verbs.registered_groups:
        if group.name == name and group.typer_instance is not None:
            return typer.main.get_group(group.typer_instance)
    raise KeyError(name)


class _Verbs(common.Group):
    """The top-level group: its commands are `_Commands` (typer suggests from their names)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = _Commands()  # type: ignore[assignment]

    def list_commands(self, ctx: Any) -> list[str]:
        return list(VERBS)


app = common.new_app(cls=_Verbs, help=HELP, add_completion=True, no_args_is_help=True)


def _version(value: bool) -> None:
    if value:  # eager: a --json after it is not parsed yet, so the words say whether it is given
        if common.wants_json():
            render.emit_json({"version": __version__})
        else:
            sys.stdout.write(f"veloverlay {__version__}\n")
        raise typer.Exit()


_WORDS = common.WORDS  # this command line's words before any `--`


def _help_man(ctx: typer.Context, value: bool) -> None:
    if value:
        from veloverlay.cli.man import man_page

        page = man_page(ctx.command, ctx)
        if common.wants_json():  # one JSON document, as --help's `{"help": ...}`
            render.emit_json({"man": page})
        else:
            sys.stdout.write(page)
        raise typer.Exit()


@app.callback()
def _root(
    store: common.StoreRootOpt = None,
    debug: common.DebugOpt = False,
    as_json: common.JsonOpt = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
    help_man: Annotated[
        bool,
        typer.Option(
            "--help-man",
            callback=_help_man,
            is_eager=True,
            help="Print the manual page (roff; try: veloverlay --help-man | man -l -) and exit.",
        ),
    ] = False,
) -> None:
    common.set_globals(store=store, debug=debug, as_json=as_json)


def main(argv: list[str] | None = None) -> int:
    """Run one command line; return its exit status (the console script's entry point)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _open_std_fds()
    common.reset()
    progress.set_notice(render.info)  # a verb waiting for the store lock says for whom
    before = _catch_termination()
    out, err = sys.stdout, sys.stderr
    _WORDS[:] = args[: args.index("--")] if "--" in args else args
    try:
        command = typer.main.get_command(app)
        rv = command.main(args, prog_name="veloverlay", standalone_mode=False)
        sys.stdout.flush()
    except typer.TyperException as exc:  # typer's usage errors (exit 2) and the like
        # A command line typer refused may not have been read up to its --json or --debug.
        common.set_globals(store=None, debug="--debug" in _WORDS, as_json="--json" in _WORDS)
        return _usage(exc)
    except SystemExit as exc:
        if exc.code == 1 and _stdout_gone():  # typer's own EPIPE handling (--help, --version)
            sys.stdout, sys.stderr = out, err  # it put flush-pacifying wrappers in their place
            return _broken_pipe()
        raise
    except BaseException as exc:
        return _failure(exc)
    finally:
        for sig, handler in before.items():  # main() called in-process (tests, a library user)
            signal.signal(sig, handler)
        progress.set_notice(None)
    return rv if isinstance(rv, int) else 0


def entry() -> None:
    """The console script and `python -m veloverlay`: `main`, then the process ends without the
    interpreter's finalization, which only frees what the exit frees anyway. It took 10-16 ms of
    every command here (typer's and click's ~300 modules: `--version` 62.7 against 50.0 ms, a
    warm `run -- true` 108.8 against 92.1, medians of 21). Nothing of ours needs it: no atexit
    hook, every LMDB transaction and lock is released by the verb's own `with`, and the two
    `__del__`s close descriptors. What stdout and stderr buffer is written first; a SystemExit
    out of `main` (not a status it returned) takes the ordinary way out."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left after main's own flush
        code = _broken_pipe()
    except (OSError, ValueError):
        code = code or 1
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code if 0 <= code <= 255 else 1)


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a closed terminal, `kill`, systemd stopping a job) arrived: unwound
    like Ctrl-C, so that what a verb was making is removed by its own clean-up (an export's
    `.part` file, which a later export to the same name refuses to overwrite, a stage) rather
    than left behind by a process that the signal's default action ended at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_ENDING = (signal.SIGTERM, signal.SIGHUP)


def _terminated(signum: int, _frame: object) -> None:
    for sig in _ENDING:  # a second signal ends the process at once, as before
        signal.signal(sig, signal.SIG_DFL)
    raise Terminated(signum)


def _default_in_child() -> None:
    """A forked child (a worker, a probe, a session's namespace child) keeps the default action:
    the unwinding is the command's own process alone."""
    for sig in _ENDING:
        if signal.getsignal(sig) is _terminated:
            signal.signal(sig, signal.SIG_DFL)


def _catch_termination() -> dict[int, Any]:
    """Turn SIGTERM and SIGHUP into `Terminated` where they have their default action (one that
    `nohup` or a parent set to be ignored stays ignored); returns what to restore. Sessions take
    both over while their command runs (reaper.manager_signals) and give them back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers (a library user's thread)
    if not _AT_FORK:
        os.register_at_fork(after_in_child=_default_in_child)
        _AT_FORK.append(True)
    before: dict[int, Any] = {}
    for sig in _ENDING:
        if signal.getsignal(sig) is signal.SIG_DFL:
            before[sig] = signal.signal(sig, _terminated)
    return before


_AT_FORK: list[bool] = []


def _open_std_fds() -> None:
    """A closed stdin, stdout or stderr (`veloverlay ls >&-`) becomes /dev/null, as git does.

    Python leaves `sys.stdout` None for a closed fd 1, and every write would die with a
    traceback; worse, the first file opened afterwards would take the number 1, and a session's
    command would write its output into whatever that file is."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd (0..fd-1 are open)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # what a command started from here inherits
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, errors="backslashreplace", closefd=False))


def _usage(exc: Any) -> int:
    ctx = getattr(exc, "ctx", None)
    message = exc.format_message()
    hint = f"see '{ctx.command_path} --help'" if ctx is not None else None
    if message.startswith("Usage:"):  # no arguments: the help page
        if ctx is None or ctx.parent is None:  # `veloverlay` alone: asked for it, in effect
            sys.stdout.write(message if message.endswith("\n") else message + "\n")
            return 0
        # A verb that needs arguments got none (`run`, `mount`, `tiers`; a script's empty
        # list): nothing was done, so not status 0, and with --json not a help page on stdout.
        if not common.state.json:
            sys.stderr.write(message if message.endswith("\n") else message + "\n")
        message = f"'{ctx.command_path}' needs arguments"
    render.error(
        message,
        hint=hint,
        reason="usage",
        show_reason=common.state.debug,
        as_json=common.state.json,
    )
    return int(getattr(exc, "exit_code", 2))


def _failure(exc: BaseException) -> int:
    from veloverlay.errors import Reason, VeloError

    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        if common.state.json:  # a script parsing stdout gets its one JSON document
            render.emit_json(
                {
                    "error": f"interrupted by {signal.Signals(signum).name}",
                    "reason": render.INTERRUPTED,
                    "hint": None,
                    "detail": None,
                    "path": None,
                }
            )
        return 128 + signum
    if isinstance(exc, (BrokenPipeError, common.StdoutClosed)):
        return _broken_pipe()
    if not isinstance(exc, (VeloError, OSError)) and not common.state.debug:
        raise exc
    if isinstance(exc, FileNotFoundError) and exc.filename is None and _cwd_gone():
        # os.getcwd() (abspath of a relative argument): a bare "[Errno 2]" named nothing.
        exc = VeloError(
            "the current directory no longer exists (deleted or moved away)",
            reason=Reason.BAD_PATH,
            hint="cd to a directory that exists, or give absolute paths",
        )
    if common.state.debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    render.error(
        **render.describe(exc),
        show_reason=common.state.debug,
        as_json=common.state.json,
    )
    if isinstance(exc, VeloError) and exc.reason is Reason.USAGE:
        return 2
    return 1


def _cwd_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll says POLLERR on its write end).
    typer turns an EPIPE met while it writes help or a version itself into SystemExit(1)."""
    import select

    poller = select.poll()
    poller.register(1, select.POLLOUT)
    return any(ev & select.POLLERR for _fd, ev in poller.poll(0))


def _broken_pipe() -> int:
    """The reader went away (`veloverlay ls | head`): stop quietly, as git does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141
