"""`diff`: what changed between two versions (M A D T, --name-status, --stat, -p), or what a
running session has changed so far (--session)."""

import os
import sys
from typing import Annotated, Any

import typer

from veloverlay.cli import common, render
from veloverlay.cli.common import complete_ref, state, verb

app = common.new_app()


@verb(app)
def diff(
    a: Annotated[
        str | None,
        typer.Argument(metavar="A", help="The old version", autocompletion=complete_ref),
    ] = None,
    b: Annotated[
        str | None,
        typer.Argument(metavar="B", help="The new version", autocompletion=complete_ref),
    ] = None,
    session: Annotated[
        str | None,
        typer.Option(
            metavar="ID", help="Instead of A and B: what a running session changed so far"
        ),
    ] = None,
    name_status: Annotated[
        bool, typer.Option("--name-status", help="Status letter and path, tab-separated (git's)")
    ] = False,
    stat: Annotated[
        bool, typer.Option("--stat", help="Lines added and removed per file, and a summary")
    ] = False,
    patch: Annotated[
        bool, typer.Option("--patch", "-p", help="The content diff of text files (unified)")
    ] = False,
) -> None:
    """Show what changed from version A to version B: M modified, A added, D deleted, T type
    changed (file <-> symlink). A directory's own mtime is not a change. With --session ID:
    what a running session has changed so far."""
    from veloverlay.errors import Reason, VeloError

    if session is not None:
        if a is not None or stat or patch:
            raise VeloError(
                "--session shows names and status letters only, without A and B",
                reason=Reason.USAGE,
            )
        _live(session, name_status)
        return
    if a is None or b is None:
        raise VeloError("diff needs A and B (or --session ID)", reason=Reason.USAGE)
    repo = common.repo()
    changes = repo.changes(a, b)
    if state.json:
        render.emit_json([_change_dict(repo, c, patch) for c in changes])
        return
    if stat:
        _stat(repo, changes)
    for c in changes:
        name = os.fsdecode(c.path) or "/"
        if name_status:
            print(f"{c.status}\t{name}")
        elif not stat and not patch:
            print(f"{c.status} {name}")
        if patch:
            _patch(repo, c, name)


def _live(session: str, name_status: bool) -> None:
    from veloverlay.session.core import live_changes

    items = live_changes(common.store(), session)
    if state.json:
        render.emit_json([{"status": c, "path": p} for c, p in items])
        return
    for c, p in items:
        print(f"{c}\t{p}" if name_status else f"{c} {p}")


def _change_dict(repo: Any, c: Any, patch: bool) -> dict[str, Any]:
    from veloverlay.verbs.repo import entry_dict

    d: dict[str, Any] = {
        "status": c.status,
        "path": os.fsdecode(c.path),
        "old": entry_dict(c.path, c.old) if c.old is not None else None,
        "new": entry_dict(c.path, c.new) if c.new is not None else None,
    }
    if patch:
        lines = repo.patch(c)
        d["patch"] = None if lines is None else "".join(lines)
    return d


def _patch(repo: Any, c: Any, name: str) -> None:
    out = sys.stdout
    out.write(f"diff --velo a/{name} b/{name}\n")
    if c.old is not None and c.new is not None and c.old.mode != c.new.mode:
        out.write(f"old mode {c.old.mode:o}\nnew mode {c.new.mode:o}\n")
    elif c.old is None and c.new is not None:
        out.write(f"new file mode {c.new.mode:o}\n")
    elif c.new is None and c.old is not None:
        out.write(f"deleted file mode {c.old.mode:o}\n")
    lines = repo.patch(c)
    if lines is None:
        out.write(
            f"Binary files {'a/' + name if c.old else '/dev/null'} and "
            f"{'b/' + name if c.new else '/dev/null'} differ\n"
        )
        return
    for line in lines:
        out.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")


def _stat(repo: Any, changes: list[Any]) -> None:
    rows: list[tuple[str, str, str | tuple[int, int]]] = []
    added = removed = 0
    for c in changes:
        lines = repo.patch(c, context=0)
        name = os.fsdecode(c.path) or "/"
        if lines is None:
            old = c.old.size if c.old is not None else 0
            new = c.new.size if c.new is not None else 0
            rows.append((name, "Bin", f"{old} -> {new} bytes"))
            continue
        plus = sum(1 for x in lines[2:] if x.startswith("+"))
        minus = sum(1 for x in lines[2:] if x.startswith("-"))
        added, removed = added + plus, removed + minus
        rows.append((name, str(plus + minus), (plus, minus)))
    width = max((len(r[0]) for r in rows), default=0)
    most = max((sum(r[2]) for r in rows if isinstance(r[2], tuple)), default=0)
    scale = min(1.0, 40 / most) if most else 1.0  # bars of at most 40 characters, as git's
    for name, n, what in rows:
        if isinstance(what, tuple):
            plus, minus = (max(int(x * scale), 1 if x else 0) for x in what)
            what = "+" * plus + "-" * minus
        print(f" {name.ljust(width)} | {n} {what}".rstrip())
    files = len(rows)
    print(
        f" {files} file{'s' if files != 1 else ''} changed, {added} insertion"
        f"{'s' if added != 1 else ''}(+), {removed} deletion{'s' if removed != 1 else ''}(-)"
    )
