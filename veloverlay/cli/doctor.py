"""`doctor`: probe the kernel facilities by trying them, and say what a session would use."""

import os

from . import common, render
from .common import state, verb

app = common.new_app()


@verb(app)
def doctor() -> None:
    """Probe the kernel facilities by trying them, and say which backend would be used and why."""
    from .. import probe
    from ..errors import Reason, VeloError

    caps = probe.detect()
    store_path = common.store_path()
    store_fs = probe.store_fs_check(store_path)
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
    from .. import shim as shimlib

    shim_info: dict[str, object]
    try:
        shim_info = {"ok": True, "library": os.fspath(shimlib.library_path())}
    except VeloError as exc:
        shim_info = {"ok": False, "reason": exc.message}
    report["shim"] = shim_info
    from .. import volatile

    cache, why_not = volatile.base()
    if cache is not None:
        xattrs = probe.user_xattrs(cache)
        cache_ok, cache_why = xattrs.ok, xattrs.reason
    else:
        cache_ok, cache_why = False, why_not
    report["layer_cache"] = {"path": cache, "ok": cache_ok, "reason": cache_why}
    report["chosen"] = {
        "backend": backend,
        "backend_reason": overlay_ok.reason,
        "lower_form": form,
        "protection": protection,
    }
    if state.json:
        render.emit_json(report)
    else:
        print(f"kernel: {caps.kernel}")
        render.table(
            (
                (name, "yes" if f.ok else "no", f.reason)
                for name, f in sorted(caps.features.items())
            ),
            ("FEATURE", "OK", "REASON"),
        )
        print(f"store: {store_path}: {'ok' if store_fs.ok else 'REFUSED'} ({store_fs.reason})")
        print(f"backend: {backend} ({overlay_ok.reason})")
        print(f"lower form: {form}")
        layers = f"per-boot cache {cache}" if cache_ok else "kept in the store"
        print(f"data-only layers: {layers} ({cache_why})")
        print(f"store protection: {protection}")
        lib = shim_info["library"] if shim_info["ok"] else f"unavailable ({shim_info['reason']})"
        print(f"shim library: {lib}")
    if not store_fs.ok:
        raise VeloError(f"store refused: {store_fs.reason}", reason=Reason.STORE_ON_NFS)
