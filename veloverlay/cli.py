"""The `veloverlay` command line: parse (argparse), call one library verb, render.

Parsing needs only the standard library's argparse; each verb imports the library modules it uses
when it runs, so that a command starts fast. `--help` pages keep the layout users know (Usage,
Arguments, Options and Commands sections), drawn by `_help`.

Every failure leaves through `main()`: `error:`/`hint:`/`reason:` on stderr (and a JSON object on
stdout with --json), exit status 1; a command line the parser refuses (unknown verb or option,
missing or malformed argument) is `reason: usage` with exit status 2. `run` passes the command's
own exit status through (127: not found). `--debug` re-raises with a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from veloverlay import ui
from veloverlay.errors import Reason, VeloError

if TYPE_CHECKING:
    from veloverlay.store.cas import Store

_HELP = (
    "Keep file trees in one content-addressed store and project them as live, writable "
    "directories (OverlayFS, as root or root-free). Changes made in a session are harvested "
    "into a new manifest version."
)
_GROUPS = {"tiers": "Tier rules: which files are store symlinks (1) or overlay files (2)."}
_ENVVARS = {"store": "VELO_STORE"}  # option (its dest) -> the environment variable that sets it
_TYPE_NAMES: dict[object, str] = {int: "INTEGER", float: "FLOAT"}  # else TEXT

_state: dict[str, object] = {"store": None, "debug": False, "json": False}
_COMMAND: list[str] = []  # what follows `--` on a `run` command line


# -- the parser --------------------------------------------------------------------------------


class UsageError(Exception):
    """A command line the parser refuses: `reason: usage`, exit status 2."""


class _Help(Exception):
    """`--help` was given: show the help page of `parser` (once parsing has unwound)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


class _HelpAction(argparse.Action):
    # Raises rather than prints: the intermixed parsing of a verb (see `_Parser`) changes the
    # verb's arguments while it runs, and restores them on the way out.
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, help=kwargs.get("help"))

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        raise _Help(parser)


class _Formatter(argparse.HelpFormatter):
    # argparse makes a formatter to check each argument it is given: a fixed width spares it the
    # terminal query (and the import of shutil). Help pages are drawn by `_help`.
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=80)


class _Parser(argparse.ArgumentParser):
    """No `-h`, no abbreviated options, `--help` drawn by `_help`, errors raised (not exits)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(add_help=False, allow_abbrev=False, formatter_class=_Formatter, **kwargs)
        self.add_argument("--help", action=_HelpAction, help="Show this message and exit.")
        self._mixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # A verb takes its options and arguments in any order (`ls REF -r PATH`, `run A --at D B`).
        # argparse does that only in its intermixed mode, which a parser with verbs cannot use,
        # so each verb's own parser switches to it (which calls back here, twice).
        if self._mixing:
            return super().parse_known_args(args, namespace)
        if args is not None:
            args = self._attach_values(args)
        if self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False

    def _attach_values(self, args: Sequence[str]) -> list[str]:
        """`-m -x` as `-m=-x`: an option that takes a value takes the next word, whatever it
        looks like (argparse would take `-x` for an option). Up to the verb, or to `--`."""
        out: list[str] = []
        words = iter(args)
        for word in words:
            out.append(word)
            if word == "--" or (self._subparsers is not None and not word.startswith("-")):
                break
            action = self._option_string_actions.get(word)
            if action is not None and action.nargs is None:
                value = next(words, None)
                if value is not None and value.startswith("-"):
                    out[-1] = f"{word}={value}"
                elif value is not None:
                    out.append(value)
        out.extend(words)
        return out

    def format_usage(self) -> str:
        return f"Usage: {self.prog} {_usage_args(self)}\n"

    def format_help(self) -> str:
        return _help(self)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


_Spec = tuple[tuple[str, ...], dict[str, Any]]  # the arguments of one add_argument call
_F = TypeVar("_F", bound=Callable[..., Any])
# (group, verb) -> the function and its arguments; group None: a verb of `veloverlay` itself
_VERBS: dict[tuple[str | None, str], tuple[Callable[..., Any], tuple[_Spec, ...]]] = {}


def _verb(*specs: _Spec, name: str | None = None, group: str | None = None) -> Callable[[_F], _F]:
    """Make a function a verb (of `group`, e.g. `tiers`): its docstring is its help."""

    def register(fn: _F) -> _F:
        _VERBS[group, name or fn.__name__] = (fn, specs)
        return fn

    return register


def _pos(name: str, **kwargs: Any) -> _Spec:
    return (name,), {"metavar": name.upper(), **kwargs}


def _opt(*names: str, **kwargs: Any) -> _Spec:
    return names, kwargs


def _flag(*names: str, **kwargs: Any) -> _Spec:
    return names, {"action": "store_true", **kwargs}


_JSON = _flag("--json", dest="as_json", help="Machine-readable output on stdout")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the global options, then a verb (`tiers` has verbs of its own)."""
    root = _Parser(prog="veloverlay", description=_HELP)
    root.add_argument("--store", help="Store directory [default: $XDG_DATA_HOME/veloverlay]")
    root.add_argument("--debug", action="store_true", help="Show tracebacks")
    _add_verbs(root, None)
    return root


