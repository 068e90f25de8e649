"""The store's health and upkeep: fsck, gc and status. Each parses, calls one library verb and
renders."""

import os
from typing import TYPE_CHECKING, Annotated, Any

import typer

from veloverlay.cli import common, render
from veloverlay.cli.common import state, verb

if TYPE_CHECKING:
    from veloverlay.errors import VeloError
    from veloverlay.verbs.fsck import FsckReport

app = common.new_app()


@verb(app)
def fsck(
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", "-j", help="Worker processes (default: CPUs; at most 4 per CPU)", min=1
        ),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            help="Set corrupt objects aside (quarantine-v1/; the next ingest or pull restores "
            "them), seal objects named before fs-verity was usable here (after re-hashing them) "
            "and give chmod-ed objects their 0444 back"
        ),
    ] = False,
    quick: Annotated[
        bool,
        typer.Option(help="Let the kernel vouch for objects sealed with fs-verity (no re-hash)"),
    ] = False,
) -> None:
    """Re-hash every object against its name and check every manifest reference."""
    from veloverlay.verbs.fsck import fsck as do_fsck

    repo = common.repo()
    progress = render.Progress("checking objects", unit="objects")
    try:
        rep = do_fsck(repo.store, repo.m, jobs=jobs, progress=progress, repair=repair, quick=quick)
    finally:
        progress.done()
    failure = _fsck_failure(rep, repair)
    if state.json:
        render.emit_json(rep.to_dict(), failure=failure)
    else:
        for f in rep.findings:
            render.line(f"{f.kind}: {render.name(f.what)}: {render.name(f.detail)}")
        if rep.sealed or rep.unsealed:
            render.line(
                f"fs-verity: {rep.sealed} objects sealed ({rep.repaired} by this run), "
                f"{rep.unsealed} not"
                + ("" if not rep.unsealed or repair else " (fsck --repair seals them)")
            )
        if rep.mutable or rep.protected or rep.unprotected_record:
            render.line(
                f"chattr +i: {rep.immutable} objects immutable ({rep.protected} by this run), "
                f"{rep.mutable} not"
                + ("" if not rep.mutable or repair else " (fsck --repair sets it)")
                + (
                    f"; {rep.unprotected_record} failures recorded at naming"
                    if rep.unprotected_record
                    else ""
                )
            )
        if rep.quarantined or rep.wanted:
            render.line(
                f"quarantine: {rep.quarantined} corrupt objects set aside by this run; "
                f"{rep.wanted} set aside are still missing"
            )
        render.line(
            f"{'ok' if rep.ok else 'FAILED'}: {rep.objects} objects, {rep.nodes} nodes, "
            f"{rep.commits} commits, {rep.refs} refs, {len(rep.findings)} problems"
        )
    if failure is not None:
        raise failure


def _fsck_failure(rep: "FsckReport", repair: bool) -> "VeloError | None":
    from veloverlay.errors import Reason, VeloError

    if rep.ok:
        return None
    first = rep.findings[0]
    return VeloError(
        f"fsck found {len(rep.findings)} problems; first: {first.kind} {first.what}",
        reason=Reason.OBJECT_CORRUPT
        if first.kind.startswith("object")
        else Reason.MANIFEST_CORRUPT,
        hint=_fsck_hint(rep, repair),
    )


def _fsck_hint(rep: "FsckReport", repair: bool) -> str | None:
    kinds = {f.kind for f in rep.findings}
    if "object-corrupt" in kinds and not repair:
        return (
            "'veloverlay fsck --repair' sets corrupt objects aside (kept in quarantine-v1/); "
            "then ingest their source again or pull the ref again to restore them"
        )
    if "object-missing" in kinds and rep.wanted:
        return (
            "ingest the source of the affected refs again, or pull them again: either "
            "restores missing objects"
        )
    if "object-missing" in kinds:
        return (
            "'veloverlay fsck --repair' marks missing objects wanted; then ingest the source "
            "of the affected refs again, or pull them again, to restore them"
        )
    return None


