"""`doctor`: probe the kernel facilities by trying them, and say what a session would use here.

The decision is the sessions' own (`session.select.decide`, store xattrs included); this module
only explains it: each feature with what it is for and whether its absence matters on this host.
"""

import os
from typing import Any

from veloverlay.cli import common, render
from veloverlay.cli.common import state, verb
from veloverlay.errors import VeloError

app = common.new_app()

# feature -> (what it is for, who needs it: "root", "rootfree", "shim", "all" or "optional")
PURPOSE: dict[str, tuple[str, str]] = {
    "root": ("real root: mounts outside a user namespace, immutable objects", "optional"),
    "userns": ("user namespaces: every overlay session runs in one", "all"),
    "userns_unrestricted": ("user namespaces not blocked (AppArmor, sysctl)", "rootfree"),
    "overlay_root": ("overlay sessions as root in a user namespace (userxattr)", "root"),
    "overlay_native": (
        "root-native overlay sessions (trusted.overlay.*, directory renames work)",
        "root",
    ),
    "data_only_native": ("data-only layers in root-native sessions", "root"),
    "userns_root": ("root's user namespace: locks a root-native session's mounts", "root"),
    "overlay_userns": ("overlay sessions without root", "rootfree"),
    "data_only_root": ("data-only layers as root: builds write metadata only", "root"),
    "data_only_userns": ("data-only layers without root: builds write metadata only", "rootfree"),
    "fsconfig_fd": ("layers passed by file descriptor (new mount API)", "optional"),
    "lowerdir_append": ("many layers without the mount option length limit", "optional"),
    "whiteout_mknod": ("deleting files inside root-free overlay sessions", "rootfree"),
    "chattr": ("chattr +i: stored objects cannot be changed, even by root", "protect"),
    "fsverity": (
        "fs-verity: the kernel refuses every write to stored objects, root-free",
        "optional",
    ),
    "reflink": ("reflinks: shim sessions copy files without using space", "shim"),
    "fuse": ("/dev/fuse (not used by veloverlay)", "optional"),
    "store_xattrs": ("user xattrs where the store is: overlay keeps its markers there", "all"),
    "store_trusted_xattrs": (
        "trusted xattrs where the store is: root-native overlay keeps its markers there",
        "root",
    ),
}


def _matters(who: str, privileged: bool, backend: str) -> str:
    if who == "all" or (who == "root" and privileged) or (who == "rootfree" and not privileged):
        return "needed" if backend == "overlay" else "for overlay"
    if who == "shim" and backend == "shim":
        return "saves space"
    if who == "protect":
        return "protection" if privileged else "not here"
    if who == "optional":
        return "optional"
    return "not here"


def _protection(store_path: str, protect: bool) -> tuple[str, tuple[bool, str], VeloError | None]:
    """What keeps objects unchanged here, and whether fs-verity does: the store's own answer
    (probed in its tmp/ once per boot, cas.Store.verity); none before the store exists, and
    none in a store this user may not use (the probe writes there: only once it is judged).
    Third: why every verb refuses this store (store-unsafe, store-permission, a newer
    format), or None."""
    from veloverlay.errors import Reason
    from veloverlay.store.cas import Store

    refused = None
    try:
        sealed = Store.open(store_path).verity()
    except VeloError as exc:
        missing = exc.reason is Reason.STORE_MISSING
        refused = None if missing else exc
        sealed = (False, "no store here yet" if missing else f"{exc.message} ({exc.reason.value})")
    if sealed[0]:
        also = "chattr +i on projected objects; " if protect else ""
        text = (
            "prevented (fs-verity on every object: the kernel refuses writes to them, root-free; "
            f"{also}store read-only in sessions)"
        )
    elif protect:
        text = "prevented (store read-only in sessions, chattr +i on objects)"
    else:
        text = "prevented in sessions (read-only store); detected outside (fsck)"
    return text, sealed, refused


def _reserve(store_path: str) -> dict[str, object] | None:
    """The store's space reserve (`reserve.status`); None without a store this user may use."""
    from veloverlay.store import reserve
    from veloverlay.store.cas import Store

    try:
        store = Store.open(store_path)
    except VeloError:
        return None
    try:
        return reserve.status(store)
    finally:
        store.close()


