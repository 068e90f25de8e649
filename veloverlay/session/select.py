"""The one decision of which backend and lower form a session gets, and why.

Sessions, `doctor` and the tests all ask here. The probe's answers (`probe.detect()`: it forks
and mounts, ~20 ms, and importing it costs too) are cached per boot, kernel and euid in the store
(`trees-v1/probe-<euid>.json`), with one more feature, `store_xattrs`: whether the store's
filesystem holds user xattrs (overlay keeps its markers there), checked where the store is now.
An answer in which a probe ran out of space or memory (ENOSPC, EDQUOT, ENOMEM: any local user can
fill /dev/shm) is not cached: the next session probes again.

The rule (DESIGN.md "Projection", "Backends"): overlay where this host can mount it for this
privilege level and the store holds user xattrs, else the shim; the lower form is data-only where
the probe could mount it, else proxy links; `VELO_FORCE_LOWER` forces a form (and fails when that
form is unavailable). Nothing here reads a kernel version.

The overlay mode: real root (CAP_SYS_ADMIN in the initial user namespace) gets the *root-native*
mount where the probe could make one (`overlay_native`: a private mount namespace of the initial
user namespace, trusted.overlay.* xattrs, redirect_dir=on, a lower directory renamed): directory
renames work, and it needs no user namespace to mount (Linux 5.10, user.max_user_namespaces=0).
Everyone else, and root where it failed, gets the *userns* mount (`userxattr`; directory renames
are EXDEV). `VELO_OVERLAY_MODE=native|userns` forces one (tests, benchmarks; an impossible one is
an error, never a silent fallback).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping

from veloverlay.errors import Reason, VeloError
from veloverlay.files import read_regular, write_json_atomic
from veloverlay.records import Record
from veloverlay.store.cas import Store

__all__ = [
    "Caps",
    "Choice",
    "LOWER_FORMS",
    "MODES",
    "capabilities",
    "choose_form",
    "decide",
    "mounts_note",
]

LOWER_FORMS = ("data-only", "links")
MODES = ("native", "userns")
Features = Mapping[str, tuple[bool, str]]


class Caps:
    """The probe's answers: feature -> (ok, reason)."""

    def __init__(self, features: dict[str, tuple[bool, str]]) -> None:
        self.features = features

    def ok(self, name: str) -> bool:
        return self.features.get(name, (False, ""))[0]

    def reason(self, name: str) -> str:
        return self.features.get(name, (False, f"unknown feature '{name}'"))[1]


class Choice(Record, frozen=True):
    backend: str  # overlay | shim
    backend_reason: str
    privileged: bool  # real root (CAP_SYS_ADMIN in the initial namespace)
    form: str | None = None  # overlay: data-only | links; None for the shim or when unavailable
    form_forced: bool = False
    protect: bool = False  # objects can get chattr +i here
    mode: str = ""  # overlay: native (root, trusted.overlay.*) | userns (userxattr); shim: ""
    mode_reason: str = ""
    # native: a nested user namespace locks the session's mounts for the command (else, with no
    # user namespaces on this host, the command runs as real root and could unmount them)
    locked: bool = True
    # Why an overlay session cannot start after all (asked for where it is impossible, or
    # VELO_FORCE_LOWER names an unavailable form): the error a session raises, with its reason.
    error: str = ""
    error_reason: str = ""
    error_hint: str = ""

    def raise_error(self) -> None:
        if self.error:
            raise VeloError(
                self.error, reason=Reason(self.error_reason), hint=self.error_hint or None
            )


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def store_features(where: str | os.PathLike[str]) -> dict[str, tuple[bool, str]]:
    """What the store's filesystem holds: user xattrs (`store_xattrs`: the markers of overlay
    with userxattr) and, for real root, trusted ones (`store_trusted_xattrs`: the root-native
    overlay's; tmpfs before Linux 6.6 has these and not the others)."""
    from veloverlay import storefs

    out = {}
    for name, namespace in (("store_xattrs", "user"), ("store_trusted_xattrs", "trusted")):
        if namespace == "trusted" and os.geteuid() != 0:
            out[name] = (False, "trusted xattrs are real root's")
            continue
        f = storefs.user_xattrs(where, namespace)
        out[name] = (f.ok, f.reason)
    return out