@verb(app)
def gc(
    keep: Annotated[
        int | None,
        typer.Option(help="Keep the newest N >= 1 commits of each ref (default: all)"),
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            help="Never delete objects younger than this (seconds)", callback=common.seconds
        ),
    ] = 3600.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be deleted")
    ] = False,
    accept_lost_refs: Annotated[
        bool,
        typer.Option(
            "--accept-lost-refs",
            help="Sweep even though the manifests hold fewer refs than the store recorded "
            "(only after checking they were deleted on purpose)",
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="Give up (reason 'locked', nothing done) when the store lock is still held "
            "after this many seconds: every verb started meanwhile waits behind gc",
            callback=common.seconds,
        ),
    ] = 60.0,
) -> None:
    """Delete objects, nodes and commits nothing needs any more."""
    from veloverlay.verbs.gc import gc as do_gc

    repo = common.repo()
    progress = render.Progress("deleting objects", unit="objects")
    try:
        rep = do_gc(
            repo.store,
            repo.m,
            keep=keep,
            grace=grace,
            dry_run=dry_run,
            progress=progress,
            accept_lost_refs=accept_lost_refs,
            waiting=render.info,
            timeout=timeout,
        )
    finally:
        progress.done()
    if state.json:
        render.emit_json(rep.to_dict())
        return
    verb_ = "would delete" if dry_run else "deleted"
    render.line(
        f"{verb_} {rep.objects_deleted} objects ({render.human_bytes(rep.bytes_freed)}), "
        f"{rep.nodes_deleted} nodes, {rep.commits_deleted} commits; kept {rep.objects_kept} "
        f"(+{rep.young_kept} younger than the grace period)"
        + (f"; removed {rep.dirs_removed} empty directories" if rep.dirs_removed else "")
        + (
            f"; removed {rep.quarantine_removed} quarantine entries no ref needs"
            if rep.quarantine_removed
            else ""
        )
        + (
            f"; moved {rep.objects_migrated} objects to the one-level layout (objects-v2)"
            if rep.objects_migrated
            else ""
        )
    )


_FINISHED = ("harvested", "discarded", "failed")


def _session_dict(repo: Any, s: Any) -> dict[str, Any]:
    """A session for `status`: a running (or mounted) one with what it changed so far."""
    from veloverlay.errors import VeloError
    from veloverlay.session.core import live_changes

    d: dict[str, Any] = s.to_dict()
    if s.state in ("running", "mounted"):
        try:
            live = live_changes(repo.store, s.id, repo.m)
            d["changes"] = [{"status": c, "path": p} for c, p in live]
        except VeloError:  # it ended meanwhile
            pass
    return d


@verb(app)
def status() -> None:
    """Summarise the store: refs, objects, disk use by part, and the sessions running (with
    what they changed so far) or still to harvest."""
    from veloverlay.session.core import list_sessions

    repo = common.repo()
    items = repo.refs()
    sessions = [s for s in list_sessions(repo.store) if s.state not in _FINISHED]
    disk = repo.disk_usage()
    objects = disk.get("objects", {}).get("files", 0)
    shown = [_session_dict(repo, s) for s in sessions]
    data = {"store": os.fspath(repo.store.root), "refs": len(items), "objects": objects}
    data["disk"] = disk
    from veloverlay.store.publish import unprotected

    failed = unprotected(repo.store)
    data["unprotected"] = [{"object": n, "errno": e} for n, e in failed]
    data["sessions"] = shown
    if state.json:
        render.emit_json(data)
        return
    render.line(f"store {render.name(str(data['store']))}: {len(items)} refs, {objects} objects")
    from veloverlay.cli.versions import disk_lines

    for line in disk_lines(disk):
        render.line(line)
    objs = sorted({e for n, e in failed if n != "*"})
    if objs:
        count = sum(n != "*" for n, _ in failed)
        render.line(
            f"warning: {count} objects were named without chattr +i ({', '.join(objs)}); "
            "'veloverlay fsck --repair' sets it"
        )
    if any(n == "*" for n, _ in failed):
        render.line(
            "warning: the store's filesystem refused chattr +i: its objects are not immutable"
        )
    for sess, d in zip(sessions, shown, strict=True):
        refs = ", ".join(d.get("refs", []))
        render.line(f"session {d['id']}: {d['state']} ({refs} at {render.name(d['target'])})")
        for w in d["warnings"]:  # e.g. baked paths of a tree projected away from its home
            render.line(f"  warning: {render.name(w)}")
        changes = d.get("changes")
        if changes is not None:
            for c in changes[:20]:
                render.line(f"  {c['status']} {render.name(c['path'])}")
            more = f" ({len(changes) - 20} more)" if len(changes) > 20 else ""
            render.line(
                f"  {len(changes)} changes so far{more}: veloverlay diff --session {sess.id}"
            )
        elif d["state"] == "dead-unharvested":
            render.line(f"  its manager died: veloverlay harvest --resume {sess.id}")
        elif d["state"] == "held":
            render.line(
                "  ended, but processes outside it can still write its projection: "
                f"veloverlay harvest --resume {sess.id} once they are done"
            )