@verb(app)
def doctor() -> None:
    """Probe the kernel facilities by trying them, and say which backend would be used and why."""
    from veloverlay import probe, storefs
    from veloverlay.errors import Reason, VeloError
    from veloverlay.lower import homes
    from veloverlay.session import select
    from veloverlay.session.shim import library as shimlib

    caps = probe.detect()
    store_path = common.store_path()
    store_fs = storefs.store_fs_check(store_path)
    report: dict[str, Any] = caps.to_dict()
    report["store"] = {"path": store_path, "ok": store_fs.ok, "reason": store_fs.reason}
    # The decision sessions make (session/select.py), over this probe and the store's filesystem.
    feats = {n: (f.ok, f.reason) for n, f in caps.features.items()}
    where = store_path
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)  # a store not made yet: the filesystem it would be on
    feats.update(select.store_features(where))
    xattrs = probe.Feature(*feats["store_xattrs"])
    choice = select.decide(select.Caps(feats))
    form = choice.form or (f"unavailable ({choice.error})" if choice.error else "-")
    protection, sealed, refused = _protection(store_path, choice.protect)
    if refused is not None and store_fs.ok:  # its filesystem would do, but no verb may use it
        report["store"].update(ok=False, reason=f"{refused.message} ({refused.reason.value})")
    report["store"]["fsverity"] = {"ok": sealed[0], "reason": sealed[1]}
    report["store"]["reserve"] = _reserve(store_path) if refused is None else None
    shim_info: dict[str, object]
    try:
        shim_info = {"ok": True, "library": os.fspath(shimlib.library_path())}
    except VeloError as exc:
        shim_info = {"ok": False, "reason": exc.message}
    report["shim"] = shim_info
    cache, why_not = homes.base()
    if cache is not None:
        cx = storefs.user_xattrs(cache)
        cache_ok, cache_why = cx.ok, cx.reason
    else:
        cache_ok, cache_why = False, why_not
    report["layer_cache"] = {"path": cache, "ok": cache_ok, "reason": cache_why}
    report["store_xattrs"] = {"ok": xattrs.ok, "reason": xattrs.reason}
    from veloverlay.remote.check import check_remotes
    from veloverlay.store.cas import Store

    report["remotes"] = check_remotes(Store(store_path)) if os.path.isdir(store_path) else []
    report["chosen"] = {
        "backend": choice.backend,
        "backend_reason": choice.backend_reason,
        "lower_form": form,
        "protection": protection,
        "mode": choice.mode or "-",
        "mode_reason": choice.mode_reason,
        "mounts": select.mounts_note(choice),
    }
    rows = []
    features: Any = report["features"]
    for name, (ok, reason) in sorted(feats.items()):
        what, who = PURPOSE.get(name, ("", "optional"))
        matters = _matters(who, choice.privileged, choice.backend)
        entry = features.setdefault(name, {"ok": ok, "reason": reason})
        entry.update(purpose=what, matters=matters)
        rows.append((name, "yes" if ok else "no", matters, what, reason))
    failure = None
    if not store_fs.ok:
        failure = VeloError(f"store refused: {store_fs.reason}", reason=Reason.STORE_ON_NFS)
    elif refused is not None:  # every verb says so: doctor does not call the store fine
        failure = refused
    if state.json:
        render.emit_json(report, failure=failure)
    else:
        _print(report, rows, choice, form, protection, cache_ok, cache, cache_why, shim_info)
    if failure is not None:
        raise failure


def _print(
    report: dict[str, Any],
    rows: list[tuple[str, str, str, str, str]],
    choice: Any,
    form: str,
    protection: str,
    cache_ok: bool,
    cache: str | None,
    cache_why: str,
    shim: dict[str, object],
) -> None:
    who = "as root" if choice.privileged else f"as uid {os.geteuid()} (root-free)"
    render.line(f"kernel: {report['kernel']}, running {who}")
    render.line(f"backend: {choice.backend} ({choice.backend_reason})")
    render.line(f"lower form: {form}")
    if choice.mode:
        render.line(f"overlay mode: {choice.mode} ({choice.mode_reason})")
        render.line(f"session mounts: {report['chosen']['mounts']}")
    layers = f"per-boot cache {render.name(str(cache))}" if cache_ok else "kept in the store"
    render.line(f"data-only layers: {layers} ({cache_why})")
    render.line(f"store protection: {protection}")
    st = report["store"]
    where = render.name(str(st["path"]))
    render.line(f"store: {where}: {'ok' if st['ok'] else 'REFUSED'} ({st['reason']})")
    sealed = st["fsverity"]
    render.line(f"fs-verity on objects: {'yes' if sealed['ok'] else 'no'} ({sealed['reason']})")
    res = st["reserve"]
    if res is not None:
        state = "present" if res["state"] == "present" else str(res["state"]).upper()
        hint = f"; {res['hint']}" if res["hint"] else ""
        render.line(f"space reserve: {state} ({res['reason']}{hint})")
    lib = render.name(str(shim["library"])) if shim["ok"] else f"unavailable ({shim['reason']})"
    render.line(f"shim library: {lib}")
    for r in report["remotes"]:
        who = f", user {r['user']}" if r["user"] else ", no credentials"
        ok = f"reachable, auth {r['auth']}{who}" if r["ok"] else f"UNREACHABLE: {r['reason']}"
        render.line(f"remote {r['registry']}: {ok}")
    render.line()
    render.table(
        ((n, ok, matters, what) for n, ok, matters, what, _r in rows),
        ("FEATURE", "OK", "HERE", "WHAT IT IS FOR"),
    )
    missing = [(n, r) for n, ok, matters, _w, r in rows if ok == "no" and matters != "not here"]
    if missing:
        render.line()
        for n, r in missing:
            render.line(f"{n}: {r}")