def capabilities(store: Store) -> Caps:
    """The probe's answers for this store (cached; probed afresh once per boot/kernel/euid)."""
    path = store.trees / f"probe-{os.geteuid()}.json"
    key = {
        "boot_id": _boot_id(),
        "kernel": os.uname().release,
        "store_dev": os.stat(store.sessions).st_dev,
        "v": 2,  # v2: store_trusted_xattrs
    }
    # OSError: no cache yet, or none this user may read (another user's shared store)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(read_regular(path))
        if data["key"] == key:
            return Caps({n: (bool(v[0]), str(v[1])) for n, v in data["features"].items()})

    # Probe afresh: a cached answer of this process may predate a change of identity.
    from veloverlay import probe

    caps = probe.detect(refresh=True)
    feats = {n: (f.ok, f.reason) for n, f in caps.features.items()}
    feats.update(store_features(store.sessions))
    if not any(_short_of_room(why) for ok, why in feats.values() if not ok):
        from veloverlay.store.manifest import Manifests

        Manifests(store).close()  # a store of a newer schema is refused before this writes in it
        with contextlib.suppress(OSError):
            write_json_atomic(path, {"key": key, "kernel": caps.kernel, "features": feats})
    return Caps(feats)


# A probe that failed for want of space or memory says what the machine lacked at that moment,
# not what it can do (any local user can fill /dev/shm, where the probes work): such answers
# serve this process only, never the rest of the boot. `unshare: ENOSPC` is this user's own
# namespace limit (the limits count per user), not another user's doing: kept.
_SHORT = re.compile(r"\b(ENOSPC|EDQUOT|ENOMEM)\b")


def _short_of_room(reason: str) -> bool:
    return not reason.startswith("unshare") and _SHORT.search(reason) is not None


def choose_form(caps: Caps, privileged: bool, mode: str = "userns") -> tuple[str, bool]:
    """(form, forced): VELO_FORCE_LOWER if set (raises when unavailable), else data-only where
    the probe could mount it for this privilege level and mode, else links (raises when
    neither)."""
    suffix = "native" if mode == "native" else "root" if privileged else "userns"
    data_only = (caps.ok("data_only_" + suffix), caps.reason("data_only_" + suffix))
    links = (caps.ok("overlay_" + suffix), caps.reason("overlay_" + suffix))
    forced = os.environ.get("VELO_FORCE_LOWER", "").strip()
    if forced:
        if forced not in LOWER_FORMS:
            raise VeloError(
                f"VELO_FORCE_LOWER='{forced}' is not one of {', '.join(LOWER_FORMS)}",
                reason=Reason.USAGE,
            )
        needed = data_only if forced == "data-only" else links
        if not needed[0]:
            raise VeloError(
                f"VELO_FORCE_LOWER={forced} but that lower form is unavailable: {needed[1]}",
                reason=Reason.OVERLAY_UNSUPPORTED,
            )
        return forced, True
    if data_only[0]:
        return "data-only", False
    if links[0]:
        return "links", False
    raise VeloError(
        f"this host cannot mount an overlay {'as root' if privileged else 'root-free'}: {links[1]}",
        reason=Reason.BACKEND_UNAVAILABLE,
        hint="use the shim backend (--backend shim)",
    )


