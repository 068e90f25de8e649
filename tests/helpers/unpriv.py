"""Run test code as an unprivileged user, and give it a directory it can use.

`run_unprivileged(fn)` forks (ns.run_in_child), drops to UNPRIV_UID/GID for good, then calls fn:
anything fn does — unsharing a user namespace, mounting — happens as that uid, exactly as a
root-free user would do it. The uid need not exist in /etc/passwd. The pytest process itself never
changes identity.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tests.helpers.trees import force_rmtree
from veloverlay import mount, ns

__all__ = [
    "UNPRIV_UID",
    "UNPRIV_GID",
    "run_unprivileged",
    "run_in_userns",
    "unpriv_tmpdir",
    "mount_lines",
    "mine",
]

T = TypeVar("T")

# Root drops to this uid (it need not exist in /etc/passwd); a suite run by an unprivileged user
# (the VM matrix) simply stays itself.
UNPRIV_UID = (
    int(os.environ.get("VELO_INTERNAL__TEST_UID", "1500")) if os.getuid() == 0 else os.getuid()
)
UNPRIV_GID = UNPRIV_UID if os.getuid() == 0 else os.getgid()


def _as_unprivileged(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    if (os.getuid(), os.getgid()) != (UNPRIV_UID, UNPRIV_GID):
        ns.drop_to_user(UNPRIV_UID, UNPRIV_GID)
    result: T = fn(*args, **kw)
    return result


def run_unprivileged(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """fn(*args, **kw) in a forked child running as UNPRIV_UID; its result or exception."""
    result: T = ns.run_in_child(_as_unprivileged, fn, *args, **kw)
    return result


_PARENT: list[str] = []


def _scratch_parent() -> str:
    if not _PARENT:
        from veloverlay import storefs

        forced = os.environ.get("VELO_INTERNAL__TEST_SCRATCH")  # e.g. the matrix's verity disk
        if forced:
            _PARENT.append(forced)
        else:
            _PARENT.append("/dev/shm" if storefs.user_xattrs("/dev/shm").ok else "/var/tmp")
    return _PARENT[0]


@contextlib.contextmanager
def unpriv_tmpdir() -> Iterator[str]:
    """A fresh directory both root and UNPRIV_UID can use, removed afterwards: under
    $VELO_INTERNAL__TEST_SCRATCH when set, else under /dev/shm where its tmpfs holds user xattrs
    (overlay sessions need them on the store's filesystem; tmpfs has them since Linux 6.6), else
    under /var/tmp.

    Run by root, it is root's and sticky, writable by everyone (1777, as /tmp): the unprivileged
    uid makes its own entries there, and a store root makes there stays root's to use (a store
    in a directory another user owns is refused to root: store-unsafe). Run by that uid itself
    (the VM matrix), it is simply its own, 0755.

    pytest's tmp_path lies under /tmp/pytest-of-root (0700), which that uid cannot reach.
    """
    path = mine(tempfile.mkdtemp(prefix="velo-test-", dir=_scratch_parent()))
    try:
        os.chmod(path, 0o1777 if os.getuid() == 0 else 0o755)
        yield path
    finally:
        force_rmtree(path)


def _enter_and_run(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    ns.enter_userns(map_root=True)
    mount.make_rprivate("/")
    result: T = fn(*args, **kw)
    return result


def run_in_userns(fn: Callable[..., T], *args: Any, privileged: bool, **kw: Any) -> T:
    """fn in a forked child that entered its own user+mount namespace (root mapped to itself
    with `privileged`, else as UNPRIV_UID mapped to 0), with `/` made private."""
    result: T
    if privileged:
        result = ns.run_in_child(_enter_and_run, fn, *args, **kw)
    else:
        result = run_unprivileged(_enter_and_run, fn, *args, **kw)
    return result


_MINE: set[str] = set()  # the scratch directories (velo-*) this test process made
_SCRATCH = re.compile(r"/(?:dev/shm|var/tmp|tmp)/velo-[^/]+")


def mine(path: str) -> str:
    """`path`, a scratch directory (`velo-*` in /dev/shm, /tmp or /var/tmp) this test process
    made, recorded as such for `mount_lines`."""
    _MINE.add(os.path.realpath(path))
    return path


def _theirs(path: str) -> bool:
    """`path` lies in a scratch directory another test process made (another pytest run)."""
    m = _SCRATCH.match(path)
    return m is not None and m.group(0) not in _MINE


def mount_lines() -> list[str]:
    """The calling process's mountinfo lines (from the mount point on) that a test could have
    left: tests compare them to prove nothing leaked. Only mounts on the places tests work in
    (the scratch parents, temp dirs, this checkout) and every overlay: the host mounting
    elsewhere meanwhile (a VM image being built) is not a leak of ours. Nor is what another test
    process mounts in its own scratch directories (a `velo-*` one this process did not make,
    see `mine`), or an overlay whose upper dir is there: with two test runs at once, the
    other's session or `veloverlay mount` made these checks fail."""
    places = tuple(
        p.rstrip("/") + "/"
        for p in (
            "/dev/shm",
            "/tmp",
            "/var/tmp",
            tempfile.gettempdir(),
            os.environ.get("VELO_INTERNAL__TEST_SCRATCH") or "/dev/shm",
            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
    )
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            rest = line.split(" ", 4)[4]
            point = rest.split(" ", 1)[0]
            if not (point + "/").startswith(places) and " - overlay " not in rest:
                continue
            upper = re.search(r"[, ]upperdir=([^,\s]+)", rest)
            if _theirs(point) or (upper is not None and _theirs(upper.group(1))):
                continue
            out.append(rest)
    return out
