"""Store verbs: init, ingest, refs, ls, cat, log, checkout, rollback, export, import and `tiers
explain`. Each parses, calls one library verb and renders."""

import os
import sys
from typing import Annotated, Any

import typer

from veloverlay.cli import common, render
from veloverlay.cli.common import complete_ref, state, verb
from veloverlay.words import exposed, plural

app = common.new_app()
tiers_app = common.new_app(
    help="Tier rules: which files are store symlinks (1) or overlay files (2).",
    no_args_is_help=True,
)
app.add_typer(tiers_app, name="tiers")


@tiers_app.callback()
def _tiers(
    store: common.StoreOpt = None, debug: common.DebugOpt = False, as_json: common.JsonOpt = False
) -> None:
    """The global options after `tiers` too (`tiers --json explain PATH`, `tiers --help --json`)."""
    common.set_globals(store=store, debug=debug, as_json=as_json)


Ref = Annotated[
    str,
    typer.Argument(
        metavar="REF",
        help="A version: REF, REF@{n} (n versions back), REF@SESSION, a tag, or a commit id "
        "(a unique prefix of 4+ hex digits)",
        autocompletion=complete_ref,
    ),
]


@verb(app)
def init(
    shared: Annotated[
        bool,
        typer.Option(
            "--shared",
            help="Let every local user read the store (default: private to you, mode 0700)",
        ),
    ] = False,
) -> None:
    """Create a store (idempotent)."""
    repo = common.repo(create=True, shared=shared)
    if state.json:
        render.emit_json({"store": os.fspath(repo.store.root)})
    else:
        render.line(f"store ready at {render.name(os.fspath(repo.store.root))}")


@verb(app)
def ingest(
    directory: Annotated[str, typer.Argument(metavar="DIRECTORY", help="Directory to ingest")],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Ref name (default: the directory's name)")
    ] = None,
    tiers: Annotated[
        str | None, typer.Option(help="Tier rules file ('<1|2> <glob>' per line)")
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", "-j", help="Worker processes (default: CPUs; at most 4 per CPU)", min=1
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="On conflict with session commits, take the source's version of those paths; "
            "also: make DIRECTORY the ref's next version although the ref came from another "
            "directory",
        ),
    ] = False,
    moved: Annotated[
        bool,
        typer.Option(
            "--moved",
            help="DIRECTORY is the ref's tree, moved from the path the ref records (the new path "
            "is a new version)",
        ),
    ] = False,
    keep_setid: Annotated[
        bool, typer.Option("--keep-setid", help="Keep setuid/setgid bits (stripped by default)")
    ] = False,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message")] = None,
    adopt: Annotated[
        bool,
        typer.Option(
            "--adopt",
            help="Then move DIRECTORY aside (checked unchanged) so sessions can take its place",
        ),
    ] = False,
) -> None:
    """Ingest DIRECTORY into the store as a new version of a ref (incremental on re-ingest).

    A ref that came from another directory is refused (two directories with the same name are
    often different trees) unless --moved or --force says what is meant."""
    from veloverlay.errors import Reason, VeloError
    from veloverlay.ingest.pipeline import ingest as do_ingest
    from veloverlay.tiers import parse_rules

    common.ref_names(name)  # `--name ''` is no name (not the directory's: that is no --name)
    rules = None
    if tiers is not None:  # read before the store is touched: a bad file changes nothing
        from veloverlay.files import given_path

        given_path(tiers, "--tiers", hint="name the rules file, or leave --tiers out")
        try:
            with open(tiers, "rb") as f:
                rules = parse_rules(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise VeloError(f"no tiers file {tiers}", reason=Reason.NOT_FOUND, path=tiers) from None
        except IsADirectoryError:
            raise VeloError(f"{tiers} is a directory", reason=Reason.BAD_PATH, path=tiers) from None
        except UnicodeDecodeError as exc:
            raise VeloError(
                f"the tiers file {tiers} is not UTF-8 (byte {exc.start})",
                reason=Reason.USAGE,
                path=tiers,
            ) from None
    repo = common.repo(create=True)
    ref = name or os.path.basename(os.path.abspath(directory).rstrip("/")) or "root"
    progress = render.Progress("hashing")
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
            moved=moved,
        )
    finally:
        progress.done()
    if state.json:
        render.emit_json(res.to_dict())
        return
    _some(res.skipped, lambda p: f"skipped {p[1]}: {p[0]}", "more skipped")
    if res.stripped_setid:
        render.warn(f"{res.stripped_setid} setuid/setgid bits stripped (--keep-setid keeps them)")
    if res.acl_narrowed:
        n = res.acl_narrowed
        render.warn(
            f"{n} {plural(n, 'file or directory has', 'files or directories have')} "
            "POSIX ACLs, which are not kept: "
            "stored with the group bits the ACL gives the owning group; named user and group "
            "entries and default ACLs are dropped"
        )
    if res.exposed:
        render.warn(
            exposed(res.exposed, "at the source", "mode without o+r, or o+rx for a directory")
            + " (keep private files out of a shared store, or in a private one: 'init' without "
            "--shared)"
        )
    _some(res.overridden, lambda p: f"--force: the source's version replaced the session's at {p}")
    if res.overridden:
        render.info(f"the session's versions stay in the history: veloverlay log {res.ref}")
    rate = res.files / res.seconds if res.seconds else 0
    what = (
        "unchanged"
        if res.unchanged
        else ("merged with session commits" if res.merged else "committed")
    )
    render.line(
        f"{res.ref}: {what} {res.root[:16]}  {res.files} files, {res.dirs} dirs, "
        f"{res.symlinks} symlinks, {render.human_bytes(res.bytes)}; {res.new_objects} new objects "
        f"({render.human_bytes(res.new_bytes)}), "
        f"dedup saved {render.human_bytes(res.bytes - res.new_bytes)}; "
        f"{res.seconds:.2f} s ({rate:,.0f} files/s)"
    )
    if res.moved_from is not None:
        render.line(
            f"{res.ref}: its path is now {render.name(os.path.abspath(directory))} "
            f"(was {render.name(res.moved_from)})"
        )
    if res.adopted_to:
        where = render.name(os.path.abspath(directory))
        render.line(
            f"moved the source aside to {render.name(res.adopted_to)}; {res.ref} now projects "
            f"at {where}"
        )


