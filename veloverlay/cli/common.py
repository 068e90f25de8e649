"""What every verb shares: the global options, the store they name, and the `verb` decorator.

`--store`, `--debug` and `--json` are options of the top-level group (before the verb) and, added
by `verb`, of every verb (after it); a value given after the verb wins. `VELO_STORE` is read by the
top-level option only, so a verb's own `--store` always wins over it.
"""

import functools
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from veloverlay.cli import render

if TYPE_CHECKING:
    from veloverlay.store.cas import Store
    from veloverlay.verbs.repo import Repo

__all__ = [
    "state",
    "verb",
    "new_app",
    "repo",
    "store",
    "JsonOpt",
    "DebugOpt",
    "StoreOpt",
    "WORDS",
    "Command",
    "Group",
]

_STORE_HELP = "Store directory (default: $XDG_DATA_HOME/veloverlay)"
StoreRootOpt = Annotated[
    str | None,
    typer.Option("--store", metavar="DIR", envvar="VELO_STORE", help=_STORE_HELP, show_envvar=True),
]
StoreOpt = Annotated[str | None, typer.Option("--store", metavar="DIR", help=_STORE_HELP)]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks and the reason slug of failures")
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Machine-readable output (and failures) as JSON on stdout"),
]


class StdoutClosed(Exception):
    """Whoever read our stdout went away (`veloverlay ls | head`): `main` ends quietly."""


class _State:
    store: str | None = None
    debug: bool = False
    json: bool = False


state = _State()

WORDS: list[str] = []  # this command line's words before any `--` (main sets them)


def wants_json() -> bool:
    """`--json` given, also where an eager option (`--help`, `--version`) runs before it is
    parsed: the words say whether it is given."""
    return state.json or "--json" in WORDS


def _help(ctx: Any, _param: Any, value: bool) -> None:
    """`--help` of every command: the help page, or with --json one document `{"help": TEXT}`
    (the plain page) on stdout, as every verb's output with --json is one JSON document."""
    if not value or ctx.resilient_parsing:
        return
    if wants_json():
        cmd = ctx.command
        markup = getattr(cmd, "rich_markup_mode", None)
        cmd.rich_markup_mode = None  # rich would print the page itself, not return it
        try:
            render.emit_json({"help": ctx.get_help() + "\n"})
        finally:
            cmd.rich_markup_mode = markup
    else:
        typer.echo(ctx.get_help(), color=ctx.color)
    ctx.exit()


class _JsonHelp:
    """A command whose `--help` honours `--json` (`_help`)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.callback = _help
        return option


class Command(_JsonHelp, TyperCommand):
    pass


class Group(_JsonHelp, TyperGroup):
    pass


def reset() -> None:
    state.store, state.debug, state.json = None, False, False
    render.reset()


def set_globals(*, store: str | None, debug: bool, as_json: bool) -> None:
    state.debug = state.debug or debug
    state.json = state.json or as_json
    render.machine_output(state.json)
    if store is not None:
        if not store:  # `--store "$UNSET"` must not mean the default store (remove-store, gc)
            from veloverlay.errors import Reason, VeloError

            raise VeloError(
                "--store needs a directory, not an empty string",
                reason=Reason.USAGE,
                hint="leave --store out for the default store",
            )
        state.store = store


def new_app(**kwargs: Any) -> typer.Typer:
    """A typer app with the settings every group of verbs shares (plain help off a terminal)."""
    settings: dict[str, Any] = {
        "add_completion": False,
        "pretty_exceptions_enable": False,
        "rich_markup_mode": "rich" if render.color_enabled(sys.stdout) else None,
        "context_settings": {"help_option_names": ["--help"]},
        "cls": Group,
    }
    settings.update(kwargs)
    return typer.Typer(**settings)


_F = TypeVar("_F", bound=Callable[..., Any])

_GLOBALS = [
    inspect.Parameter("store", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=StoreOpt),
    inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugOpt),
    inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOpt),
]


def verb(app: typer.Typer, name: str | None = None, **kwargs: Any) -> Callable[[_F], _F]:
    """Register `fn` as a verb of `app` with the global options added after its own.

    `fn`'s docstring is its help; it reads `--json` from `state.json`.
    """

    def register(fn: _F) -> _F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, store: str | None, debug: bool, as_json: bool, **kw: Any) -> Any:
            set_globals(store=store, debug=debug, as_json=as_json)
            try:
                return fn(*args, **kw)
            except BrokenPipeError:  # typer would turn it into exit status 1
                raise StdoutClosed() from None

        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        wrapper.__signature__ = sig.replace(parameters=params + _GLOBALS)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {
            **fn.__annotations__,
            **{p.name: p.annotation for p in _GLOBALS},
        }
        kwargs.setdefault("cls", Command)
        app.command(name or fn.__name__.replace("_", "-"), **kwargs)(wrapper)
        return fn

    return register


def versions(*specs: str | None) -> None:
    """Refuse (BAD_REF) a version no store could hold, before any store, lock or network is
    touched: the same reason from every verb, whatever the store holds."""
    from veloverlay.store.versions import check_revision

    for spec in specs:
        if spec is not None:
            check_revision(spec)


def ref_names(*names: str | None) -> None:
    """As `versions`, for refs named as such (to log, delete, roll back or create)."""
    from veloverlay.store.versions import check_ref_name

    for name in names:
        if name is not None:
            check_ref_name(name)


def store_path() -> str:
    from veloverlay.store.cas import default_store_path

    return state.store or str(default_store_path())


def repo(*, create: bool = False, shared: bool = False) -> "Repo":
    from veloverlay.verbs.repo import Repo

    return Repo.open(state.store, create=create, shared=shared)


def store() -> "Store":
    """The store alone, for verbs that open its manifests themselves (sessions, the daemon)."""
    from veloverlay.store.cas import Store

    return Store.open(store_path())


def complete_ref(ctx: typer.Context, incomplete: str) -> list[str]:
    """Ref names for shell completion, from the store the command line names (or the default)."""
    from veloverlay.verbs.repo import Repo

    store = None
    for c in (ctx, *_parents(ctx)):
        store = store or c.params.get("store")
    try:
        r = Repo.open(store)
    except Exception:  # no store, no completion
        return []
    try:
        return [ref.name for ref, _c in r.refs() if ref.name.startswith(incomplete)]
    finally:
        r.close()


def _parents(ctx: typer.Context) -> list[typer.Context]:
    out = []
    while ctx.parent is not None:
        ctx = ctx.parent  # type: ignore[assignment]
        out.append(ctx)
    return out


def seconds(value: float | None) -> float | None:
    """A `--grace` value: a finite number of seconds >= 0 (nan made gc take every young object
    for old, and a session's leftovers get SIGKILL with no grace; inf and negatives are no
    periods either)."""
    import math

    if value is not None and (not math.isfinite(value) or value < 0):
        raise typer.BadParameter(f"{value} is not a number of seconds >= 0")
    return value