class _Verbs(dict[str, "argparse.ArgumentParser | None"]):
    """The verbs of a parser, each one's parser built when it is first looked up: a command
    builds the parsers it uses, not all of them (argparse takes ~0.1 ms a parser)."""

    def __init__(self, prog: str, group: str | None) -> None:
        names = [name for g, name in _VERBS if g == group]
        super().__init__(dict.fromkeys(names + (list(_GROUPS) if group is None else [])))
        self.prog = prog
        self.group = group

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        parser = super().__getitem__(name)
        if parser is not None:
            return parser
        if self.group is None and name in _GROUPS:
            parser = _Parser(prog=f"{self.prog} {name}", description=_GROUPS[name])
            _add_verbs(parser, name)
        else:
            fn, specs = _VERBS[self.group, name]
            parser = _Parser(prog=f"{self.prog} {name}", description=fn.__doc__)
            for names, kwargs in specs:
                parser.add_argument(*names, **kwargs)
            parser.set_defaults(_func=fn)
        self[name] = parser
        return parser


def _add_verbs(parser: argparse.ArgumentParser, group: str | None) -> None:
    action = parser.add_subparsers(metavar="COMMAND", prog=parser.prog)
    action.choices = action._name_parser_map = _Verbs(parser.prog, group)  # type: ignore[assignment]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The verbs of a parser (of `build_parser()`, or of its `tiers`), in --help order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            verbs = action.choices
            return {name: verbs[name] for name in verbs}
    return {}


# -- help pages, in the layout they have had since the CLI was built on click -------------------


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    ]


def _arg_name(action: argparse.Action) -> str:
    name = str(action.metavar) + ("..." if action.nargs == "+" else "")
    return name if action.required else f"[{name}]"


def _usage_args(parser: argparse.ArgumentParser) -> str:
    pieces = ["[OPTIONS]"] + [_arg_name(a) for a in _arguments(parser)]
    if parser._subparsers is not None:
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _short_help(text: str, limit: int) -> str:
    """The first sentence of `text` if it fits in `limit`, else as many words as fit, and '...'."""
    words = text.split()
    total = 0
    for i, word in enumerate(words):
        total += len(word) + (i > 0)
        if total > limit:
            break
        if word.endswith("."):
            return " ".join(words[: i + 1])
        if total == limit and i != len(words) - 1:
            break
    else:
        return " ".join(words)
    total += 3
    while i > 0:
        total -= len(words[i]) + 1
        if total <= limit:
            break
        i -= 1
    return " ".join(words[:i]) + "..."


