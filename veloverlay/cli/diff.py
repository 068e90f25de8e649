"""`diff`: what changed between two versions (M A D T, --name-status, --stat, -p), or what a
running session has changed so far (--session, with --name-status, --stat and -p too)."""

import functools
import os
import sys
from collections.abc import Callable
from stat import S_IMODE, S_ISDIR, S_ISLNK
from typing import Annotated, Any, NamedTuple

import typer

from veloverlay.cli import common, render
from veloverlay.cli.common import complete_ref, state, verb
from veloverlay.words import plural

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
            metavar="ID",
            help="Instead of A and B: what a running or mounted session changed so far "
            "(--stat, -p too)",
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
        if a is not None:
            raise VeloError("--session ID takes no versions A and B", reason=Reason.USAGE)
        _live(session, name_status, stat, patch)
        return
    if a is None or b is None:
        raise VeloError("diff needs A and B (or --session ID)", reason=Reason.USAGE)
    common.versions(a, b)
    repo = common.repo()
    with repo.reading():  # --stat and -p read objects: gc waits until they are read
        _versions(repo, a, b, name_status, stat, patch)


def _versions(repo: Any, a: str, b: str, name_status: bool, stat: bool, patch: bool) -> None:
    changes = repo.changes(a, b)
    if state.json:
        render.emit_json([_change_dict(repo, c, stat, patch) for c in changes])
        return

    def items(context: int) -> list[_Item]:
        return [
            _Item(
                c.status,
                render.name(os.fsdecode(c.path) or "/"),
                _mode(c.old),
                _mode(c.new),
                c.old.size if c.old is not None else 0,
                c.new.size if c.new is not None else 0,
                functools.partial(repo.patch, c, context=context),
                _mask_note(c.old, c.new),
            )
            for c in changes
        ]

    _show(items, name_status, stat, patch)


def _mode(e: Any) -> int | None:
    """An entry's mode for the patch header, type bits too; None for none, and for a MASK (a
    stack's top ref deleting a lower ref's path: "a deleted path", not "a new file of mode 0")."""
    from veloverlay.store.patch import entry_mode

    return entry_mode(e)


_MASKED = "masked: deletes what the refs below provide at this path"


def _mask_note(old: Any, new: Any) -> str:
    """What `-p` says of a change to or from a MASK, which has no content of its own: the
    deleted (or uncovered) content is a lower ref's, not in this ref's versions."""
    from veloverlay.store.tree import Kind

    if new is not None and new.kind is Kind.MASK:
        return _MASKED
    if old is not None and old.kind is Kind.MASK and new is not None:  # a file where it was
        return "unmasked: this ref's own entry takes the mask's place"
    if old is not None and old.kind is Kind.MASK:
        return "unmasked: what the refs below provide at this path shows again"
    return ""


class _Item(NamedTuple):
    """One change as the human output shows it (of two versions, or of a running session)."""

    status: str
    name: str
    old_mode: int | None
    new_mode: int | None
    old_size: int
    new_size: int
    lines: Callable[[], list[str] | None]  # the unified diff; None: binary or too large
    note: str = ""  # an extended header line: a mask set or removed (`_mask_note`)


def _show(items: Callable[[int], list[_Item]], name_status: bool, stat: bool, patch: bool) -> None:
    """`items(context)`: the changes, their diffs with `context` lines around each hunk."""
    if stat:
        _stat(items(0))
        if not patch and not name_status:
            return
    for it in items(3):
        if name_status:
            render.line(f"{it.status}\t{it.name}")
        elif not stat and not patch:
            render.line(f"{it.status} {it.name}")
        if patch:
            _patch(it)


def _live(session: str, name_status: bool, stat: bool, patch: bool) -> None:
    store = common.store()
    if not stat and not patch:  # names only: the content is not read
        from veloverlay.session.core import live_changes

        names = live_changes(store, session)
        if state.json:
            render.emit_json([{"status": c, "path": p} for c, p in names])
            return
        for c, p in names:
            p = render.name(p)
            render.line(f"{c}\t{p}" if name_status else f"{c} {p}")
        return
    from veloverlay.session.live import live_diff

    if state.json:
        render.emit_json(
            [
                {
                    "status": c.status,
                    "path": os.fsdecode(c.path),
                    "masked": c.masked,
                    **_json_extra(c.patch, stat, patch),
                }
                for c in live_diff(store, session)
            ]
        )
        return

    def items(context: int) -> list[_Item]:
        return [
            _Item(
                c.status,
                render.name(os.fsdecode(c.path) or "/"),
                c.old_mode,
                c.new_mode,
                c.old_size,
                c.new_size,
                functools.partial(_given, c.patch),
                _MASKED if c.masked else "",
            )
            for c in live_diff(store, session, context=context)
        ]

    _show(items, name_status, stat, patch)


