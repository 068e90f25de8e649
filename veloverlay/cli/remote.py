"""Remote verbs: push and pull refs through an OCI registry (docs/remote.md). Each parses, calls
one library verb (veloverlay.remote) and renders; progress shows bytes, rate and ETA."""

import os
from typing import Annotated, Any

import typer

from veloverlay.cli import common, render
from veloverlay.cli.common import complete_ref, state, verb

app = common.new_app()

TlsVerify = Annotated[
    str,
    typer.Option(
        "--tls-verify",
        metavar="true|false",
        help="Verify the registry's TLS certificate (as skopeo and podman: --tls-verify=false)",
    ),
]
CaCert = Annotated[
    str | None, typer.Option("--ca-cert", help="Also trust this CA certificate (PEM file)")
]
AuthFile = Annotated[
    str | None,
    typer.Option(
        "--authfile",
        help="Credentials file (auth.json) [default: $REGISTRY_AUTH_FILE, podman's, docker's]",
    ),
]
Jobs = Annotated[int, typer.Option("--jobs", "-j", help="Parallel transfers", min=1)]


def _options(tls_verify: str, ca_cert: str | None, authfile: str | None, jobs: int) -> Any:
    from veloverlay.errors import Reason, VeloError
    from veloverlay.files import given_path
    from veloverlay.remote import Options

    for option, value in (("--ca-cert", ca_cert), ("--authfile", authfile)):
        if value is not None:  # '' is no file: not "no --ca-cert" (a script's unset variable)
            given_path(value, option, hint=f"name the file, or leave {option} out")
    if tls_verify not in ("true", "false"):
        raise VeloError(
            f"--tls-verify takes true or false, not '{tls_verify}'", reason=Reason.USAGE
        )
    if authfile is not None:
        if not os.path.isfile(authfile):
            raise VeloError(f"no such credentials file {authfile}", reason=Reason.NOT_FOUND)
        os.environ["REGISTRY_AUTH_FILE"] = authfile
    return Options(tls_verify=tls_verify == "true", ca_cert=ca_cert, jobs=jobs)


def _bar(label: str) -> tuple[Any, Any]:
    bar = render.Progress(label, unit="objects")

    def show(t: Any) -> None:
        bar(t.items_done, t.items_total, t.done, t.total)

    return bar, show


@verb(app)
def push(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="REF... REMOTE",
            help="Refs, then HOST[:PORT]/REPO[:TAG] (tag default: each ref's name)",
            autocompletion=complete_ref,
        ),
    ],
    tls_verify: TlsVerify = "true",
    ca_cert: CaCert = None,
    authfile: AuthFile = None,
    jobs: Jobs = 4,
) -> None:
    """Push refs to an OCI registry; only what the tag's current version lacks is uploaded."""
    from veloverlay.errors import Reason, VeloError
    from veloverlay.remote import push as push_refs

    if len(args) < 2:
        raise VeloError(
            "push needs at least one REF and a REMOTE",
            reason=Reason.USAGE,
            hint="veloverlay push REF HOST[:PORT]/REPO[:TAG]",
        )
    common.versions(*args[:-1])
    opts = _options(tls_verify, ca_cert, authfile, jobs)
    repo = common.repo()
    bar, show = _bar("push")
    try:
        results = push_refs(repo.store, repo.m, args[:-1], args[-1], options=opts, progress=show)
    finally:
        bar.done()
    if state.json:
        render.emit_json([r.to_dict() for r in results])
        return
    for r in results:
        render.line(
            f"pushed {r.ref} to {r.remote} ({r.digest[:19]}): {r.objects} objects; uploaded "
            f"{render.human_bytes(r.bytes_uploaded)} in {r.blobs_uploaded} blobs, reused "
            f"{r.packs_reused} packs and {r.large_reused} large objects, mounted {r.blobs_mounted}"
        )
        if not r.noted:
            render.warn(
                f"{r.ref}: pushed, but not noted in the store (it cannot be written now): a "
                f"later pull of {r.remote} into {r.ref} needs --force"
            )


@verb(app)
def pull(
    remote: Annotated[
        str,
        typer.Argument(
            metavar="REMOTE", help="HOST[:PORT]/REPO:TAG or HOST[:PORT]/REPO@sha256:DIGEST"
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name", "-n", help="Ref name [default: the ref the version was pushed from]"
        ),
    ] = None,
    path: Annotated[
        str | None,
        typer.Option(help="Default projection point of the ref [default: none, use --at]"),
    ] = None,
    tls_verify: TlsVerify = "true",
    ca_cert: CaCert = None,
    authfile: AuthFile = None,
    jobs: Jobs = 4,
    keep_setid: Annotated[
        bool, typer.Option("--keep-setid", help="Keep setuid/setgid bits (stripped by default)")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Add the version to an existing ref that did not come from there"
        ),
    ] = False,
) -> None:
    """Pull a version from an OCI registry; only objects the store lacks are fetched, each
    verified before it is stored. An existing ref gets it as a new commit if it came from the
    same registry and repository (else --name another ref, or --force)."""
    from veloverlay.remote import pull as pull_ref

    common.ref_names(name)
    opts = _options(tls_verify, ca_cert, authfile, jobs)
    repo = common.repo(create=True)
    bar, show = _bar("pull")
    try:
        r = pull_ref(
            repo.store,
            repo.m,
            remote,
            name=name,
            path=path,
            options=opts,
            progress=show,
            keep_setid=keep_setid,
            force=force,
        )
    finally:
        bar.done()
    if r.stripped_setid:
        render.warn(f"{r.stripped_setid} setuid/setgid bits stripped (--keep-setid keeps them)")
    if state.json:
        render.emit_json(r.to_dict())
        return
    done = "already up to date" if r.commit is None else f"commit {r.commit[:12]}"
    render.line(
        f"pulled {r.remote} into {r.ref} ({done}): fetched {r.objects_fetched} objects "
        f"({render.human_bytes(r.bytes_fetched)} in {r.blobs_fetched} blobs)"
    )