def _help(parser: argparse.ArgumentParser) -> str:
    import shutil
    import textwrap

    width = max(min(shutil.get_terminal_size().columns, 80) - 2, 50)
    prefix, args = f"Usage: {parser.prog} ", _usage_args(parser)
    if width >= len(prefix) + 20:  # the arguments fit to the right of the prefix
        out = [
            textwrap.fill(args, width, initial_indent=prefix, subsequent_indent=" " * len(prefix))
        ]
    else:
        out = [
            prefix,
            textwrap.fill(args, width, initial_indent=" " * 11, subsequent_indent=" " * 11),
        ]
    if parser.description:
        text = " ".join(line.strip() for line in parser.description.strip().splitlines())
        out += ["", textwrap.fill(text, width, initial_indent="  ", subsequent_indent="  ")]

    def section(title: str, rows: list[tuple[str, str]]) -> None:
        first = min(max(len(term) for term, _ in rows), 30) + 2
        out.extend(("", f"{title}:"))
        for term, text in rows:
            lines = textwrap.wrap(text, max(width - first - 2, 10), replace_whitespace=False)
            if not lines:
                out.append(f"  {term}")
                continue
            if len(term) <= first - 2:
                out.append(f"  {term.ljust(first)}{lines[0]}")
            else:
                out.extend((f"  {term}", " " * (first + 2) + lines[0]))
            out.extend(" " * (first + 2) + line for line in lines[1:])

    arguments, options = [], []
    for action in sorted(parser._actions, key=lambda a: isinstance(a, _HelpAction)):  # it's last
        if isinstance(action, argparse._SubParsersAction):
            continue
        extra = [f"env var: {_ENVVARS[action.dest]}"] if action.dest in _ENVVARS else []
        default = action.default
        if (
            default is not None
            and not isinstance(default, bool)
            and default not in ("", argparse.SUPPRESS)
        ):
            extra.append(f"default: {default}")
        if action.required:
            extra.append("required")
        text = action.help or ""
        if extra:
            text = f"{text}  [{'; '.join(extra)}]" if text else f"[{'; '.join(extra)}]"
        if not action.option_strings:
            arguments.append((_arg_name(action), text))
            continue
        names = ", ".join(sorted(action.option_strings, key=lambda s: len(s) - len(s.lstrip("-"))))
        if action.nargs != 0:
            names += " " + _TYPE_NAMES.get(action.type, "TEXT")
        options.append((names, text))
    if arguments:
        section("Arguments", arguments)
    section("Options", options)
    verbs = subcommands(parser)
    if verbs:
        limit = width - 6 - max(len(name) for name in verbs)
        section(
            "Commands", [(n, _short_help(p.description or "", limit)) for n, p in verbs.items()]
        )
    return "\n".join(out) + "\n"


def _repo(*, create: bool = False):  # type: ignore[no-untyped-def]
    from veloverlay.verbs.repo import Repo

    return Repo.open(_state["store"], create=create)  # type: ignore[arg-type]


def _store() -> Store:
    """The store alone, for verbs that open its manifests themselves (sessions, the daemon)."""
    from veloverlay.store.cas import Store, default_store_path

    where = _state["store"]
    return Store.open(where if isinstance(where, str) else default_store_path())


def _json(flag: bool) -> bool:
    _state["json"] = flag
    return flag


# -- store -------------------------------------------------------------------------------------


@_verb(_JSON)
def init(as_json: bool) -> None:
    """Create a store (idempotent)."""
    repo = _repo(create=True)
    if _json(as_json):
        ui.emit_json({"store": os.fspath(repo.store.root)})
    else:
        print(f"store ready at {repo.store.root}")


@_verb(
    _pos("directory", help="Directory to ingest"),
    _opt("--name", "-n", help="Ref name [default: the directory's name]"),
    _opt("--tiers", help="Tier rules file ('<1|2> <glob>' per line)"),
    _opt("--jobs", "-j", type=int, help="Worker processes [default: CPUs]"),
    _flag(
        "--force",
        help="On conflict with session commits, take the source's version of those paths",
    ),
    _flag("--keep-setid", help="Keep setuid/setgid bits (stripped by default)"),
    _opt("--message", "-m"),
    _flag(
        "--adopt",
        help="Then move DIRECTORY aside (checked unchanged) so sessions can take its place",
    ),
    _JSON,
)
def ingest(
    directory: str,
    name: str | None,
    tiers: str | None,
    jobs: int | None,
    force: bool,
    keep_setid: bool,
    message: str | None,
    adopt: bool,
    as_json: bool,
) -> None:
    """Ingest DIRECTORY into the store as a new version of a ref (incremental on re-ingest)."""
    from veloverlay.ingest.pipeline import ingest as do_ingest
    from veloverlay.tiers import parse_rules

    _json(as_json)
    repo = _repo(create=True)
    rules = None
    if tiers is not None:
        try:
            with open(tiers) as f:
                rules = parse_rules(f.read())
        except FileNotFoundError:
            raise VeloError(f"no tiers file {tiers}", reason=Reason.NOT_FOUND) from None
    ref = name or os.path.basename(os.path.abspath(directory).rstrip("/")) or "root"
    progress = ui.Progress("hashing")
    try:
        res = do_ingest(
            repo.store,
            repo.m,
            directory,
            ref,
            rules=rules,
            jobs=jobs,
            force=force,
            keep_setid=keep_setid,
            message=message,
            progress=progress,
            adopt=adopt,
        )
    finally:
        progress.done()
    if as_json:
        ui.emit_json(res.to_dict())
        return
    for path, kind in res.skipped[:20]:
        ui.warn(f"skipped {kind}: {path}")
    if len(res.skipped) > 20:
        ui.warn(f"... and {len(res.skipped) - 20} more skipped")
    if res.stripped_setid:
        ui.warn(f"{res.stripped_setid} setuid/setgid bits stripped (--keep-setid keeps them)")
    for path in res.overridden[:20]:
        ui.warn(f"--force: the source's version replaced the session's at {path}")
    if len(res.overridden) > 20:
        ui.warn(f"... and {len(res.overridden) - 20} more paths")
    if res.overridden:
        ui.info(f"the session's versions stay in the history: veloverlay log {res.ref}")
    rate = res.files / res.seconds if res.seconds else 0
    state = (
        "unchanged"
        if res.unchanged
        else ("merged with session commits" if res.merged else "committed")
    )
    print(
        f"{res.ref}: {state} {res.root[:16]}  {res.files} files, {res.dirs} dirs, "
        f"{res.symlinks} symlinks, {ui.human_bytes(res.bytes)}; {res.new_objects} new objects "
        f"({ui.human_bytes(res.new_bytes)}), "
        f"dedup saved {ui.human_bytes(res.bytes - res.new_bytes)}; "
        f"{res.seconds:.2f} s ({rate:,.0f} files/s)"
    )
    if res.adopted_to:
        print(f"moved the source aside to {res.adopted_to}; {res.ref} now projects at {directory}")


