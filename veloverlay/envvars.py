"""Every environment variable veloverlay reads, with its meaning (the README table follows this)."""

from __future__ import annotations

import os

from veloverlay.errors import Reason, VeloError

__all__ = ["VARS", "get", "get_int", "home", "xdg_dir"]

VARS: dict[str, str] = {
    "VELO_STORE": "store directory (after --store; default $XDG_DATA_HOME/veloverlay; set but "
    "empty: refused, as --store '' is)",
    "VELO_FORCE_LOWER": "force the lower-layer form: 'links' or 'data-only'",
    "VELO_OVERLAY_MODE": "force the overlay mode: 'native' (real root: trusted.overlay.*, "
    "directory renames work) or 'userns' (userxattr, as root-free)",
    "VELO_MAP_SIZE": "LMDB map size in bytes for a new environment (default 64 GiB, sparse; "
    "under an address-space limit, ulimit -v, a quarter of it)",
    "VELO_RUNTIME_DIR": "per-boot cache of data-only lower layers: DIR/veloverlay-UID (default "
    "/run/veloverlay as root, else $XDG_RUNTIME_DIR/veloverlay or /dev/shm/veloverlay-UID, "
    "tmpfs only); 'off' keeps layers in the store",
    "VELO_JOBS": "worker processes for ingest, fsck and per-boot layer builds (default, and 0: "
    "the CPU count; at most 4 per CPU, more is held to that)",
    "VELO_SHIM_LIBRARY": "the shim library to preload (default: the one this package built)",
    "VELO_SHIM_CONFIG": "set by shim sessions for their processes: the session's shim export",
    "VELO_SESSION": "set by sessions for their processes: the session id (veloverlay commands "
    "inside a session read the store and say why they cannot write it)",
    "NO_COLOR": "disable colour in output",
    "REGISTRY_AUTH_FILE": "push/pull: the registry credentials file read first (podman's "
    "auth.json format; then $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/"
    "auth.json, $DOCKER_CONFIG/config.json)",
    "DOCKER_CONFIG": "push/pull: Docker's configuration directory (default ~/.docker)",
    "VELO_TEST_MUST_WORK": "tests: comma-separated probe features whose skips become failures",
    "VELO_INTERNAL__TEST_UID": "tests: the unprivileged uid for root-free tests (default 1500)",
    "VELO_INTERNAL__TEST_FAULT": "tests: inject a fault at a named point (crash tests)",
    "VELO_INTERNAL__TEST_PROGRESS": "tests: draw progress bars at once (1: on any stderr, tty: "
    "on a terminal only)",
    "VELO_INTERNAL__TEST_SCRATCH": "tests: where test stores live (default /dev/shm; the matrix's "
    "fs-verity box sets its verity ext4)",
}


def get(name: str, default: str | None = None) -> str | None:
    assert name in VARS, name
    return os.environ.get(name, default)


def get_int(name: str, *, minimum: int, maximum: int | None = None) -> int | None:
    """`name` as an integer >= `minimum` (and <= `maximum`, where given); None when unset or
    empty. Any other value is a usage error that names the variable (not a traceback from int(),
    or from the C call a too large value overflows)."""
    raw = get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise VeloError(
            f"{name}='{raw}' is not an integer {bound}",
            reason=Reason.USAGE,
            hint=f"{name}: {VARS[name]}",
        )
    return value


def home() -> str | None:
    """The user's home directory: $HOME when it is an absolute path, else the password
    database's entry for this uid; None when neither names one. Never a relative path (Python's
    expanduser gives a literal `~` for a uid without a passwd entry, and `/` for an empty $HOME):
    a store or a credentials file found from it would depend on the command's cwd."""
    env = os.environ.get("HOME", "")
    if os.path.isabs(env):
        return env
    try:
        import pwd

        entry = pwd.getpwuid(os.getuid()).pw_dir
    except (KeyError, ImportError):
        return None
    return entry if os.path.isabs(entry) else None


def xdg_dir(name: str, default: str) -> str | None:
    """An XDG base directory: `$name` when absolute (the XDG spec says to ignore a relative
    one), else `default` under the home; None when there is no home either."""
    env = os.environ.get(name, "")
    if os.path.isabs(env):
        return env
    where = home()
    return os.path.join(where, default) if where else None
