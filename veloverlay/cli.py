"""The `veloverlay` command line: parse, call one library verb, render. The only typer importer.

Every failure leaves through `main()`: `error:`/`hint:`/`reason:` on stderr (and a JSON object on
stdout with --json), exit status 1; `run` passes the command's own exit status through (127: not
found). `--debug` re-raises with a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from . import ui
from .errors import Reason, VeloError

app = typer.Typer(
    name="veloverlay",
    help="Keep file trees in one content-addressed store and project them as live, writable "
    "directories (OverlayFS, as root or root-free). Changes made in a session are harvested "
    "into a new manifest version.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
tiers_app = typer.Typer(help="Tier rules: which files are store symlinks (1) or overlay files (2).")
app.add_typer(tiers_app, name="tiers")

_state: dict[str, object] = {"store": None, "debug": False, "json": False}
_COMMAND: list[str] = []  # what follows `--` on a `run` command line

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store", envvar="VELO_STORE", help="Store directory [default: $XDG_DATA_HOME/veloverlay]"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout")]


@app.callback()
def _root(
    store: StoreOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks")] = False,
) -> None:
    _state["store"] = store
    _state["debug"] = debug


def _repo(*, create: bool = False):  # type: ignore[no-untyped-def]
    from .repo import Repo

    return Repo.open(_state["store"], create=create)  # type: ignore[arg-type]


def _json(flag: bool) -> bool:
    _state["json"] = flag
    return flag


# -- store -------------------------------------------------------------------------------------


@app.command()
def init(as_json: JsonOpt = False) -> None:
    """Create a store (idempotent)."""
    repo = _repo(create=True)
    if _json(as_json):
        ui.emit_json({"store": os.fspath(repo.store.root)})
    else:
        print(f"store ready at {repo.store.root}")


@app.command()
def ingest(
    directory: Annotated[str, typer.Argument(help="Directory to ingest")],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Ref name [default: the directory's name]")
    ] = None,
    tiers: Annotated[
        str | None, typer.Option("--tiers", help="Tier rules file ('<1|2> <glob>' per line)")
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", help="Worker processes [default: CPUs]")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="On conflict with session commits, take the source's version"),
    ] = False,
    keep_setid: Annotated[
        bool, typer.Option("--keep-setid", help="Keep setuid/setgid bits (stripped by default)")
    ] = False,
    message: Annotated[str | None, typer.Option("--message", "-m")] = None,
    adopt: Annotated[
        bool,
        typer.Option(
            "--adopt",
            help="Then move DIRECTORY aside (checked unchanged) so sessions can take its place",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Ingest DIRECTORY into the store as a new version of a ref (incremental on re-ingest)."""
    from .ingest import ingest as do_ingest
    from .tiers import parse_rules

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


