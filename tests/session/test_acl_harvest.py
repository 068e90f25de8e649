"""A POSIX ACL set inside a session (or copied up with its file) is harvested as ingest reads it
(veloverlay/posixacl.py): the group bits stored are what the ACL gives the owning group, never
its mask, so the commit never shows a file to a group the session's tree did not allow."""

from __future__ import annotations

import os
import struct

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, head_root, mode_params, new_store, run_session
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind


def _secret_acl(named: int, user: int = 6) -> bytes:
    """user::`user` (rw-), user:`named`:r--, group::---, mask::r--, other::--- (a user namespace
    session can name only ids mapped in it: the session's own)."""
    entries = (
        (0x01, user, _ANY),
        (0x02, 4, named),
        (0x04, 0, _ANY),
        (0x10, 4, _ANY),
        (0x20, 0, _ANY),
    )
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


_ANY = 0xFFFFFFFF


_ACCESS_SET = (
    'cd {proj}; printf s > new; mkdir newdir; /usr/bin/python3 -c "$0" {acl} access f6 new newdir d'
)
# A default ACL set in the session on a new directory: what is made in it afterwards inherits an
# access ACL (user::rwx, user:self:r--, group::---, mask::r--, other::---): stat shows the mask.
_DEFAULT_SET = (
    'cd {proj}; mkdir dd; /usr/bin/python3 -c "$0" {acl} default dd; printf s > dd/f; mkdir dd/sub'
)
_SET = (
    "import os, sys\n"
    "for p in sys.argv[3:]:\n"
    "    os.setxattr(p, 'system.posix_acl_' + sys.argv[2], bytes.fromhex(sys.argv[1]))\n"
)


def _modes(base: str, backend: str, script: str, names: tuple[str, ...]) -> dict[str, int]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    acl = _secret_acl(os.getuid(), 7 if script is _DEFAULT_SET else 6).hex()
    argv = ["sh", "-euc", script.format(proj=proj, acl=acl), _SET]
    res = run_session(store, ["t"], argv, at=proj, backend=backend)
    assert res.exit_status == 0
    root = head_root(store, "t")
    m = Manifests(store)
    try:
        with m.read() as txn:
            out = {}
            for p in names:
                e = m.lookup(txn, root, p.encode())
                assert e is not None
                out[p] = m.get_node(txn, e.digest).mode if e.kind is Kind.DIR else e.mode
            return out
    finally:
        m.close()


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_an_acl_set_in_a_session_is_harvested_narrowed(mode: str, backend: str) -> None:
    """Both backends: the overlay's upper dir and the shim's materialised tree."""
    with unpriv_tmpdir() as base:
        got = as_mode(mode, _modes, base, backend, _ACCESS_SET, ("f6", "new", "newdir", "d"))
    # f6 was 0640 (copied up), new 0644, newdir and d 0755; the ACL sets user and other bits
    # (rw-, ---), and its mask r-- shows as the group bits in stat (0640), but the group
    # entry gives the owning group nothing.
    assert got == dict.fromkeys(("f6", "new", "newdir", "d"), 0o600)


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_what_a_default_acl_gives_is_harvested_narrowed(mode: str, backend: str) -> None:
    """A file and a directory made under a default ACL set in the session inherit an access
    ACL whose mask stat shows as their group bits (0640, 0740): the owning group gets nothing.
    The directory holding the default ACL has no access ACL: its mode (0755)."""
    names = ("dd", "dd/f", "dd/sub")
    with unpriv_tmpdir() as base:
        got = as_mode(mode, _modes, base, backend, _DEFAULT_SET, names)
    assert got == {"dd": 0o755, "dd/f": 0o600, "dd/sub": 0o700}


def _root_acl_only(base: str, backend: str) -> tuple[int, int]:
    """(the projection root's mode before, its stored mode after) a session that only sets an
    ACL on it: user::rwx, user:self:r-x, group::---, mask::r-x, other::r-x (stat: 0755 still,
    its mtime the same)."""
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    before = _root_mode(store)
    entries = ((0x01, 7, _ANY), (0x02, 5, os.getuid()), (0x04, 0, _ANY), (0x10, 5, _ANY))
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    acl += struct.pack("<HHI", 0x20, 5, _ANY)
    script = (
        "import os, sys\n"
        "os.chdir(sys.argv[2])\n"
        "st = os.stat('.')\n"
        "os.setxattr('.', 'system.posix_acl_access', bytes.fromhex(sys.argv[1]))\n"
        "assert os.stat('.').st_mode == st.st_mode and os.stat('.').st_mtime_ns == st.st_mtime_ns\n"
    )
    argv = ["/usr/bin/python3", "-c", script, acl.hex(), proj]
    res = run_session(store, ["t"], argv, at=proj, backend=backend)
    assert res.exit_status == 0
    return before, _root_mode(store)


def _root_mode(store: Store) -> int:
    root = head_root(store, "t")
    m = Manifests(store)
    try:
        with m.read() as txn:
            return m.get_node(txn, root).mode
    finally:
        m.close()


@pytest.mark.parametrize("backend", ["overlay", "shim"])
@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_an_acl_set_on_the_root_alone_is_harvested(mode: str, backend: str) -> None:
    """A session whose only change is an ACL on its root that leaves the root's stat as it was
    (the mask equal to the old group bits) still narrows the root's stored group bits."""
    with unpriv_tmpdir() as base:
        before, after = as_mode(mode, _root_acl_only, base, backend)
    assert (before, after) == (0o755, 0o705)
