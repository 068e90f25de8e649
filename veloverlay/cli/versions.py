"""Verbs for named versions and the store's life cycle: `tag` and `remove-store`; and what
`refs --delete` and `status` say about disk use (store.py calls `freed` and `disk_lines`)."""

from typing import Annotated, Any

import typer

from veloverlay.cli import common, render
from veloverlay.cli.common import complete_ref, state, verb

app = common.new_app()

_VERSION_HELP = (
    "A version: REF, REF@{n}, another tag, or a commit id (a unique prefix of 4+ hex digits)"
)


@verb(app)
def tag(
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="The tag to make (none: list the tags)")
    ] = None,
    version: Annotated[
        str | None,
        typer.Argument(metavar="VERSION", help=_VERSION_HELP, autocompletion=complete_ref),
    ] = None,
    delete: Annotated[
        str | None, typer.Option(help="Delete this tag (gc may then free its version)")
    ] = None,
    message: Annotated[str, typer.Option("--message", "-m", help="Why this version")] = "",
) -> None:
    """Name a version (a tag): usable wherever a version is taken, and kept by gc whatever
    --keep says, also after its ref is deleted. Without NAME: list the tags."""
    import time

    from veloverlay.errors import Reason, VeloError

    if delete is not None and name is not None:  # which one was meant: delete, or make?
        raise VeloError("--delete takes no NAME VERSION", reason=Reason.USAGE)
    if message and name is None:
        raise VeloError("-m goes with NAME VERSION (the tag made)", reason=Reason.USAGE)
    common.versions(version)
    tag_name = delete if delete is not None else name
    if tag_name is not None:  # a name no tag can have: refused before the store is opened
        from veloverlay.store.versions import check_tag_name

        check_tag_name(tag_name)
    repo = common.repo()
    if delete is not None:
        repo.delete_tag(delete)
        if state.json:
            render.emit_json({"deleted": delete})
        else:
            render.line(f"deleted tag {delete}")
        return
    if name is not None:
        if version is None:
            raise VeloError(
                "name the version to tag", reason=Reason.USAGE, hint="veloverlay tag NAME VERSION"
            )
        t, c = repo.tag(name, version, message=message)
        if state.json:  # the keys of a listed tag: its version's ref and root too
            render.emit_json({**t.to_dict(), "ref": c.ref, "root": c.root})
        else:
            render.line(f"tagged {version} ({t.commit[:12]}) as {t.name}")
        return
    items = repo.tags()
    if state.json:
        render.emit_json([{**t.to_dict(), "ref": c.ref, "root": c.root} for t, c in items])
        return
    render.table(
        (
            (
                t.name,
                t.commit[:12],
                c.ref,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(t.time_ns / 1e9)),
                t.message or "-",
            )
            for t, c in items
        ),
        ("TAG", "COMMIT", "REF", "TAGGED", "MESSAGE"),
    )


@verb(app, "remove-store")
def remove_store_cmd(
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: everything in it is lost")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Also when sessions are live or not yet harvested (their work is lost)"
        ),
    ] = False,
) -> None:
    """Remove the whole store (objects, manifests, layers, sessions, and this user's per-boot
    cache of it), clearing the immutable flags that make 'rm -rf' fail on a root store."""
    from veloverlay.errors import Reason, VeloError
    from veloverlay.verbs.repo import remove_store

    path = common.store_path()
    if not yes:
        raise VeloError(
            f"this removes the store at {path} and everything in it",
            reason=Reason.USAGE,
            hint="add --yes to confirm",
        )
    gone = remove_store(path, force=force)
    if state.json:
        render.emit_json({"removed": path, **gone})
    else:
        render.line(
            f"removed the store at {render.name(path)}: {gone['files']} files, "
            f"{render.human_bytes(gone['bytes'])}"
        )


def freed(fp: Any) -> str:
    """What deleting a ref frees, and when (gc's grace period): `refs --delete`."""
    import time

    if not fp.objects:
        return "nothing to free: other refs, tags or sessions use all of its objects"
    what = f"{fp.objects} objects ({render.human_bytes(fp.bytes)}) only it used"
    if fp.objects_now == fp.objects:
        return f"{what} are freed by the next 'veloverlay gc'"
    when = time.strftime("%H:%M:%S", time.localtime(fp.free_after))
    now = (
        f"; {fp.objects_now} ({render.human_bytes(fp.bytes_now)}) by the next one already"
        if fp.objects_now
        else ""
    )
    return (
        f"{what} are freed by a 'veloverlay gc' from {when} on, when they are older than the "
        f"grace period ({fp.grace:g} s){now}; 'veloverlay gc --grace 0' frees them now"
    )


def disk_lines(disk: dict[str, dict[str, int]]) -> list[str]:
    """`status`: the store's disk use by part, and the per-boot layer cache."""
    parts = ", ".join(
        f"{name} {render.human_bytes(d['bytes'])}"
        for name, d in disk.items()
        if name not in ("total", "per-boot-cache") and d["bytes"]
    )
    out = [f"disk: {render.human_bytes(disk['total']['bytes'])} in the store ({parts})"]
    if "per-boot-cache" in disk:
        cache = disk["per-boot-cache"]
        out.append(
            f"per-boot layer cache: {render.human_bytes(cache['bytes'])} ({cache['files']} files)"
        )
    return out