def decide(caps: Caps, requested: str = "auto") -> Choice:
    """The backend (and lower form) a session asking for `requested` gets with `caps`."""
    if requested not in ("auto", "overlay", "shim"):
        raise VeloError(f"unknown backend '{requested}'", reason=Reason.USAGE)
    privileged = caps.ok("root")
    protect = privileged and caps.ok("chattr")
    if requested == "shim":
        return Choice("shim", "asked for", privileged, protect=protect)
    mode, mode_reason, mode_error = _mode(caps, privileged)
    if mode_error:
        return Choice(
            "overlay",
            "asked for",
            privileged,
            protect=protect,
            error=mode_error,
            error_reason=Reason.BACKEND_UNAVAILABLE.value,
            error_hint="unset VELO_OVERLAY_MODE to let the probe choose",
        )
    feature = (
        "overlay_native"
        if mode == "native"
        else ("overlay_root" if privileged else "overlay_userns")
    )
    extra = {
        "mode": mode,
        "mode_reason": mode_reason,
        "locked": mode != "native" or caps.ok("userns_root"),
    }
    if not caps.ok(feature):
        why = caps.reason(feature)
        error = f"overlay sessions are not possible here: {why}"
        hint = "use the shim backend (--backend shim or auto)"
    elif not caps.ok(xattrs := "store_trusted_xattrs" if mode == "native" else "store_xattrs"):
        why = caps.reason(xattrs)
        kind = "trusted" if mode == "native" else "user"
        error = f"overlay sessions need {kind} xattrs on the store's filesystem: {why}"
        hint = "keep the store on ext4/xfs/btrfs (or tmpfs on Linux >= 6.6), or use the shim"
    else:
        why, error, hint = caps.reason(feature), "", ""
    if error:
        if requested == "auto":
            return Choice("shim", why, privileged, protect=protect)
        return Choice(
            "overlay",
            "asked for",
            privileged,
            protect=protect,
            **extra,  # type: ignore[arg-type]
            error=error,
            error_reason=Reason.BACKEND_UNAVAILABLE.value,
            error_hint=hint,
        )
    if requested == "overlay":
        why = "asked for"
    try:
        form, forced = choose_form(caps, privileged, mode)
    except VeloError as exc:
        return Choice(
            "overlay",
            why,
            privileged,
            protect=protect,
            **extra,  # type: ignore[arg-type]
            error=exc.message,
            error_reason=exc.reason.value,
            error_hint=exc.hint or "",
        )
    return Choice(
        "overlay",
        why,
        privileged,
        form,
        forced,
        protect=protect,
        **extra,  # type: ignore[arg-type]
    )


def mounts_note(choice: Choice) -> str:
    """What holds for the session's mounts (doctor, docs): who could undo them."""
    if choice.backend != "overlay":
        return "no mounts (the shim materialises the tree)"
    if choice.mode == "native":
        if choice.locked:
            return (
                "mounted in a private mount namespace of the initial user namespace, then "
                "locked: the command runs in a nested user namespace and can neither unmount "
                "the overlay nor remount the store writable; root outside can still see and "
                "enter the namespace (nsenter)"
            )
        return (
            "mounted in a private mount namespace of the initial user namespace, NOT locked "
            "(no user namespaces here): the command runs as real root there and could unmount "
            "the overlay or remount the store writable"
        )
    return (
        "mounted inside the session's user namespace and locked by a nested one: the command "
        "can neither unmount the overlay nor remount the store writable"
    )


def _mode(caps: Caps, privileged: bool) -> tuple[str, str, str]:
    """(mode, why, error): native for real root where the probe mounted it, else userns;
    VELO_OVERLAY_MODE forces one (error when impossible)."""
    forced = os.environ.get("VELO_OVERLAY_MODE", "").strip()
    if forced and forced not in MODES:
        raise VeloError(
            f"VELO_OVERLAY_MODE='{forced}' is not one of {', '.join(MODES)}", reason=Reason.USAGE
        )
    native_ok = privileged and caps.ok("overlay_native")
    native_why = caps.reason("overlay_native") if privileged else "not real root"
    if forced == "userns":
        return "userns", "forced by VELO_OVERLAY_MODE", ""
    if forced == "native":
        if not native_ok:
            return "native", "", f"VELO_OVERLAY_MODE=native is impossible here: {native_why}"
        return "native", "forced by VELO_OVERLAY_MODE", ""
    if native_ok:
        return "native", f"real root: {native_why}", ""
    return "userns", f"root-native overlay unavailable: {native_why}", ""