def _given(lines: list[str] | None) -> list[str] | None:
    return lines


def _change_dict(repo: Any, c: Any, stat: bool, patch: bool) -> dict[str, Any]:
    from veloverlay.verbs.repo import entry_dict

    return {
        "status": c.status,
        "path": os.fsdecode(c.path),
        "old": entry_dict(c.path, c.old) if c.old is not None else None,
        "new": entry_dict(c.path, c.new) if c.new is not None else None,
        **(_json_extra(repo.patch(c), stat, patch) if stat or patch else {}),
    }


def _json_extra(lines: list[str] | None, stat: bool, patch: bool) -> dict[str, Any]:
    """What --stat and -p add to a change's JSON: `added` and `removed` (the lines --stat
    counts; null for a binary file, which it shows as Bin), and `patch` (null for binary)."""
    d: dict[str, Any] = {}
    if stat:
        counts = _counts(lines)
        d["added"], d["removed"] = counts if counts is not None else (None, None)
    if patch:
        d["patch"] = None if lines is None else "".join(lines)
    return d


def _counts(lines: list[str] | None) -> tuple[int, int] | None:
    """Lines added and removed by a unified diff (its ---/+++ header not counted); None for
    none (a binary file)."""
    if lines is None:
        return None
    body = lines[2:]
    return sum(1 for x in body if x.startswith("+")), sum(1 for x in body if x.startswith("-"))


def _kind(mode: int) -> str:
    """What a patch header calls an entry of this mode (git says `new file mode 120000` for a
    symlink and never shows a directory; ours name the kind and give the permission bits)."""
    return "directory" if S_ISDIR(mode) else "symlink" if S_ISLNK(mode) else "file"


def _patch(it: _Item) -> None:
    out, name = sys.stdout, it.name
    out.write(f"diff --velo a/{name} b/{name}\n")
    old, new = it.old_mode, it.new_mode
    if old is not None and new is not None and _kind(old) != _kind(new):  # T: one goes, one comes
        out.write(f"deleted {_kind(old)} mode {S_IMODE(old):o}\n")
        out.write(f"new {_kind(new)} mode {S_IMODE(new):o}\n")
    elif old is not None and new is not None and S_IMODE(old) != S_IMODE(new):
        out.write(f"old mode {S_IMODE(old):o}\nnew mode {S_IMODE(new):o}\n")
    elif old is None and new is not None:
        out.write(f"new {_kind(new)} mode {S_IMODE(new):o}\n")
    elif new is None and old is not None:
        out.write(f"deleted {_kind(old)} mode {S_IMODE(old):o}\n")
    if it.note:
        out.write(it.note + "\n")
    lines = it.lines()
    if lines is None:
        out.write(
            f"Binary files {'a/' + name if it.old_mode is not None else '/dev/null'} and "
            f"{'b/' + name if it.new_mode is not None else '/dev/null'} differ\n"
        )
        return
    for i, line in enumerate(lines):
        if i < 2:  # the ---/+++ lines name the file: shown as every name is (`render.name`)
            line = render.name(line.rstrip("\n")) + "\n"
        out.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")


def _stat(items: list[_Item]) -> None:
    rows: list[tuple[str, str, str | tuple[int, int]]] = []
    added = removed = 0
    for it in items:
        counts = _counts(it.lines())
        if counts is None:
            rows.append((it.name, "Bin", f"{it.old_size} -> {it.new_size} bytes"))
            continue
        plus, minus = counts
        added, removed = added + plus, removed + minus
        rows.append((it.name, str(plus + minus), (plus, minus)))
    width = max((len(r[0]) for r in rows), default=0)
    most = max((sum(r[2]) for r in rows if isinstance(r[2], tuple)), default=0)
    scale = min(1.0, 40 / most) if most else 1.0  # bars of at most 40 characters, as git's
    for name, n, what in rows:
        if isinstance(what, tuple):
            plus, minus = (max(int(x * scale), 1 if x else 0) for x in what)
            what = "+" * plus + "-" * minus
        render.line(f" {name.ljust(width)} | {n} {what}".rstrip())
    files = len(rows)
    render.line(
        f" {files} {plural(files, 'file')} changed, {added} {plural(added, 'insertion')}(+), "
        f"{removed} {plural(removed, 'deletion')}(-)"
    )