@_verb(_opt("--delete", help="Delete this ref (its objects go at the next gc)"), _JSON)
def refs(delete: str | None, as_json: bool) -> None:
    """List refs (name, head, root, ingest path)."""
    repo = _repo()
    if delete is not None:
        repo.delete_ref(delete)
        print(f"deleted ref {delete}")
        return
    items = repo.refs()
    if _json(as_json):
        ui.emit_json(
            [
                {
                    "name": r.name,
                    "head": r.head,
                    "root": c.root,
                    "path": r.path,
                    "time_ns": c.time_ns,
                }
                for r, c in items
            ]
        )
        return
    ui.table(
        ((r.name, r.head[:12], c.root[:16], r.path or "-") for r, c in items),
        ("REF", "HEAD", "ROOT", "PATH"),
    )


@_verb(
    _pos("ref", help="REF, REF@{n} or REF@SESSION"),
    _pos("path", nargs="?", default=""),
    _flag("--recursive", "-r"),
    _JSON,
    name="ls",
)
def ls_cmd(ref: str, path: str, recursive: bool, as_json: bool) -> None:
    """List a directory of a manifest."""
    entries = _repo().ls(ref, path, recursive=recursive)
    if _json(as_json):
        ui.emit_json([e.to_dict() for e in entries])
        return
    rows = []
    for e in entries:
        name = os.fsdecode(e.path) + ("/" if e.kind == "dir" else "")
        extra = f" -> {e.target}" if e.target else ""
        rows.append(
            (e.kind, f"{e.mode:04o}", e.size, f"T{e.tier}" if e.tier else "-", name + extra)
        )
    ui.table(rows)


@_verb(_pos("ref"), _pos("path"))
def cat(ref: str, path: str) -> None:
    """Write a file of a manifest to stdout."""
    repo = _repo()
    sys.stdout.flush()
    repo.cat(ref, path, sys.stdout.buffer)
    sys.stdout.buffer.flush()


@_verb(_pos("ref"), _opt("--limit", "-n", type=int), _JSON)
def log(ref: str, limit: int | None, as_json: bool) -> None:
    """Show the commit log of a ref, newest first."""
    import time

    commits = _repo().log(ref, limit)
    if _json(as_json):
        ui.emit_json([c.to_dict() for c in commits])
        return
    for i, c in enumerate(commits):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.time_ns / 1e9))
        sess = f" session={c.session}" if c.session else ""
        print(
            f"{ref}@{{{i}}}  {c.id[:12]}  root {c.root[:16]}  {when}  "
            f"+{c.delta_count} ops{sess}  {c.message}"
        )