def _some(items: list[Any], line: Any, more: str = "more paths") -> None:
    for item in items[:20]:
        render.warn(line(item))
    if len(items) > 20:
        render.warn(f"... and {len(items) - 20} {more}")


@verb(app)
def refs(
    delete: Annotated[
        str | None,
        typer.Option(
            help="Delete this ref (its tags stay), saying what gc then frees and from when",
            autocompletion=complete_ref,
        ),
    ] = None,
    grace: Annotated[
        float | None,
        typer.Option(
            help="With --delete: gc's grace period to count with (seconds)  [default: 3600]",
            callback=common.seconds,
        ),
    ] = None,
) -> None:
    """List refs (name, head, root, ingest path)."""
    if grace is not None and delete is None:  # listing has no grace: a --delete was forgotten?
        from veloverlay.errors import Reason, VeloError

        raise VeloError("--grace goes with --delete REF", reason=Reason.USAGE)
    common.versions(delete)
    repo = common.repo()
    if delete is not None:
        from veloverlay.cli.versions import freed

        fp = repo.delete_ref(delete, grace=3600.0 if grace is None else grace)
        if state.json:
            render.emit_json({"deleted": delete, **fp.field_dict()})
            return
        render.line(f"deleted ref {delete}")
        render.line(freed(fp))
        return
    items = repo.refs()
    if state.json:
        render.emit_json(
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
    render.table(
        ((r.name, r.head[:12], c.root[:16], r.path or "-") for r, c in items),
        ("REF", "HEAD", "ROOT", "PATH"),
    )


@verb(app, "ls")
def ls_cmd(
    ref: Ref,
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="Directory or file in the manifest (default: /)")
    ] = "/",
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="List subdirectories too")
    ] = False,
) -> None:
    """List a directory of a manifest."""
    from veloverlay.paths import given_path

    common.versions(ref)
    entries = common.repo().ls(ref, given_path(path), recursive=recursive)
    if state.json:
        render.emit_json([e.to_dict() for e in entries])
        return
    rows = []
    for e in entries:
        name = os.fsdecode(e.path) + ("/" if e.kind == "dir" else "")
        extra = f" -> {e.target}" if e.target else ""
        rows.append(
            (e.kind, f"{e.mode:04o}", e.size, f"T{e.tier}" if e.tier else "-", name + extra)
        )
    render.table(rows)


@verb(app)
def cat(
    ref: Ref,
    path: Annotated[str, typer.Argument(metavar="PATH", help="File in the manifest")],
) -> None:
    """Write a file of a manifest to stdout (with --json, a failure after bytes went out puts its
    JSON on stderr)."""
    from veloverlay.paths import given_path

    common.versions(ref)
    out = render.data_on_stdout()
    repo = common.repo()
    sys.stdout.flush()
    repo.cat(ref, given_path(path), out)
    out.flush()


@verb(app)
def log(
    ref: Ref,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", help="Show at most N commits", min=0)
    ] = None,
) -> None:
    """Show the commit log of a ref, newest first."""
    import time

    common.versions(ref)
    commits = common.repo().log(ref, limit)
    if state.json:
        render.emit_json([c.to_dict() for c in commits])
        return
    for i, c in enumerate(commits):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.time_ns / 1e9))
        sess = f" session={c.session}" if c.session else ""
        render.line(
            f"{ref}@{{{i}}}  {c.id[:12]}  root {c.root[:16]}  {when}  "
            f"+{c.delta_count} ops{sess}  {render.name(c.message)}"
        )


