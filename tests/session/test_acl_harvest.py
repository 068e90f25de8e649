"""A POSIX ACL set inside a session (or copied up with its file) is harvested as ingest reads it
(veloverlay/posixacl.py): the group bits stored are what the ACL gives the owning group, never
its mask, so the commit never shows a file to a group the session's tree did not allow."""

from __future__ import annotations

import os
import struct

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, head_root, mode_params, new_store, run_session
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind


def _secret_acl(named: int) -> bytes:
    """user::rw-, user:`named`:r--, group::---, mask::r--, other::--- (a user namespace session
    can name only ids mapped in it: the session's own)."""
    entries = ((0x01, 6, _ANY), (0x02, 4, named), (0x04, 0, _ANY), (0x10, 4, _ANY), (0x20, 0, _ANY))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


_ANY = 0xFFFFFFFF
_SET = (
    "import os, sys\n"
    "for p in sys.argv[2:]:\n"
    "    os.setxattr(p, 'system.posix_acl_access', bytes.fromhex(sys.argv[1]))\n"
)


def _modes(base: str, backend: str) -> dict[str, int]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    argv = [
        "sh",
        "-euc",
        f"cd {proj}; printf s > new; mkdir newdir; "
        f'/usr/bin/python3 -c "$0" {_secret_acl(os.getuid()).hex()} f6 new newdir d',
        _SET,
    ]
    res = run_session(store, ["t"], argv, at=proj, backend=backend)
    assert res.exit_status == 0
    root = head_root(store, "t")
    m = Manifests(store)
    try:
        with m.read() as txn:
            out = {}
            for p in ("f6", "new", "newdir", "d"):
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
        got = as_mode(mode, _modes, base, backend)
    # f6 was 0640 (copied up), new 0644, newdir and d 0755; the ACL sets user and other bits
    # (rw-, ---), and its mask r-- shows as the group bits in stat (0640), but the group
    # entry gives the owning group nothing.
    assert got == dict.fromkeys(("f6", "new", "newdir", "d"), 0o600)