@_verb(_pos("a"), _pos("b"), _JSON)
def diff(a: str, b: str, as_json: bool) -> None:
    """Show the path operations that turn version A into version B."""
    from veloverlay.verbs.repo import op_to_dict

    ops = _repo().diff(a, b)
    if _json(as_json):
        ui.emit_json([op_to_dict(op) for op in ops])
        return
    sym = {"put": "+", "delete": "-", "meta": "~"}
    for op in ops:
        d = op_to_dict(op)
        print(f"{sym[d['op']]} {d['path'] or '/'}{'  ' + d['kind'] if 'kind' in d else ''}")


@_verb(_pos("ref"), _pos("dest"))
def checkout(ref: str, dest: str) -> None:
    """Materialise a manifest as a real tree in DEST (new or empty directory)."""
    n = _repo().checkout(ref, dest)
    print(f"checked out {n} entries into {dest}")


@_verb(_pos("ref"), _pos("n", nargs="?", type=int, default=1, help="How many versions back"))
def rollback(ref: str, n: int) -> None:
    """Make REF@{N} the new head of REF (as a new commit; history is kept)."""
    c = _repo().rollback(ref, n)
    print(f"{ref}: now at root {c.root[:16]} (commit {c.id[:12]})")


@_verb(
    _pos("ref"),
    _opt("--output", "-o", required=True, help="Bundle file ('-' for stdout)"),
    _JSON,
    name="export",
)
def export_cmd(ref: str, output: str, as_json: bool) -> None:
    """Write a self-contained .velo bundle (manifest + objects) of one version."""
    from veloverlay.store.bundle import export_bundle

    repo = _repo()
    if output == "-":
        info = export_bundle(repo.store, repo.m, ref, sys.stdout.buffer)
    else:
        tmp = output + ".part"
        with open(tmp, "wb") as f:
            info = export_bundle(repo.store, repo.m, ref, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    if _json(as_json) and output != "-":
        ui.emit_json(info)
    elif output != "-":
        print(
            f"exported {info['ref']} ({info['nodes']} nodes, {info['objects']} objects) to {output}"
        )


@_verb(
    _pos("bundle"),
    _opt("--name", help="Ref name [default: the bundle's]"),
    _flag("--force", help="Add as a new version of an existing ref"),
    _opt("--path", help="Default projection point of the ref [default: none, use --at]"),
    _JSON,
    name="import",
)
def import_cmd(bundle: str, name: str | None, force: bool, path: str | None, as_json: bool) -> None:
    """Import a .velo bundle, fully validated before anything is stored."""
    from veloverlay.store.bundle import import_bundle

    repo = _repo(create=True)
    try:
        f = sys.stdin.buffer if bundle == "-" else open(bundle, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise VeloError(f"no such file {bundle}", reason=Reason.NOT_FOUND) from None
    with f:
        info = import_bundle(repo.store, repo.m, f, name=name, force=force, path=path)
    if _json(as_json):
        ui.emit_json(info)
    else:
        print(f"imported {info['ref']} at root {info['root'][:16]}")
        if path is None and info.get("bundle_path"):
            ui.info(
                f"the bundle was ingested at {info['bundle_path']}; sessions need --at "
                f"(or import with --path {info['bundle_path']})"
            )


@_verb(_opt("--jobs", "-j", type=int), _JSON)
def fsck(jobs: int | None, as_json: bool) -> None:
    """Re-hash every object against its name and check every manifest reference."""
    from veloverlay.verbs.fsck import fsck as do_fsck

    repo = _repo()
    progress = ui.Progress("checking objects")
    try:
        rep = do_fsck(repo.store, repo.m, jobs=jobs, progress=progress)
    finally:
        progress.done()
    if _json(as_json):
        ui.emit_json(rep.to_dict())
    else:
        for f in rep.findings:
            print(f"{f.kind}: {f.what}: {f.detail}")
        print(
            f"{'ok' if rep.ok else 'FAILED'}: {rep.objects} objects, {rep.nodes} nodes, "
            f"{rep.commits} commits, {rep.refs} refs, {len(rep.findings)} problems"
        )
    if not rep.ok:
        raise VeloError(
            f"fsck found {len(rep.findings)} problems; first: {rep.findings[0].kind} "
            f"{rep.findings[0].what}",
            reason=Reason.OBJECT_CORRUPT
            if rep.findings[0].kind.startswith("object")
            else Reason.MANIFEST_CORRUPT,
        )


@_verb(
    _opt("--keep", type=int, help="Keep the newest N commits of each ref [default: all]"),
    _opt(
        "--grace",
        type=float,
        default=3600.0,
        help="Never delete objects younger than this (seconds)",
    ),
    _flag("--dry-run", help="Only count what would be deleted"),
    _JSON,
)
def gc(keep: int | None, grace: float, dry_run: bool, as_json: bool) -> None:
    """Delete objects, nodes and commits nothing needs any more."""
    from veloverlay.verbs.gc import gc as do_gc

    repo = _repo()
    rep = do_gc(repo.store, repo.m, keep=keep, grace=grace, dry_run=dry_run)
    if _json(as_json):
        ui.emit_json(rep.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    print(
        f"{verb} {rep.objects_deleted} objects ({ui.human_bytes(rep.bytes_freed)}), "
        f"{rep.nodes_deleted} nodes, {rep.commits_deleted} commits; kept {rep.objects_kept} "
        f"(+{rep.young_kept} younger than the grace period)"
    )


@_verb(_JSON)
def doctor(as_json: bool) -> None:
    """Probe the kernel facilities by trying them, and say which backend would be used and why."""
    from veloverlay import probe
    from veloverlay.store.cas import default_store_path

    caps = probe.detect()
    store_path = _state["store"] or os.fspath(default_store_path())
    store_fs = probe.store_fs_check(str(store_path))
    report = caps.to_dict()
    report["store"] = {"path": store_path, "ok": store_fs.ok, "reason": store_fs.reason}
    from veloverlay.session import select

    # The decision sessions make (session/select.py), over this probe and the store's filesystem.
    feats = {n: (f.ok, f.reason) for n, f in caps.features.items()}
    where = str(store_path)
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)  # a store not made yet: the filesystem it would be on
    xattrs = probe.user_xattrs(where)
    feats["store_xattrs"] = (xattrs.ok, xattrs.reason)
    choice = select.decide(select.Caps(feats))
    backend = choice.backend
    form = choice.form or (f"unavailable ({choice.error})" if choice.error else "-")
    protection = (
        "prevented (store read-only in sessions, chattr +i on objects)"
        if choice.protect
        else "prevented in sessions (read-only store); detected outside (fsck)"
    )
    from veloverlay.session.shim import library as shimlib

    shim_info: dict[str, object]
    try:
        shim_info = {"ok": True, "library": os.fspath(shimlib.library_path())}
    except VeloError as exc:
        shim_info = {"ok": False, "reason": exc.message}
    report["shim"] = shim_info
    from veloverlay.lower import homes

    cache, why_not = homes.base()
    if cache is not None:
        xattrs = probe.user_xattrs(cache)
        cache_ok, cache_why = xattrs.ok, xattrs.reason
    else:
        cache_ok, cache_why = False, why_not
    report["layer_cache"] = {"path": cache, "ok": cache_ok, "reason": cache_why}
    report["chosen"] = {
        "backend": backend,
        "backend_reason": choice.backend_reason,
        "lower_form": form,
        "protection": protection,
    }
    if _json(as_json):
        ui.emit_json(report)
    else:
        print(f"kernel: {caps.kernel}")
        ui.table(
            (
                (name, "yes" if f.ok else "no", f.reason)
                for name, f in sorted(caps.features.items())
            ),
            ("FEATURE", "OK", "REASON"),
        )
        print(f"store: {store_path}: {'ok' if store_fs.ok else 'REFUSED'} ({store_fs.reason})")
        print(f"backend: {backend} ({choice.backend_reason})")
        print(f"lower form: {form}")
        print(
            "data-only layers: "
            + (
                f"per-boot cache {cache} ({cache_why})"
                if cache_ok
                else f"kept in the store ({cache_why})"
            )
        )
        print(f"store protection: {protection}")
        print(
            "shim library: "
            + (
                str(shim_info["library"])
                if shim_info["ok"]
                else f"unavailable ({shim_info['reason']})"
            )
        )
    if not store_fs.ok:
        raise VeloError(f"store refused: {store_fs.reason}", reason=Reason.STORE_ON_NFS)


@_verb(_JSON)
def status(as_json: bool) -> None:
    """Summarise the store: refs, objects, sessions that still need a harvest."""
    from veloverlay.session.core import list_sessions

    repo = _repo()
    items = repo.refs()
    sessions = list_sessions(repo.store)
    objects = sum(1 for _ in repo.store.iter_objects())
    data = {
        "store": os.fspath(repo.store.root),
        "refs": len(items),
        "objects": objects,
        "sessions": [s.to_dict() for s in sessions],
    }
    if _json(as_json):
        ui.emit_json(data)
        return
    print(f"store {data['store']}: {len(items)} refs, {objects} objects")
    for s in sessions:
        d = s.to_dict()
        print(f"session {d['id']}: {d['state']} ({', '.join(d.get('refs', []))})")
        for w in d["warnings"]:  # e.g. baked paths of a tree projected away from its home
            print(f"  warning: {w}")


@_verb(
    _pos("path"),
    _opt("--ref", help="Use the rules stored with this ref"),
    _JSON,
    name="explain",
    group="tiers",
)
def tiers_explain(path: str, ref: str | None, as_json: bool) -> None:
    """Say which tier PATH gets, and which rule decided."""
    tier, rule, _rules = _repo().explain_tier(path, ref) if ref else _explain_default(path)
    if _json(as_json):
        ui.emit_json(
            {
                "path": path,
                "tier": tier,
                "rule": rule.glob if rule else None,
                "why": rule.why if rule else "no rule matched: Tier-2",
            }
        )
        return
    if rule is None:
        print(f"{path}: tier {tier} (no rule matched)")
    else:
        print(
            f"{path}: tier {tier} by rule '{rule.tier} {rule.glob}'"
            + (f" — {rule.why}" if rule.why else "")
        )


def _explain_default(path: str):  # type: ignore[no-untyped-def]
    from veloverlay import paths
    from veloverlay.tiers import Rules

    rules = Rules.default()
    tier, rule = rules.explain(paths.parse_user_path(path))
    return tier, rule, rules


# -- sessions ----------------------------------------------------------------------------------

_AT = _opt("--at", help="Project here [default: the ref's ingest path]")
_BACKEND = _opt("--backend", default="auto", help="auto, overlay or shim")
_NET = _opt("--net", default="host", help="host, or none (a new network namespace with lo)")
_LINK = _flag(
    "--link",
    help="Shim backend: hard links to shared proxies with Break-Before-Write (faster; "
    "writers the shim cannot see are only detected, by fsck)",
)


def _session_options(  # type: ignore[no-untyped-def]
    refs: list[str], *, no_commit: bool, backend: str, net: str, **options: Any
):
    """SessionOptions from a `run`/`enter` command line (its option names are the fields')."""
    from veloverlay.session.core import SessionOptions

    if backend not in ("auto", "overlay", "shim"):
        raise VeloError("--backend is auto, overlay or shim", reason=Reason.USAGE)
    if net not in ("host", "none"):
        raise VeloError("--net is host or none", reason=Reason.USAGE)
    return SessionOptions(refs=refs, commit=not no_commit, backend=backend, net=net, **options)


def _render_session(res, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    d = res.to_dict()
    if as_json:
        ui.emit_json(d)
        return
    for w in d.get("warnings", []):
        ui.warn(w)
    for k in d.get("killed", []):
        ui.warn(f"killed leftover process {k['pid']} ({k['comm']})")
    if d.get("conflict_ref"):
        ui.warn(
            f"conflict: the ref moved and changed the same paths; this session is kept as "
            f"{d['conflict_ref']}"
        )
    elif d.get("commit"):
        ui.info(f"committed {d['changed']} changes (commit {d['commit'][:12]})")


@_verb(
    _pos("refs", nargs="+", help="REF [REF...] -- COMMAND [ARGS...]"),
    _AT,
    _BACKEND,
    _NET,
    _flag("--discard", help="Throw all changes away"),
    _flag("--no-commit", help="Keep changes as REF@SESSION only"),
    _opt("--message", "-m"),
    _flag("--strict", help="Refuse any degraded protection or backend"),
    _flag("--as-root", help="Root-free: appear as uid 0 inside"),
    _opt(
        "--grace",
        type=float,
        default=5.0,
        help="Seconds between SIGTERM and SIGKILL for leftovers",
    ),
    _LINK,
    _JSON,
)
def run(refs: list[str], as_json: bool, **options: Any) -> int:
    """Run a command in a projection of REF (several REFs stack, the last on top)."""
    from veloverlay.session.core import run as do_run

    _json(as_json)
    if not _COMMAND:
        raise VeloError(
            "no command given", reason=Reason.USAGE, hint="veloverlay run REF -- COMMAND [ARGS...]"
        )
    res = do_run(_store(), _session_options(refs, **options), list(_COMMAND))
    _render_session(res, as_json)
    return int(res.exit_status)


@_verb(
    _pos("refs", nargs="+", help="REF [REF...]"),
    _AT,
    _BACKEND,
    _NET,
    _flag("--discard"),
    _flag("--no-commit"),
    _opt("--message", "-m"),
    _flag("--strict"),
    _flag("--as-root"),
    _opt("--grace", type=float, default=5.0),
    _LINK,
)
def enter(refs: list[str], **options: Any) -> int:
    """Open an interactive shell in a projection of REF; changes are committed when it exits."""
    from veloverlay.session.core import enter as do_enter

    res = do_enter(_store(), _session_options(refs, **options))
    _render_session(res, False)
    return int(res.exit_status)


@_verb(_flag("--clean", help="Remove finished session directories"), _JSON)
def sessions(clean: bool, as_json: bool) -> None:
    """List sessions (running, unharvested after a crash, finished)."""
    import time

    from veloverlay.session.core import clean_sessions, list_sessions

    repo = _repo()
    if clean:
        n = clean_sessions(repo.store)
        print(f"removed {n} finished sessions")
        return
    items = list_sessions(repo.store)
    if _json(as_json):
        ui.emit_json([s.to_dict() for s in items])
        return
    rows = []
    for s in items:
        d = s.to_dict()
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(d.get("start") or 0)))
        rows.append((d["id"], ",".join(d.get("refs", [])), d["state"], start))
    ui.table(rows, ("ID", "REFS", "STATE", "START"))


@_verb(
    _opt("--resume", help="Harvest this session"),
    _flag("--all", dest="all_", help="Harvest every unharvested session"),
    _JSON,
)
def harvest(resume: str | None, all_: bool, as_json: bool) -> None:
    """Harvest sessions whose manager died (after a crash or kill)."""
    from veloverlay.session.core import harvest_resume

    if (resume is None) == (not all_):
        raise VeloError("give --resume ID or --all", reason=Reason.USAGE)
    results = harvest_resume(_store(), resume)
    if _json(as_json):
        ui.emit_json([r.to_dict() for r in results])
        return
    for r in results:
        _render_session(r, False)
    print(f"harvested {len(results)} sessions")


@_verb(_pos("session", help="The shim session whose journal to commit"))
def daemon(session: str) -> int:
    """Run a shim session's daemon in the foreground (sessions start their own)."""
    from veloverlay.session.shim.daemon import main as daemon_main

    return daemon_main(_store().root, session)


# -- entry point -------------------------------------------------------------------------------


def _split_command(argv: list[str]) -> list[str]:
    """`run REF... -- CMD`: the command is split off here (argparse would take it for REFs)."""
    _COMMAND.clear()
    if "run" in argv and "--" in argv:
        i = argv.index("--")
        if argv.index("run") < i:
            _COMMAND[:] = argv[i + 1 :]
            return argv[:i]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = _split_command(list(sys.argv[1:] if argv is None else argv))
    # Known before any command runs, so that an error raised before a command reads its own
    # --json flag (e.g. a missing ref in `ls REF --json`) is rendered as JSON too.
    _state["json"] = "--json" in args
    parser = build_parser()
    if not args:
        sys.stdout.write(parser.format_help())
        return 0
    try:
        known, unknown = parser.parse_known_args(args)
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        ns = vars(known)
        if "_func" not in ns:  # `veloverlay --debug`, `veloverlay tiers`
            raise UsageError("missing command")
        func = ns.pop("_func")
        store = ns.pop("store")
        _state["store"] = (os.environ.get("VELO_STORE") or None) if store is None else store
        _state["debug"] = ns.pop("debug")
        rv = func(**ns)
    except UsageError as exc:
        sys.stderr.write(f"error: {exc}\nreason: usage\n")
        return 2
    except _Help as exc:
        sys.stdout.write(exc.parser.format_help())
        return 0
    except VeloError as exc:
        if _state["debug"]:
            raise
        return ui.error(exc, as_json=bool(_state["json"]))
    except OSError as exc:
        if _state["debug"]:
            raise
        return ui.error(exc, as_json=bool(_state["json"]))
    except KeyboardInterrupt:
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