@verb(app)
def checkout(
    ref: Ref,
    dest: Annotated[str, typer.Argument(metavar="DEST", help="A new or empty directory")],
    keep_setid: Annotated[
        bool,
        typer.Option("--keep-setid", help="Write setuid/setgid bits (not written by default)"),
    ] = False,
) -> None:
    """Materialise a manifest as a real tree in DEST (new or empty directory)."""
    common.versions(ref)
    progress = render.Progress("checking out", unit="entries")
    try:
        n = common.repo().checkout(ref, dest, progress=progress, keep_setid=keep_setid)
    finally:
        progress.done()
    if state.json:
        render.emit_json({"ref": ref, "dest": dest, "entries": n})
    else:
        render.line(f"checked out {n} entries into {render.name(dest)}")


@verb(app)
def rollback(
    ref: Ref,
    version: Annotated[
        str,
        typer.Argument(
            metavar="N|VERSION",
            help="N versions back, or a version: a tag, a commit id (prefix), REF@{n}",
            autocompletion=complete_ref,
        ),
    ] = "1",
) -> None:
    """Make an earlier version the new head of REF (as a new commit; history is kept); the
    version's recorded path comes back with its tree."""
    common.versions(ref, None if version.isdigit() else version)
    c = common.repo().rollback(ref, version)
    if state.json:
        render.emit_json(c.to_dict())
    else:
        where = render.name(c.path) if c.path else "-"
        render.line(f"{ref}: now at root {c.root[:16]} (commit {c.id[:12]}), path {where}")


@verb(app, "export")
def export_cmd(
    ref: Ref,
    output: Annotated[str, typer.Option("--output", "-o", help="Bundle file ('-' for stdout)")],
) -> None:
    """Write a self-contained .velo bundle (manifest + objects) of one version."""
    from veloverlay.store.bundle import export_bundle, export_to_path

    common.versions(ref)
    out = render.data_on_stdout() if output == "-" else None
    repo = common.repo()
    if out is not None:
        info = export_bundle(repo.store, repo.m, ref, out, shown="<stdout>")
        return
    info = export_to_path(repo.store, repo.m, ref, output)
    if state.json:
        render.emit_json(info)
    else:
        render.line(
            f"exported {info['ref']} ({info['nodes']} nodes, {info['objects']} objects) to "
            f"{render.name(output)}"
        )


@verb(app, "import")
def import_cmd(
    bundle: Annotated[str, typer.Argument(metavar="BUNDLE", help="Bundle file ('-' for stdin)")],
    name: Annotated[str | None, typer.Option(help="Ref name (default: the bundle's)")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Add as a new version of an existing ref")
    ] = False,
    path: Annotated[
        str | None,
        typer.Option(help="Default projection point of the ref (default: none, use --at)"),
    ] = None,
    keep_setid: Annotated[
        bool, typer.Option("--keep-setid", help="Keep setuid/setgid bits (stripped by default)")
    ] = False,
) -> None:
    """Import a .velo bundle, fully validated before anything is stored."""
    from veloverlay.errors import Reason, VeloError
    from veloverlay.files import given_path
    from veloverlay.store.bundle import import_bundle

    given_path(bundle, "the bundle", hint="name the bundle file ('-' for stdin)")
    common.ref_names(name)
    repo = common.repo(create=True)
    try:
        f = sys.stdin.buffer if bundle == "-" else open(bundle, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise VeloError(f"no such file {bundle}", reason=Reason.NOT_FOUND, path=bundle) from None
    except IsADirectoryError:
        raise VeloError(f"{bundle} is a directory", reason=Reason.BAD_PATH, path=bundle) from None
    with f:
        info = import_bundle(
            repo.store, repo.m, f, name=name, force=force, path=path, keep_setid=keep_setid
        )
    if state.json:
        render.emit_json(info)
        return
    render.line(f"imported {info['ref']} at root {info['root'][:16]}")
    if info.get("stripped_setid"):
        render.warn(
            f"{info['stripped_setid']} setuid/setgid bits stripped (--keep-setid keeps them)"
        )
    if path is None and info.get("bundle_path"):
        where = info["bundle_path"]  # a message: shown as every name in one is
        render.info(
            f"the bundle was ingested at {where}; sessions need --at "
            f"(or import with --path {where})"
        )


@verb(tiers_app, "explain")
def tiers_explain(
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="A path inside a tree, e.g. models/x.gguf")
    ],
    ref: Annotated[
        str | None,
        typer.Option(help="Use the rules stored with this ref", autocompletion=complete_ref),
    ] = None,
) -> None:
    """Say which tier PATH gets, and which rule decided."""
    from veloverlay.paths import given_path

    given_path(path)
    common.versions(ref)
    if ref is not None:
        tier, rule, _rules = common.repo().explain_tier(path, ref)
    else:
        from veloverlay import paths
        from veloverlay.tiers import Rules

        tier, rule = Rules.default().explain(paths.parse_user_path(path))
    if state.json:
        render.emit_json(
            {
                "path": path,
                "tier": tier,
                "rule": rule.glob if rule else None,
                "why": rule.why if rule else "no rule matched: Tier-2",
            }
        )
    elif rule is None:
        render.line(f"{render.name(path)}: tier {tier} (no rule matched)")
    else:
        render.line(
            f"{render.name(path)}: tier {tier} by rule '{rule.tier} {render.name(rule.glob)}'"
            + (f" — {render.name(rule.why)}" if rule.why else "")
        )