@app.command()
def refs(
    delete: Annotated[
        str | None, typer.Option("--delete", help="Delete this ref (its objects go at the next gc)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
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


@app.command("ls")
def ls_cmd(
    ref: Annotated[str, typer.Argument(help="REF, REF@{n} or REF@SESSION")],
    path: Annotated[str, typer.Argument()] = "",
    recursive: Annotated[bool, typer.Option("--recursive", "-r")] = False,
    as_json: JsonOpt = False,
) -> None:
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


@app.command()
def cat(ref: str, path: str) -> None:
    """Write a file of a manifest to stdout."""
    repo = _repo()
    sys.stdout.flush()
    repo.cat(ref, path, sys.stdout.buffer)
    sys.stdout.buffer.flush()


@app.command()
def log(
    ref: str,
    limit: Annotated[int | None, typer.Option("--limit", "-n")] = None,
    as_json: JsonOpt = False,
) -> None:
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


@app.command()
def diff(a: str, b: str, as_json: JsonOpt = False) -> None:
    """Show the path operations that turn version A into version B."""
    from .repo import op_to_dict

    ops = _repo().diff(a, b)
    if _json(as_json):
        ui.emit_json([op_to_dict(op) for op in ops])
        return
    sym = {"put": "+", "delete": "-", "meta": "~"}
    for op in ops:
        d = op_to_dict(op)
        print(f"{sym[d['op']]} {d['path'] or '/'}{'  ' + d['kind'] if 'kind' in d else ''}")


@app.command()
def checkout(ref: str, dest: str) -> None:
    """Materialise a manifest as a real tree in DEST (new or empty directory)."""
    n = _repo().checkout(ref, dest)
    print(f"checked out {n} entries into {dest}")


@app.command()
def rollback(
    ref: str, n: Annotated[int, typer.Argument(help="How many versions back")] = 1
) -> None:
    """Make REF@{N} the new head of REF (as a new commit; history is kept)."""
    c = _repo().rollback(ref, n)
    print(f"{ref}: now at root {c.root[:16]} (commit {c.id[:12]})")


@app.command("export")
def export_cmd(
    ref: str,
    output: Annotated[str, typer.Option("--output", "-o", help="Bundle file ('-' for stdout)")],
    as_json: JsonOpt = False,
) -> None:
    """Write a self-contained .velo bundle (manifest + objects) of one version."""
    from .bundle import export_bundle

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


@app.command("import")
def import_cmd(
    bundle: str,
    name: Annotated[
        str | None, typer.Option("--name", help="Ref name [default: the bundle's]")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Add as a new version of an existing ref")
    ] = False,
    path: Annotated[
        str | None,
        typer.Option(
            "--path", help="Default projection point of the ref [default: none, use --at]"
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a .velo bundle, fully validated before anything is stored."""
    from .bundle import import_bundle

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


@app.command()
def fsck(
    jobs: Annotated[int | None, typer.Option("--jobs", "-j")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every object against its name and check every manifest reference."""
    from .verify import fsck as do_fsck

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


@app.command()
def gc(
    keep: Annotated[
        int | None,
        typer.Option("--keep", help="Keep the newest N commits of each ref [default: all]"),
    ] = None,
    grace: Annotated[
        float, typer.Option("--grace", help="Never delete objects younger than this (seconds)")
    ] = 3600.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be deleted")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete objects, nodes and commits nothing needs any more."""
    from .gc import gc as do_gc

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


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Probe the kernel facilities by trying them, and say which backend would be used and why."""
    from . import probe
    from .cas import default_store_path

    caps = probe.detect()
    store_path = _state["store"] or os.fspath(default_store_path())
    store_fs = probe.store_fs_check(str(store_path))
    report = caps.to_dict()
    report["store"] = {"path": store_path, "ok": store_fs.ok, "reason": store_fs.reason}
    privileged = caps.feature("root").ok
    try:
        form = probe.lower_form(privileged)
    except VeloError as exc:
        form = f"unavailable ({exc.message})"
    overlay_ok = caps.feature("overlay_root" if privileged else "overlay_userns")
    backend = "overlay" if overlay_ok.ok else "shim"
    protection = (
        "prevented (store read-only in sessions, chattr +i on objects)"
        if privileged and caps.feature("chattr").ok
        else "prevented in sessions (read-only store); detected outside (fsck)"
    )
    from . import shim as shimlib

    shim_info: dict[str, object]
    try:
        shim_info = {"ok": True, "library": os.fspath(shimlib.library_path())}
    except VeloError as exc:
        shim_info = {"ok": False, "reason": exc.message}
    report["shim"] = shim_info
    report["chosen"] = {
        "backend": backend,
        "backend_reason": overlay_ok.reason,
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
        print(f"backend: {backend} ({overlay_ok.reason})")
        print(f"lower form: {form}")
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


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Summarise the store: refs, objects, sessions that still need a harvest."""
    from .session import list_sessions

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


@tiers_app.command("explain")
def tiers_explain(
    path: str,
    ref: Annotated[
        str | None, typer.Option("--ref", help="Use the rules stored with this ref")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
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
    from . import paths
    from .tiers import Rules

    rules = Rules.default()
    tier, rule = rules.explain(paths.parse_user_path(path))
    return tier, rule, rules


# -- sessions ----------------------------------------------------------------------------------

AtOpt = Annotated[
    str | None, typer.Option("--at", help="Project here [default: the ref's ingest path]")
]
BackendOpt = Annotated[str, typer.Option("--backend", help="auto, overlay or shim")]
NetOpt = Annotated[
    str, typer.Option("--net", help="host, or none (a new network namespace with lo)")
]


LinkOpt = Annotated[
    bool,
    typer.Option(
        "--link",
        help="Shim backend: hard links to shared proxies with Break-Before-Write (faster; "
        "writers the shim cannot see are only detected, by fsck)",
    ),
]


def _session_options(  # type: ignore[no-untyped-def]
    refs: list[str],
    *,
    at: str | None,
    backend: str,
    net: str,
    discard: bool,
    commit: bool,
    message: str | None,
    strict: bool,
    as_root: bool,
    grace: float,
    link: bool,
):
    from .session import SessionOptions

    if backend not in ("auto", "overlay", "shim"):
        raise VeloError("--backend is auto, overlay or shim", reason=Reason.USAGE)
    if net not in ("host", "none"):
        raise VeloError("--net is host or none", reason=Reason.USAGE)
    return SessionOptions(
        refs=refs,
        at=at,
        backend=backend,
        net=net,
        discard=discard,
        commit=commit,
        message=message,
        strict=strict,
        as_root=as_root,
        grace=grace,
        link=link,
    )


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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    refs: Annotated[list[str], typer.Argument(help="REF [REF...] -- COMMAND [ARGS...]")],
    at: AtOpt = None,
    backend: BackendOpt = "auto",
    net: NetOpt = "host",
    discard: Annotated[bool, typer.Option("--discard", help="Throw all changes away")] = False,
    no_commit: Annotated[
        bool, typer.Option("--no-commit", help="Keep changes as REF@SESSION only")
    ] = False,
    message: Annotated[str | None, typer.Option("--message", "-m")] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Refuse any degraded protection or backend")
    ] = False,
    as_root: Annotated[
        bool, typer.Option("--as-root", help="Root-free: appear as uid 0 inside")
    ] = False,
    grace: Annotated[
        float, typer.Option("--grace", help="Seconds between SIGTERM and SIGKILL for leftovers")
    ] = 5.0,
    link: LinkOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a command in a projection of REF (several REFs stack, the last on top)."""
    from .session import run as do_run

    _json(as_json)
    if not _COMMAND:
        raise VeloError(
            "no command given", reason=Reason.USAGE, hint="veloverlay run REF -- COMMAND [ARGS...]"
        )
    opts = _session_options(
        refs,
        at=at,
        backend=backend,
        net=net,
        discard=discard,
        commit=not no_commit,
        message=message,
        strict=strict,
        as_root=as_root,
        grace=grace,
        link=link,
    )
    res = do_run(_repo().store, opts, list(_COMMAND))
    _render_session(res, as_json)
    raise typer.Exit(res.exit_status)


@app.command()
def enter(
    refs: Annotated[list[str], typer.Argument(help="REF [REF...]")],
    at: AtOpt = None,
    backend: BackendOpt = "auto",
    net: NetOpt = "host",
    discard: Annotated[bool, typer.Option("--discard")] = False,
    no_commit: Annotated[bool, typer.Option("--no-commit")] = False,
    message: Annotated[str | None, typer.Option("--message", "-m")] = None,
    strict: Annotated[bool, typer.Option("--strict")] = False,
    as_root: Annotated[bool, typer.Option("--as-root")] = False,
    grace: Annotated[float, typer.Option("--grace")] = 5.0,
    link: LinkOpt = False,
) -> None:
    """Open an interactive shell in a projection of REF; changes are committed when it exits."""
    from .session import enter as do_enter

    opts = _session_options(
        refs,
        at=at,
        backend=backend,
        net=net,
        discard=discard,
        commit=not no_commit,
        message=message,
        strict=strict,
        as_root=as_root,
        grace=grace,
        link=link,
    )
    res = do_enter(_repo().store, opts)
    _render_session(res, False)
    raise typer.Exit(res.exit_status)


@app.command()
def sessions(
    clean: Annotated[
        bool, typer.Option("--clean", help="Remove finished session directories")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List sessions (running, unharvested after a crash, finished)."""
    import time

    from .session import clean_sessions, list_sessions

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


@app.command()
def harvest(
    resume: Annotated[str | None, typer.Option("--resume", help="Harvest this session")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Harvest every unharvested session")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Harvest sessions whose manager died (after a crash or kill)."""
    from .session import harvest_resume

    if (resume is None) == (not all_):
        raise VeloError("give --resume ID or --all", reason=Reason.USAGE)
    results = harvest_resume(_repo().store, resume)
    if _json(as_json):
        ui.emit_json([r.to_dict() for r in results])
        return
    for r in results:
        _render_session(r, False)
    print(f"harvested {len(results)} sessions")


@app.command()
def daemon(
    session: Annotated[str, typer.Argument(help="The shim session whose journal to commit")],
) -> None:
    """Run a shim session's daemon in the foreground (sessions start their own)."""
    from .daemon import main as daemon_main

    raise typer.Exit(daemon_main(_repo().store.root, session))


# -- entry point -------------------------------------------------------------------------------


def _split_command(argv: list[str]) -> list[str]:
    """`run REF... -- CMD`: click drops the `--`, so the command is split off here."""
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
    try:
        # Without standalone mode, click returns the code of a typer.Exit instead of raising it.
        rv = app(args=args, prog_name="veloverlay", standalone_mode=False)
        if isinstance(rv, int):
            return rv
    except VeloError as exc:
        if _state["debug"]:
            raise
        return ui.error(exc, as_json=bool(_state["json"]))
    except OSError as exc:
        if _state["debug"]:
            raise
        return ui.error(exc, as_json=bool(_state["json"]))
    except typer.Exit as exc:
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # click usage errors and the like
        name = type(exc).__name__
        if name in (
            "UsageError",
            "BadParameter",
            "NoSuchOption",
            "MissingParameter",
            "BadArgumentUsage",
        ):
            fmt = getattr(exc, "format_message", None)
            show = fmt() if fmt is not None else str(exc)
            sys.stderr.write(f"error: {show}\nreason: usage\n")
            return 2
        if name == "Abort":
            return 130
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
